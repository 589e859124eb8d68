"""Datasets: train / val / test splits for image classification.

Tensor layouts
--------------
Every dataset returned here yields ``(x, y)`` with

* ``x``: float32 ``[3, H, W]`` (CHW, ``H = W = image_size``), normalised per channel;
* ``y``: int64 scalar tensor (``[]``), the class index in ``[0, num_classes)``.

A :class:`torch.utils.data.DataLoader` from :func:`make_loader` therefore yields
``x: [B, 3, H, W]`` and ``y: [B]``.

Every split dataset also has ``indices`` (int64 ``[n]``: positions in the source collection it
was drawn from - the digits array, the synthetic array, the CIFAR train or test set, the list of
image files) and ``labels`` (int64 ``[n]``: the labels of its examples, in order).

Datasets
--------
``digits``
    scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, shipped with the package).
    Pixels / 16, bilinearly resized to ``image_size`` once up front, replicated to 3 channels,
    normalised with train-split statistics. Seeded stratified train/val/test split
    (``test_fraction`` and ``val_fraction`` of the whole). ``augment``: random shifts of up to
    2 pixels (edge-replicated) on the train split.
``cifar10`` / ``cifar100``
    Read from ``root`` in the python-pickle layout of the official archives
    (``cifar-10-batches-py/`` or ``cifar-100-python/``); never downloaded. The pickles are read by
    a restricted unpickler that resolves only the numpy array globals a CIFAR batch needs and
    refuses every other class or function (and object arrays) with a one-line DataError, so a
    planted pickle cannot run code. val = a seeded
    ``val_fraction`` of the official train set, test = the official test set. Standard
    per-channel normalisation. ``augment``: random crop 32 with zero padding 4 + horizontal flip,
    on the train split only.
``imagefolder``
    ``root/train/<class>/*.png|jpg|jpeg`` (required) and ``root/val/<class>/...`` (optional; used
    as the test set when present, otherwise a test split is carved from train). Images are read
    lazily, converted to RGB and resized to ``image_size`` x ``image_size``; ImageNet
    normalisation. val is carved from train. ``augment``: random crop with padding
    ``image_size // 8`` + horizontal flip on train. The train split is in a seeded
    class-interleaved order (not folder order), so that a capped statistics pass
    (``stats.max_batches``), which reads a prefix, sees every class.
``parquet``
    Shards ``root/train-*.parquet`` (required) and ``root/val-*.parquet`` (optional, the test set)
    with an ``image`` column (encoded bytes) and a ``label`` column (:mod:`raykfe.stream` has the
    layout and ``write_parquet_shards``). Decoded like ``imagefolder``; splits are taken in storage
    order (the writer shuffles), read row group by row group.
``synthetic``
    ``synthetic_size`` examples in ``num_classes`` (default 10) classes; each class is a fixed,
    seeded, low-frequency random pattern, each example that pattern plus Gaussian noise. Split
    like digits. Learnable by a small CNN in a few epochs.

Object storage
--------------
``root`` of ``cifar10`` / ``cifar100`` / ``imagefolder`` / ``parquet`` may be an ``s3://`` or
``gs://`` URI (S3-compatible servers: ``?endpoint_override=http://host:port&scheme=http&region=...``;
credentials from the environment, a URI carrying them is refused).

``access="stream"`` (the default): nothing is copied to disk. The root is listed once per process
(:mod:`raykfe.stream`), an image is fetched with one GET when its example is loaded (a batch's
objects concurrently), parquet shards are read by row group, CIFAR batches straight into memory.
Errors are one line naming ``data.root`` (and the object that cannot be read).

``access="mirror"`` (not for ``parquet``): the files the loader needs (the CIFAR batches and meta
file, or every ``train|val/<class>/<image>``) are mirrored file by file into a local cache,
``$RAYKFE_DATA_CACHE/<sha>`` (default base ``~/.cache/raykfe/data``; ``<sha>`` = 16 hex digits of
the SHA-256 of the URI without credentials), each written to a temporary name and renamed, and a
file already cached with the remote's size is not copied again. Loading then reads the local copy.
When the remote cannot be listed or lacks files, a complete earlier mirror of the same URI is used
with a warning; otherwise a one-line :class:`DataError` names ``data.root`` and what is missing.

All randomness (splits, synthetic data) comes from ``seed``; the same seed gives the same splits.
Augmentation draws from torch's global RNG in the loading process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from raykfe.errors import ConfigError, DataError, RaykfeError
from raykfe.storage import SECRET_WORDS as _SECRET_WORDS  # query options that carry a secret
from raykfe.stream import (
    IMAGE_SUFFIXES,
    ShardIndex,
    Source,
    decode_many,
    group_images,
    image_objects,
    list_image_tree,
    list_shards,
    read_shard_index,
)

__all__ = [
    "DataSplits", "load_data", "job_splits", "make_loader", "loader_options", "list_datasets", "data_cache_dir", "is_remote_root",
]

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGE_SUFFIXES = IMAGE_SUFFIXES


@dataclass
class DataSplits:
    """The three splits of a dataset plus its shape information.

    ``input_shape`` is ``(3, image_size, image_size)``; ``name`` is the dataset name.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


# --------------------------------------------------------------------------- datasets


class _SplitBase(Dataset):
    """Common attributes: ``indices`` and ``labels`` (int64 ``[n]``)."""

    indices: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


