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
    (``cifar-10-batches-py/`` or ``cifar-100-python/``); never downloaded. val = a seeded
    ``val_fraction`` of the official train set, test = the official test set. Standard
    per-channel normalisation. ``augment``: random crop 32 with zero padding 4 + horizontal flip,
    on the train split only.
``imagefolder``
    ``root/train/<class>/*.png|jpg|jpeg`` (required) and ``root/val/<class>/...`` (optional; used
    as the test set when present, otherwise a test split is carved from train). Images are read
    lazily, converted to RGB and resized to ``image_size`` x ``image_size``; ImageNet
    normalisation. val is carved from train. ``augment``: random crop with padding
    ``image_size // 8`` + horizontal flip on train.
``synthetic``
    ``synthetic_size`` examples in ``num_classes`` (default 10) classes; each class is a fixed,
    seeded, low-frequency random pattern, each example that pattern plus Gaussian noise. Split
    like digits. Learnable by a small CNN in a few epochs.

Object storage
--------------
``root`` of ``cifar10`` / ``cifar100`` / ``imagefolder`` may be an ``s3://`` or ``gs://`` URI
(S3-compatible servers: ``?endpoint_override=http://host:port&scheme=http&region=...``; credentials
from the environment, a URI carrying them is refused). The files the loader needs (the CIFAR batches
and meta file, or every ``train|val/<class>/<image>``) are mirrored file by file into a local cache,
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

__all__ = ["DataSplits", "load_data", "make_loader", "list_datasets", "data_cache_dir", "is_remote_root"]

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


class _FileSplit(_SplitBase):
    """Images read lazily from files; RGB, resized to ``image_size``, normalised."""

    def __init__(
        self,
        paths: list[Path],
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        image_size: int,
        augment: bool,
    ) -> None:
        self.paths = paths
        self.labels = labels
        self.indices = indices
        self.image_size = image_size
        self.augment = augment
        self.mean = torch.tensor(_IMAGENET_STATS[0]).view(3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STATS[1]).view(3, 1, 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize(
                    (self.image_size, self.image_size), Image.Resampling.BILINEAR
                )
                arr = np.asarray(img, dtype=np.uint8).copy()  # [H, W, 3]
        except OSError as exc:
            raise DataError(
                f"cannot read image '{path}' ({exc}): remove or replace the file"
            ) from None
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]
        if self.augment:
            x = _crop_flip(x, pad=max(1, self.image_size // 8))
        return (x - self.mean) / self.std, self.labels[i]


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
            f"{name} data not found under '{path}': the folder does not exist; "
            f"put {what} there (raykfe never downloads data)"
        )
    return path


def _read_pickle(path: Path, name: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(
            f"{name} file '{path}' cannot be read ({type(exc).__name__}): "
            "re-extract the official python archive"
        ) from None


def _read_cifar_batches(
    folder: Path, files: list[str], label_key: str, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate pickle batches into uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    datas, labels = [], []
    for fname in files:
        entry = _read_pickle(folder / fname, name)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(entry[label_key], dtype=np.int64)
        except (KeyError, ValueError) as exc:
            raise DataError(
                f"{name} file '{folder / fname}' is not a CIFAR batch ({exc}): "
                "re-extract the official python archive"
            ) from None
        if len(lab) != len(data):
            raise DataError(
                f"{name} file '{folder / fname}' has {len(data)} images but {len(lab)} labels: "
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
    folder_name, train_files, test_files, meta_file = _cifar_files(name)
    label_key, k = ("labels", 10) if name == "cifar10" else ("fine_labels", 100)
    _check_num_classes(name, num_classes, k)
    what = f"the extracted '{folder_name}' folder"
    base = _resolve_root(name, root, what)
    folder = base if (base / train_files[0]).is_file() else base / folder_name
    missing = [f for f in [*train_files, *test_files, meta_file] if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name} data not found under '{base}' (missing {', '.join(missing)}): "
            f"put {what} there (raykfe never downloads data)"
        )
    train_x, train_y = _read_cifar_batches(folder, train_files, label_key, name)
    test_x, test_y = _read_cifar_batches(folder, test_files, label_key, name)
    for split_y in (train_y, test_y):
        if len(split_y) and (int(split_y.min()) < 0 or int(split_y.max()) >= k):
            raise DataError(
                f"{name} labels under '{folder}' fall outside [0, {k}): "
                "re-extract the official python archive"
            )
    parts = _split_indices(train_y.numpy(), {"val": val_fraction}, seed, name)
    if len(test_y) == 0:
        raise DataError(f"{name} test set under '{folder}' is empty: re-extract the archive")
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
    name = "imagefolder"
    what = "train/<class>/*.png|jpg (and optionally val/<class>/...)"
    base = _resolve_root(name, root, what)
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(
            f"imagefolder: no 'train' folder under '{base}': put images in "
            f"'{train_dir}/<class>/*.png|jpg'"
        )
    train_tree = _scan_image_tree(train_dir)
    if not train_tree:
        raise DataError(
            f"imagefolder: no images found under '{train_dir}': put images in "
            f"'{train_dir}/<class>/*.png|jpg'"
        )
    classes = sorted(train_tree)
    _check_num_classes(name, num_classes, len(classes))
    class_index = {c: i for i, c in enumerate(classes)}
    paths = [p for c in classes for p in train_tree[c]]
    labels = np.array([class_index[c] for c in classes for _ in train_tree[c]], dtype=np.int64)

    def make(
        ps: list[Path], ys: np.ndarray, idx: np.ndarray, aug: bool
    ) -> _FileSplit:
        return _FileSplit(
            [ps[i] for i in idx],
            torch.from_numpy(ys[idx].astype(np.int64)),
            torch.from_numpy(idx.astype(np.int64)),
            image_size=image_size,
            augment=aug,
        )

    val_dir = base / "val"
    if val_dir.is_dir():
        test_tree = _scan_image_tree(val_dir)
        unknown = sorted(set(test_tree) - set(classes))
        if unknown:
            raise DataError(
                f"imagefolder: classes {', '.join(unknown)} in '{val_dir}' are not in "
                f"'{train_dir}': use the same class folders in both"
            )
        test_paths = [p for c in classes for p in test_tree.get(c, [])]
        if not test_paths:
            raise DataError(
                f"imagefolder: no images found under '{val_dir}': add images or remove the folder"
            )
        test_labels = np.array(
            [class_index[c] for c in classes for _ in test_tree.get(c, [])], dtype=np.int64
        )
        parts = _split_indices(labels, {"val": val_fraction}, seed, name)
        test = make(test_paths, test_labels, np.arange(len(test_paths)), False)
    else:
        parts = _split_indices(labels, {"test": test_fraction, "val": val_fraction}, seed, name)
        test = make(paths, labels, parts["test"], False)
    return DataSplits(
        train=make(paths, labels, parts["train"], augment),
        val=make(paths, labels, parts["val"], False),
        test=test,
        num_classes=len(classes),
        input_shape=(3, image_size, image_size),
        name=name,
    )


# --------------------------------------------------------------------------- object-storage roots

_REMOTE_SCHEMES = ("s3", "gs", "gcs")
_CACHE_ENV = "RAYKFE_DATA_CACHE"
_DEFAULT_CACHE = "~/.cache/raykfe/data"
_MIRROR_MANIFEST = ".raykfe-mirror.json"
_COPY_CHUNK = 4 << 20  # bytes per read while copying one object
# Query options that would carry a secret (pyarrow accepts access_key / secret_key / session_token)
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature")

_log = logging.getLogger(__name__)


def is_remote_root(root: Any) -> bool:
    """True for an ``s3://`` / ``gs://`` data root (mirrored into the local cache before loading)."""
    return isinstance(root, str) and urlsplit(root).scheme.lower() in _REMOTE_SCHEMES


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
    import pyarrow.fs as pafs

    files: dict[str, int] = {}
    prefix = f"{loc.root}/" if loc.root else ""
    for split in ("train", "val"):
        selector = pafs.FileSelector(loc.path(split), recursive=True, allow_not_found=True)
        for info in loc.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.startswith(prefix):
                continue
            rel = info.path[len(prefix):]
            parts = rel.split("/")
            if len(parts) == 3 and Path(parts[2]).suffix.lower() in _IMAGE_SUFFIXES:
                files[rel] = int(info.size)
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

    if _secret_in(uri):
        raise DataError(
            f"{name}: data.root for bucket '{urlsplit(uri).hostname}' carries credentials: remove them "
            "from the URI and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or "
            "GOOGLE_APPLICATION_CREDENTIALS) in the environment"
        )
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


_DATASETS = ("cifar10", "cifar100", "digits", "imagefolder", "synthetic")


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
) -> DataSplits:
    """Load a dataset and split it into train / val / test (see the module docstring).

    ``test_fraction`` applies only where the test set is carved out (digits, synthetic,
    imagefolder without ``val/``); ``num_classes`` sets the class count of ``synthetic`` and is
    checked against the data elsewhere.

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
    seed = int(seed)

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
    if name in ("cifar10", "cifar100", "imagefolder") and is_remote_root(root):
        root = _mirror_remote_root(name, root)
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


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader; shuffling is driven by a generator seeded with ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=0,
        generator=gen,
        drop_last=drop_last,
    )