class TensorSplit(_SplitBase):
    """An in-memory split: ``images`` float32 ``[n, 3, H, W]`` already normalised.

    ``shift`` > 0 makes ``__getitem__`` translate each image by a random offset in
    ``[-shift, shift]`` pixels per axis (edges replicated).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, *, shift: int = 0
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = indices
        self.shift = shift

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.shift > 0:
            s = self.shift
            h, w = x.shape[-2:]
            padded = F.pad(x[None], (s, s, s, s), mode="replicate")[0]
            dy, dx = (int(v) for v in torch.randint(0, 2 * s + 1, (2,)))
            x = padded[:, dy : dy + h, dx : dx + w]
        return x, self.labels[i]


class _CifarSplit(_SplitBase):
    """CIFAR images kept as uint8 ``[n, 3, 32, 32]``; converted, augmented, normalised per item."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int,
        augment: bool,
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = indices
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.image_size = image_size
        self.augment = augment

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].float().div_(255.0)  # [3, 32, 32] in [0, 1]
        if self.augment:
            x = _crop_flip(x, pad=4)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = _resize(x[None], self.image_size)[0]
        return (x - self.mean) / self.std, self.labels[i]


class _ImageSplit(_SplitBase):
    """Images decoded lazily: RGB, resized to ``image_size``, ImageNet-normalised, augmented on train.

    ``__getitems__`` (what a DataLoader calls for a batch) fetches and decodes the batch's images
    concurrently on the process's I/O threads; augmentation then draws from torch's RNG in order,
    so a batch is the same however it was fetched. Subclasses say where an image's bytes are.
    """

    remote = False  # True: read from object storage (DataLoader workers must not be forked)
    blocks: torch.Tensor | None = None  # int64 [n]: storage block (row group) of each example

    def __init__(self, labels: torch.Tensor, indices: torch.Tensor, *, image_size: int, augment: bool) -> None:
        self.labels = labels
        self.indices = indices
        self.image_size = image_size
        self.augment = augment
        self.mean = torch.tensor(_IMAGENET_STATS[0]).view(3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STATS[1]).view(3, 1, 1)

    def _fetchers(self, idx: list[int]) -> list[tuple[Any, str]]:
        """``(callable returning the bytes or a local path, name for messages)`` per example."""
        raise NotImplementedError

    def _finish(self, arr: np.ndarray, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]
        if self.augment:
            x = _crop_flip(x, pad=max(1, self.image_size // 8))
        return (x - self.mean) / self.std, self.labels[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = [int(i) for i in idx]
        arrays = decode_many(self._fetchers(idx), self.image_size)
        return [self._finish(a, i) for a, i in zip(arrays, idx)]


class _FileSplit(_ImageSplit):
    """Images read lazily from local files (``paths``)."""

    def __init__(
        self,
        paths: list[Path],
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        image_size: int,
        augment: bool,
    ) -> None:
        super().__init__(labels, indices, image_size=image_size, augment=augment)
        self.paths = paths

    def _fetchers(self, idx: list[int]) -> list[tuple[Any, str]]:
        return [((lambda p=self.paths[i]: p), str(self.paths[i])) for i in idx]


class _ObjectSplit(_ImageSplit):
    """Images streamed one object each from object storage (``keys`` relative to ``source``)."""

    remote = True

    def __init__(
        self, source: Source, keys: list[str], labels: torch.Tensor, indices: torch.Tensor, *, image_size: int, augment: bool
    ) -> None:
        super().__init__(labels, indices, image_size=image_size, augment=augment)
        self.source, self.keys = source, keys

    def _fetchers(self, idx: list[int]) -> list[tuple[Any, str]]:
        return [((lambda k=self.keys[i]: self.source.read(k)), self.source.name(self.keys[i])) for i in idx]


class _ParquetSplit(_ImageSplit):
    """Examples ``rows`` of a :class:`raykfe.stream.ShardIndex`, read by row group.

    ``indices`` are the rows (positions in the concatenated shards), ``blocks`` their row groups.
    """

    def __init__(
        self, source: Source, index: ShardIndex, rows: np.ndarray, *, image_size: int, augment: bool
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        super().__init__(
            torch.from_numpy(index.labels[rows]), torch.from_numpy(rows), image_size=image_size, augment=augment
        )
        self.source, self.index, self.remote = source, index, source.remote
        self.blocks = torch.from_numpy(index.group_of(rows))

    def _fetchers(self, idx: list[int]) -> list[tuple[Any, str]]:
        rows = self.indices[idx].numpy()
        groups = self.index.group_of(rows)
        images = {int(g): group_images(self.source, self.index, int(g)) for g in dict.fromkeys(groups.tolist())}
        out = []
        for row, g in zip(rows.tolist(), groups.tolist()):
            local = row - int(self.index.group_start[g])
            shard = self.index.files[int(self.index.group_file[g])]
            out.append(((lambda b=images[g][local]: b), f"{self.source.name(shard)} row {row - self._shard_start(g)}"))
        return out

    def _shard_start(self, g: int) -> int:
        first = int(np.searchsorted(self.index.group_file, self.index.group_file[g], side="left"))
        return int(self.index.group_start[first])


def _crop_flip(x: torch.Tensor, *, pad: int) -> torch.Tensor:
    """Random same-size crop of ``x`` [C, H, W] zero-padded by ``pad``, then a random h-flip."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    x = padded[:, dy : dy + h, dx : dx + w]
    if bool(torch.rand(()) < 0.5):
        x = x.flip(-1)
    return x.contiguous()


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``x`` [N, C, h, w] to [N, C, size, size]."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- splitting


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of ``range(len(labels))`` in which classes are evenly interleaved.

    Within each class the order is random; an element of rank r in a class of size n gets the
    key (r + u) / n with u ~ U(0, 1), and the permutation sorts by key. Any prefix of it then
    holds every class in (close to) its overall proportion.
    """
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        ranks = rng.permutation(len(idx))
        keys[idx] = (ranks + rng.random(len(idx))) / len(idx)
    return np.argsort(keys, kind="stable")


def _split_counts(n: int, fractions: dict[str, float], dataset: str) -> dict[str, int]:
    """Round ``fraction * n`` per split; a split that gets nothing is a DataError."""
    counts = {k: int(math.floor(f * n + 0.5)) for k, f in fractions.items()}
    for key, count in counts.items():
        if count < 1:
            raise DataError(
                f"{dataset}: the {key} split is empty ({key}_fraction={fractions[key]} of "
                f"{n} examples): raise {key}_fraction or use more data"
            )
    if n - sum(counts.values()) < 1:
        raise DataError(
            f"{dataset}: the train split is empty ({n} examples, fractions "
            f"{', '.join(f'{k}={v}' for k, v in fractions.items())}): lower the fractions"
        )
    return counts


def _split_indices(
    labels: np.ndarray, fractions: dict[str, float], seed: int, dataset: str
) -> dict[str, np.ndarray]:
    """Seeded stratified split of ``range(len(labels))``.

    Returns index arrays (each sorted) for every key of ``fractions`` plus ``"train"`` (the rest).
    """
    counts = _split_counts(len(labels), fractions, dataset)
    order = _stratified_order(labels, np.random.default_rng(seed))
    out: dict[str, np.ndarray] = {}
    start = 0
    for key, count in counts.items():
        out[key] = np.sort(order[start : start + count])
        start += count
    out["train"] = np.sort(order[start:])
    return out


# --------------------------------------------------------------------------- loaders


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise ConfigError(f"{key} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction must be below 1 (got {val_fraction} + "
            f"{test_fraction}): lower them so the train split keeps some data"
        )


def _check_num_classes(dataset: str, requested: int | None, actual: int) -> None:
    if requested is not None and requested != actual:
        raise ConfigError(
            f"{dataset} has {actual} classes but num_classes={requested} was requested: "
            f"drop num_classes or set it to {actual}"
        )


def _tensor_splits(
    name: str,
    images: torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    shift: int,
) -> DataSplits:
    """Split in-memory ``images`` [N, 3, H, W] (unnormalised), normalise with train statistics."""
    parts = _split_indices(labels, {"test": test_fraction, "val": val_fraction}, seed, name)
    train_x = images[torch.from_numpy(parts["train"])]
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    y_all = torch.from_numpy(labels.astype(np.int64))

    def make(key: str, augment_shift: int) -> TensorSplit:
        idx = torch.from_numpy(parts[key].astype(np.int64))
        x = ((images[idx] - mean) / std).contiguous()
        return TensorSplit(x, y_all[idx], idx, shift=augment_shift)

    h, w = images.shape[-2:]
    return DataSplits(
        train=make("train", shift),
        val=make("val", 0),
        test=make("test", 0),
        num_classes=num_classes,
        input_shape=(3, int(h), int(w)),
        name=name,
    )


def _load_digits(image_size: int, **kw: Any) -> DataSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0)  # [N, 8, 8]
    images = _resize(images[:, None], image_size).expand(-1, 3, -1, -1)  # [N, 3, S, S]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _tensor_splits("digits", images.contiguous(), labels, 10, **kw)


def _load_synthetic(
    image_size: int, size: int, num_classes: int, seed: int, **kw: Any
) -> DataSplits:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"synthetic_size must be a positive integer, got {size!r}")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=gen)
    patterns = _resize(coarse, image_size)  # [K, 3, S, S], smooth
    labels = torch.arange(size) % num_classes
    labels = labels[torch.randperm(size, generator=gen)]
    noise = torch.randn(size, 3, image_size, image_size, generator=gen)
    images = patterns[labels] + 0.5 * noise
    return _tensor_splits(
        "synthetic", images, labels.numpy().astype(np.int64), num_classes, seed=seed, **kw
    )


def _resolve_root(name: str, root: str | os.PathLike[str] | None, what: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{name} needs a data root: set data.root to the folder that holds {what}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{name} data not found under data.root '{path}': the folder does not exist; "
            f"put {what} there (raykfe never downloads data)"
        )
    return path


class _RefusedGlobal(pickle.UnpicklingError):
    """A CIFAR pickle named a class or function outside :data:`_CIFAR_GLOBALS`."""


def _numpy_global(qualname: str) -> Any:
    """``module.attr`` from numpy 2 (``numpy._core``) or numpy 1 (``numpy.core``)."""
    import importlib

    module, _, attr = qualname.rpartition(".")
    for candidate in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(candidate), attr)
        except (ImportError, AttributeError):
            continue
    raise _RefusedGlobal(f"'{qualname}' (not in this numpy)")


def _plain_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:  # an object array would hold whatever the pickle builds
        raise _RefusedGlobal("an object array")
    return dtype


#: every global a CIFAR batch (numpy arrays in a dict) needs, in numpy 1 and 2 spellings and every
#: pickle protocol; each maps to the callable the unpickler gets instead of importing the name
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _plain_dtype,
    ("numpy", "ndarray"): np.ndarray,  # the type itself: _reconstruct needs it; its dtype comes from _plain_dtype
    **{(m, "_reconstruct"): "numpy.core.multiarray._reconstruct" for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): "numpy.core.numeric._frombuffer" for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("_codecs", "encode"): "codecs.encode",  # bytes pickled by Python 3 at protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR batch and nothing else: no global outside :data:`_CIFAR_GLOBALS` is ever
    imported or called, so a planted pickle cannot run code (it fails with a one-line DataError)."""

    def find_class(self, module: str, name: str) -> Any:
        target = _CIFAR_GLOBALS.get((module, name))
        if target is None:
            raise _RefusedGlobal(f"'{module}.{name}'")
        if target == "codecs.encode":
            import codecs

            return codecs.encode
        return _numpy_global(target) if isinstance(target, str) else target


def _check_cifar_dict(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"a {type(entry).__name__}, not a dict")
    if any(isinstance(v, np.ndarray) and v.dtype.hasobject for v in entry.values()):
        raise _RefusedGlobal("an object array")
    return entry


def _read_pickle(path: Path | tuple[Source, str], name: str) -> dict[str, Any]:
    """A CIFAR pickle from a local ``path`` or, as ``(source, relative name)``, from object storage
    straight into memory."""
    import io

    where = path if isinstance(path, Path) else path[0].name(path[1])
    try:
        if isinstance(path, Path):
            with open(path, "rb") as f:
                return _check_cifar_dict(_CifarUnpickler(f, encoding="latin1").load())
        return _check_cifar_dict(_CifarUnpickler(io.BytesIO(path[0].read(path[1])), encoding="latin1").load())
    except _RefusedGlobal as exc:
        raise DataError(
            f"{name} file '{where}' is not a plain CIFAR batch: it asks for {exc.args[0]}, which raykfe never "
            "loads (only numpy arrays, lists, numbers and strings): re-extract the official python archive"
        ) from None
    except DataError as exc:  # an object-storage read failed
        raise DataError(f"{name}: {str(exc).replace('cannot read image', 'cannot read')}") from None
    except Exception as exc:  # truncated or garbage bytes: pickle raises many kinds
        raise DataError(
            f"{name} file '{where}' cannot be read ({type(exc).__name__}): "
            "re-extract the official python archive"
        ) from None


def _where(folder: Path | tuple[Source, str], fname: str = "") -> str:
    """A local folder / file, or its public name on object storage, for messages."""
    if isinstance(folder, Path):
        return str(folder / fname) if fname else str(folder)
    return folder[0].name(f"{folder[1]}/{fname}".strip("/"))


def _read_cifar_batches(
    folder: Path | tuple[Source, str], files: list[str], label_key: str, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate pickle batches into uint8 images [N, 3, 32, 32] and int64 labels [N].

    ``folder`` is a local folder or ``(source, relative folder)`` on object storage."""
    datas, labels = [], []
    for fname in files:
        if isinstance(folder, Path):
            entry = _read_pickle(folder / fname, name)
        else:
            entry = _read_pickle((folder[0], f"{folder[1]}/{fname}".lstrip("/")), name)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(entry[label_key], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"{name} file '{_where(folder, fname)}' is not a CIFAR batch ({exc}): "
                "re-extract the official python archive"
            ) from None
        if len(lab) != len(data):
            raise DataError(
                f"{name} file '{_where(folder, fname)}' has {len(data)} images but {len(lab)} labels: "
                "re-extract the official python archive"
            )
        datas.append(data)
        labels.append(lab)
    images = torch.from_numpy(np.concatenate(datas))
    return images, torch.from_numpy(np.concatenate(labels))


def _cifar_files(name: str) -> tuple[str, list[str], list[str], str]:
    """``(folder name, train batch files, test batch files, meta file)`` of the official archive."""
    if name == "cifar10":
        return "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
    return "cifar-100-python", ["train"], ["test"], "meta"


def _load_cifar(
    name: str,
    root: str | None,
    *,
    image_size: int,
    seed: int,
    val_fraction: float,
    augment: bool,
    num_classes: int | None,
) -> DataSplits:
    """CIFAR-10/100 from a local folder or a bucket, split and wrapped. (Long: finding the files
    on either kind of root, reading, checking and splitting them read best as one sequence.)"""
    folder_name, train_files, test_files, meta_file = _cifar_files(name)
    label_key, k = ("labels", 10) if name == "cifar10" else ("fine_labels", 100)
    _check_num_classes(name, num_classes, k)
    what = f"the extracted '{folder_name}' folder"
    folder: Path | tuple[Source, str]
    if is_remote_root(root):  # streamed: the batches are read from object storage into memory
        source = _remote_source(name, str(root))
        try:
            files, missing = _remote_cifar(name, source.location())
        except Exception as exc:
            raise _unlisted(name, source, exc) from None
        if missing or not files:
            problem = f"missing {', '.join(missing)}" if files else f"no '{folder_name}' folder or files there"
            raise DataError(
                f"{name} data not found at data.root '{source.public}' ({problem}): put {what} "
                "(or its files) there (raykfe never downloads data)"
            )
        folder = (source, next(iter(files)).rpartition("/")[0])
    else:
        base = _resolve_root(name, root, what)
        folder = base if (base / train_files[0]).is_file() else base / folder_name
        missing = [f for f in [*train_files, *test_files, meta_file] if not (folder / f).is_file()]
        if missing:
            raise DataError(
                f"{name} data not found under data.root '{base}' (missing {', '.join(missing)}): "
                f"put {what} there (raykfe never downloads data)"
            )
    train_x, train_y = _read_cifar_batches(folder, train_files, label_key, name)
    test_x, test_y = _read_cifar_batches(folder, test_files, label_key, name)
    for split_y in (train_y, test_y):
        if len(split_y) and (int(split_y.min()) < 0 or int(split_y.max()) >= k):
            raise DataError(
                f"{name} labels under '{_where(folder)}' fall outside [0, {k}): "
                "re-extract the official python archive"
            )
    if len(train_y) == 0:
        raise DataError(f"{name} train set under '{_where(folder)}' is empty (its batches hold no image): re-extract the archive")
    parts = _split_indices(train_y.numpy(), {"val": val_fraction}, seed, name)
    if len(test_y) == 0:
        raise DataError(f"{name} test set under '{_where(folder)}' is empty: re-extract the archive")
    mean, std = _CIFAR_STATS[name]

    def make(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, aug: bool) -> _CifarSplit:
        t = torch.from_numpy(idx.astype(np.int64))
        return _CifarSplit(
            x[t], y[t], t, mean=mean, std=std, image_size=image_size, augment=aug
        )

    return DataSplits(
        train=make(train_x, train_y, parts["train"], augment),
        val=make(train_x, train_y, parts["val"], False),
        test=make(test_x, test_y, np.arange(len(test_y)), False),
        num_classes=k,
        input_shape=(3, image_size, image_size),
        name=name,
    )


def _scan_image_tree(folder: Path) -> dict[str, list[Path]]:
    """``{class_name: sorted image paths}`` for ``folder/<class>/*.png|jpg|jpeg``."""
    out: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if files:
            out[class_dir.name] = files
    return out


def _image_splits(
    name: str,
    classes: list[str],
    train_labels: np.ndarray,
    test_labels: np.ndarray | None,
    make: Any,
    *,
    image_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    augment: bool,
    interleave: bool,
    where: str,
) -> DataSplits:
    """Split an image collection: ``make(which, idx, augment)`` builds the split of examples ``idx``
    of ``"train"`` (the train pool) or ``"test"`` (the separate test set, when ``test_labels`` is
    given; else the test split is carved from the train pool).

    ``interleave``: order the train split by a seeded class-interleaved permutation instead of
    storage order, so that any prefix - what a capped statistics pass (``stats.max_batches``) reads
    - holds every class in proportion. Sharded formats keep storage order (reads stay sequential;
    their writer shuffles). ``where``: the root, for messages.
    """
    label = f"{name} at data.root '{where}'"
    if test_labels is not None:
        parts = _split_indices(train_labels, {"val": val_fraction}, seed, label)
        test = make("test", np.arange(len(test_labels)), False)
    else:
        parts = _split_indices(train_labels, {"test": test_fraction, "val": val_fraction}, seed, label)
        test = make("train", parts["test"], False)
    train_idx = parts["train"]
    if interleave:
        train_idx = train_idx[_stratified_order(train_labels[train_idx], np.random.default_rng([seed, 1]))]
    return DataSplits(
        train=make("train", train_idx, augment),
        val=make("train", parts["val"], False),
        test=test,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        name=name,
    )


def _load_imagefolder(
    root: str | None,
    *,
    image_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    augment: bool,
    num_classes: int | None,
) -> DataSplits:
    """An ImageFolder tree from a local folder, a local mirror of a bucket or a streamed bucket.
    (Long: the three kinds of root share the listing, the class map and the split, in order.)"""
    name = "imagefolder"
    what = "train/<class>/*.png|jpg (and optionally val/<class>/...)"
    items: dict[str, list[Any]] = {}
    if is_remote_root(root):  # streamed: one listing, then one GET per image when it is needed
        source = _remote_source(name, str(root))
        try:
            tree = list_image_tree(source)
        except RaykfeError:
            raise
        except Exception as exc:
            raise _unlisted(name, source, exc) from None
        train_tree, test_tree = tree["train"], tree["val"] or None
        if not train_tree:
            raise DataError(
                f"{name} data not found at data.root '{source.public}' (no train/<class>/*.png|jpg objects): "
                f"put an ImageFolder tree {what} there (raykfe never downloads data)"
            )
        train_where, val_where = source.name("train"), source.name("val")
    else:
        base = _resolve_root(name, root, what)
        train_dir = base / "train"
        if not train_dir.is_dir():
            raise DataError(
                f"imagefolder: no 'train' folder under data.root '{base}': put images in "
                f"'{train_dir}/<class>/*.png|jpg'"
            )
        train_tree = _scan_image_tree(train_dir)
        if not train_tree:
            raise DataError(
                f"imagefolder: no images found under '{train_dir}' (data.root): put images in "
                f"'{train_dir}/<class>/*.png|jpg'"
            )
        val_dir = base / "val"
        test_tree = _scan_image_tree(val_dir) if val_dir.is_dir() else None
        if test_tree is not None and not test_tree:
            raise DataError(
                f"imagefolder: no images found under '{val_dir}' (data.root): add images or remove the folder"
            )
        train_where, val_where = str(train_dir), str(val_dir)
    classes = sorted(train_tree)
    _check_num_classes(name, num_classes, len(classes))
    class_index = {c: i for i, c in enumerate(classes)}
    items["train"] = [p for c in classes for p in train_tree[c]]
    labels = np.array([class_index[c] for c in classes for _ in train_tree[c]], dtype=np.int64)
    test_labels = None
    if test_tree is not None:
        unknown = sorted(set(test_tree) - set(classes))
        if unknown:
            raise DataError(
                f"imagefolder: classes {', '.join(unknown)} in '{val_where}' are not in "
                f"'{train_where}': use the same class folders in both"
            )
        items["test"] = [p for c in classes for p in test_tree.get(c, [])]
        test_labels = np.array([class_index[c] for c in classes for _ in test_tree.get(c, [])], dtype=np.int64)
    ys = {"train": labels, "test": test_labels}

    def make(which: str, idx: np.ndarray, aug: bool) -> _ImageSplit:
        chosen = [items[which][i] for i in idx]
        y = torch.from_numpy(ys[which][idx].astype(np.int64))
        t = torch.from_numpy(idx.astype(np.int64))
        if is_remote_root(root):
            return _ObjectSplit(source, chosen, y, t, image_size=image_size, augment=aug)
        return _FileSplit(chosen, y, t, image_size=image_size, augment=aug)

    return _image_splits(
        name, classes, labels, test_labels, make, image_size=image_size, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, augment=augment, interleave=True,
        where=source.public if is_remote_root(root) else str(base),
    )


def _load_parquet(
    root: str | None,
    *,
    image_size: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    augment: bool,
    num_classes: int | None,
) -> DataSplits:
    """Parquet shards ``train-*.parquet`` (required) and ``val-*.parquet`` (optional, the test set)
    under a local folder or object storage; read by row group as needed (:mod:`raykfe.stream`).
    (Long: listing, schema checks, row-group index and split read best as one sequence.)"""
    name = "parquet"
    what = "parquet shards train-*.parquet (and optionally val-*.parquet) with columns image, label"
    if is_remote_root(root):
        source = _remote_source(name, str(root))
    else:
        base = _resolve_root(name, root, what)
        source = Source(str(base), str(base), remote=False)
    try:
        train_files, val_files = list_shards(source, "train"), list_shards(source, "val")
    except RaykfeError:
        raise
    except Exception as exc:
        raise _unlisted(name, source, exc) from None
    if not train_files:
        raise DataError(
            f"{name} data not found at data.root '{source.public}' (no train-*.parquet there): put {what} "
            "there, e.g. written by raykfe.stream.write_parquet_shards (raykfe never downloads data)"
        )
    train_index = read_shard_index(source, train_files)
    test_index = read_shard_index(source, val_files) if val_files else None
    for index, files in ((train_index, train_files), (test_index, val_files)):
        if index is not None and len(index) == 0:
            raise DataError(
                f"{name}: the shards {files[0]}... under data.root '{source.public}' hold no rows: "
                "write shards with images or remove them"
            )
    classes = train_index.classes
    k = len(classes) if classes else int(train_index.labels.max()) + 1
    if test_index is not None:
        k = max(k, int(test_index.labels.max()) + 1) if not classes else k
    for index in (train_index, test_index):
        if index is not None and int(index.labels.max()) >= k:
            raise DataError(
                f"{name}: labels under data.root '{source.public}' reach {int(index.labels.max())} but the "
                f"shards name {k} classes: rewrite the shards with consistent labels"
            )
    if num_classes is not None and classes is None:
        k = max(k, num_classes)  # shards without class names: trust the job's count if it is larger
    _check_num_classes(name, num_classes, k)
    indexes = {"train": train_index, "test": test_index}

    def make(which: str, idx: np.ndarray, aug: bool) -> _ParquetSplit:
        return _ParquetSplit(source, indexes[which], idx, image_size=image_size, augment=aug)

    return _image_splits(
        name, classes or [str(i) for i in range(k)], train_index.labels,
        None if test_index is None else test_index.labels, make, image_size=image_size, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, augment=augment, interleave=False,
        where=source.public,
    )


# --------------------------------------------------------------------------- object-storage roots

_REMOTE_SCHEMES = ("s3", "gs", "gcs")
_CACHE_ENV = "RAYKFE_DATA_CACHE"
_DEFAULT_CACHE = "~/.cache/raykfe/data"
_MIRROR_MANIFEST = ".raykfe-mirror.json"
_COPY_CHUNK = 4 << 20  # bytes per read while copying one object

_log = logging.getLogger(__name__)


def is_remote_root(root: Any) -> bool:
    """True for an ``s3://`` / ``gs://`` data root (streamed, or mirrored with ``access="mirror"``)."""
    return isinstance(root, str) and urlsplit(root).scheme.lower() in _REMOTE_SCHEMES


def _refuse_secrets(name: str, uri: str) -> None:
    if _secret_in(uri):
        raise DataError(
            f"{name}: data.root for bucket '{urlsplit(uri).hostname}' carries credentials: remove them "
            "from the URI and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
            "GOOGLE_APPLICATION_CREDENTIALS) in the environment"
        )


def _remote_source(name: str, uri: str) -> Source:
    """A streamed object-storage root; a URI carrying credentials is refused."""
    _refuse_secrets(name, uri)
    return Source(uri, _public_uri(uri), remote=True)


def _unlisted(name: str, source: Source, exc: BaseException) -> DataError:
    return DataError(
        f"{name}: data.root '{source.public}' cannot be listed: {_first_line(exc)}: check the URI, the endpoint "
        "and the credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS in the environment)"
    )


def _secret_in(uri: str) -> bool:
    parts = urlsplit(uri)
    if parts.username or parts.password:
        return True
    keys = [k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    return any(word in k for k in keys for word in _SECRET_WORDS)


def _public_uri(uri: str) -> str:
    """``uri`` without user info or secret-bearing query options, path and query normalised.

    This is the only form of a remote root that appears in messages, in the cache path (hashed)
    and in the cache's manifest.
    """
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = sorted(
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not any(word in k.lower() for word in _SECRET_WORDS)
    )
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), urlencode(query, safe=":/"), ""))


def data_cache_dir(uri: str) -> Path:
    """The local mirror of a remote data root: ``$RAYKFE_DATA_CACHE/<sha>`` (default base
    ``~/.cache/raykfe/data``), ``<sha>`` = the first 16 hex digits of the SHA-256 of the URI
    without credentials."""
    base = os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE
    digest = hashlib.sha256(_public_uri(uri).encode()).hexdigest()[:16]
    return Path(base).expanduser() / digest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _remote_cifar(name: str, loc: Any) -> tuple[dict[str, int], list[str]]:
    """``({relative path: size}, [missing relative paths])`` of a CIFAR root on object storage.

    Like a local root, the URI may name the folder that holds ``cifar-10-batches-py`` /
    ``cifar-100-python`` or that folder itself.
    """
    import pyarrow.fs as pafs

    folder_name, train_files, test_files, meta_file = _cifar_files(name)
    needed = [*train_files, *test_files, meta_file]
    layouts = (needed, [f"{folder_name}/{f}" for f in needed])
    infos = loc.fs.get_file_info([loc.path(rel) for layout in layouts for rel in layout])
    size = {
        rel: int(info.size)
        for rel, info in zip([r for layout in layouts for r in layout], infos)
        if info.type == pafs.FileType.File
    }
    rels = layouts[0] if layouts[0][0] in size else layouts[1]
    return {r: size[r] for r in rels if r in size}, [r for r in rels if r not in size]


def _remote_imagefolder(loc: Any) -> tuple[dict[str, int], list[str]]:
    """Every ``train|val/<class>/<image>`` under an ImageFolder root on object storage."""
    files = dict(image_objects(loc))
    has_train = any(rel.startswith("train/") for rel in files)
    return files, ([] if has_train else ["train/<class>/*.png|jpg"])


def _cached_mirror(cache: Path, public: str) -> bool:
    """True when ``cache`` holds a complete earlier mirror of ``public`` (every file, its size)."""
    try:
        record = json.loads((cache / _MIRROR_MANIFEST).read_text())
        if record.get("uri") != public:
            return False
        return all(
            (cache / rel).is_file() and (cache / rel).stat().st_size == size
            for rel, size in record["files"].items()
        )
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock on ``cache`` among the processes of this machine (no-op without fcntl)."""
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(cache / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_object(loc: Any, rel: str, size: int, dest: Path, name: str, public: str) -> None:
    """Copy one object to ``dest`` through a temporary sibling renamed only once complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        written = 0
        with loc.fs.open_input_stream(loc.path(rel)) as src, open(tmp, "wb") as dst:
            while True:
                chunk = src.read(_COPY_CHUNK)
                if not chunk:
                    break
                dst.write(chunk)
                written += len(chunk)
        if written != size:
            raise DataError(
                f"{name}: data.root '{public}': '{rel}' changed while it was copied "
                f"({written} of {size} bytes): run the job again"
            )
        os.replace(tmp, dest)
    except RaykfeError:
        tmp.unlink(missing_ok=True)
        raise
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            raise DataError(
                f"{name}: cannot copy '{rel}' from data.root '{public}': {_first_line(exc)} "
                "(check the URI, the endpoint and the credentials)"
            ) from None
        raise


def _mirror_remote_root(name: str, uri: str) -> str:
    """Mirror the files ``name``'s loader needs from ``uri`` into the local cache; its path.

    File by file, each written atomically; a file already cached with the remote size is not
    copied again. When the remote cannot be listed or lacks files, a complete earlier mirror of the
    same URI is used (with a warning); otherwise a one-line :class:`DataError`.
    """
    from raykfe.storage import open_uri

    _refuse_secrets(name, uri)
    public = _public_uri(uri)
    cache = data_cache_dir(uri)
    if name in ("cifar10", "cifar100"):
        folder_name = _cifar_files(name)[0]
        what = f"the extracted '{folder_name}' folder (or its files)"
    else:
        what = "an ImageFolder tree train/<class>/*.png|jpg (and optionally val/<class>/...)"
    try:
        loc = open_uri(uri)
        files, missing = _remote_cifar(name, loc) if name != "imagefolder" else _remote_imagefolder(loc)
        problem = f"missing {', '.join(missing)}" if missing else ""
        if name != "imagefolder" and not files:
            problem = f"no '{_cifar_files(name)[0]}' folder or files there"
    except Exception as exc:  # StorageError, or pyarrow's OSError / ArrowException
        files, problem = {}, f"cannot be listed: {_first_line(exc)}"
    if not problem:
        with _cache_lock(cache):  # the Train workers of one node copy each file once, not once each
            for rel, size in sorted(files.items()):
                dest = cache / rel
                if not (dest.is_file() and dest.stat().st_size == size):
                    _copy_object(loc, rel, size, dest, name, public)
            if name == "imagefolder":  # images deleted on the remote leave the mirror too
                for split in ("train", "val"):
                    for path in (cache / split).glob("*/*") if (cache / split).is_dir() else ():
                        rel = path.relative_to(cache).as_posix()
                        if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES and rel not in files:
                            path.unlink(missing_ok=True)
            record = {"uri": public, "files": dict(sorted(files.items()))}
            _write_atomic(cache / _MIRROR_MANIFEST, json.dumps(record, indent=1).encode())
        return str(cache)
    if _cached_mirror(cache, public):
        _log.warning("raykfe: data.root '%s' %s; using the earlier copy in %s", public, problem, cache)
        return str(cache)
    if problem.startswith("cannot"):
        raise DataError(
            f"{name}: data.root '{public}' {problem}: check the URI, the endpoint and the credentials "
            "(AWS_* / GOOGLE_APPLICATION_CREDENTIALS in the environment)"
        )
    raise DataError(
        f"{name} data not found at data.root '{public}' ({problem}): put {what} there "
        "(raykfe never downloads data)"
    )


_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "parquet", "synthetic")


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_data`."""
    return list(_DATASETS)


def load_data(
    name: str,
    *,
    root: str | None = None,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    augment: bool = False,
    synthetic_size: int = 512,
    num_classes: int | None = None,
    access: str = "stream",
    workers: int = 0,
) -> DataSplits:
    """Load a dataset and split it into train / val / test (see the module docstring).

    ``test_fraction`` applies only where the test set is carved out (digits, synthetic,
    imagefolder / parquet without a val set); ``num_classes`` sets the class count of ``synthetic``
    and is checked against the data elsewhere. ``access`` (an object-storage root only): ``"stream"``
    reads what is needed from the bucket, ``"mirror"`` copies the files into the local cache first
    (not for ``parquet``). ``workers``: DataLoader processes that :func:`make_loader` (and the Ray
    Train workers) use for these splits, recorded on each split as ``workers``.

    Raises:
        ConfigError: unknown name or invalid argument.
        DataError: missing or unreadable data, or an empty split.
    """
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {', '.join(_DATASETS)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    _check_fractions(val_fraction, test_fraction)
    if access not in ("stream", "mirror"):
        raise ConfigError(f"data.access={access!r} is invalid: use stream or mirror")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.workers={workers!r} is invalid: use 0 (load in the main process) or more processes")
    seed = int(seed)
    splits = _load(
        name, root=root, image_size=image_size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        augment=augment, synthetic_size=synthetic_size, num_classes=num_classes, access=access,
    )
    for split in (splits.train, splits.val, splits.test):
        split.workers = workers
    return splits


def _load(
    name: str, *, root: Any, image_size: int, seed: int, val_fraction: float, test_fraction: float, augment: bool,
    synthetic_size: int, num_classes: int | None, access: str,
) -> DataSplits:
    """:func:`load_data` after its argument checks."""
    if name == "digits":
        _check_num_classes(name, num_classes, 10)
        return _load_digits(
            image_size,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            shift=2 if augment else 0,
        )
    if name == "synthetic":
        return _load_synthetic(
            image_size,
            synthetic_size,
            10 if num_classes is None else num_classes,
            seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            shift=2 if augment else 0,
        )
    if name in ("cifar10", "cifar100", "imagefolder") and is_remote_root(root) and access == "mirror":
        root = _mirror_remote_root(name, root)
    if name == "parquet":
        return _load_parquet(
            root, image_size=image_size, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
            augment=augment, num_classes=num_classes,
        )
    if name in ("cifar10", "cifar100"):
        return _load_cifar(
            name,
            root,
            image_size=image_size,
            seed=seed,
            val_fraction=val_fraction,
            augment=augment,
            num_classes=num_classes,
        )
    return _load_imagefolder(
        root,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        augment=augment,
        num_classes=num_classes,
    )


def loader_options(dataset: Dataset, workers: int | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for reading ``dataset`` with ``workers`` processes (default: the
    ``workers`` the dataset was loaded with, ``data.workers``).

    Workers of an object-storage dataset start with ``forkserver``: pyarrow's S3 client is not
    fork-safe, and a forked copy of a process that has used it can hang. Each worker opens its own
    filesystem (:class:`raykfe.stream.Source`). Workers persist across epochs (starting them costs
    seconds: torch is imported once per worker).
    """
    if workers is None:
        workers = int(getattr(dataset, "workers", 0) or 0)
    if workers <= 0:
        return {"num_workers": 0}
    opts: dict[str, Any] = {"num_workers": workers, "persistent_workers": True, "prefetch_factor": 4}
    if _is_remote_dataset(dataset):
        import multiprocessing

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "raykfe.data"])
        opts["multiprocessing_context"] = ctx
    return opts


def _is_remote_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` (or the dataset a subset wraps) reads from object storage."""
    while dataset is not None:
        if getattr(dataset, "remote", False):
            return True
        inner = getattr(dataset, "base", None)
        dataset = inner if inner is not None else getattr(dataset, "dataset", None)
    return False


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    workers: int | None = None,
) -> DataLoader:
    """A DataLoader; shuffling is driven by a generator seeded with ``seed``. ``workers`` decode
    processes (default: the dataset's ``workers``, i.e. ``data.workers``; 0 reads in this process),
    see :func:`loader_options`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        drop_last=drop_last,
        **loader_options(dataset, workers),
    )


def job_splits(data, seed: int) -> DataSplits:
    """The splits a job's ``data`` section (:class:`raykfe.config.DataConfig`) describes, for its seed."""
    return load_data(
        data.name, root=data.root, image_size=data.image_size, seed=seed, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, augment=data.augment, synthetic_size=data.synthetic_size,
        num_classes=data.num_classes, access=data.access, workers=data.workers,
    )
