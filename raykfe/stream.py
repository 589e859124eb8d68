"""Streaming image data: ImageFolder trees and parquet shards read where they lie (a local directory
or object storage) as the loader needs them, never copied whole to disk.

Roots
-----
A root is a local directory or an ``s3://`` / ``gs://`` URI with the rules of
:mod:`raykfe.storage` (S3-compatible servers: ``?endpoint_override=http://host:port&scheme=http&
region=...``; credentials from the environment only). A :class:`Source` holds nothing but the URI:
every process (the driver, a Ray Train worker, a DataLoader worker) opens its own filesystem the
first time it reads, because pyarrow's S3 client is not fork-safe and must never be inherited
through ``fork``. :func:`loader_options` therefore starts the DataLoader workers of an object-storage
dataset with ``forkserver``.

Layouts
-------
ImageFolder
    ``root/train/<class>/<image>.png|jpg|jpeg`` and optionally ``root/val/<class>/...``. Each image
    is one object, fetched with one GET when an example is needed; a batch's objects are fetched by
    a thread pool of :data:`IO_THREADS` per process (``Dataset.__getitems__``), so latency overlaps.
Parquet shards
    ``root/train-*.parquet`` and optionally ``root/val-*.parquet`` (lexical order of the names is
    the order of the examples). Columns: ``image`` (the encoded PNG / JPEG bytes, or a struct with
    a ``bytes`` field as written by Hugging Face ``datasets``) and ``label`` (integer class index);
    optionally ``path`` (where the image came from, used in error messages). The class names may be
    given as a JSON list in the schema metadata key ``raykfe.classes``. :func:`write_parquet_shards`
    writes this layout from an ImageFolder tree, shuffled with a seed so that every row group (and
    every prefix, which a capped statistics pass reads) mixes the classes. Reading is by row group:
    one ranged read per (image column, row group), kept in a small per-process cache
    (:data:`GROUP_CACHE`), and each example carries its row group in ``blocks`` so that samplers can
    keep a worker's reads within few row groups.

Listings
--------
Listing a bucket of 1.3M objects takes minutes of sequential LIST calls, so a root is listed (or its
parquet footers and label columns read) once per process and kept, keyed by the root's public URI
(:func:`export_listings` / :func:`import_listings` hand a driver's listings to Ray Train workers).
A process therefore sees the objects that existed when it first listed; an object deleted since is
an unreadable-image error naming it.
"""

from __future__ import annotations

import collections
import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataError, RaykfeError

__all__ = [
    "Source",
    "ShardIndex",
    "OPENED",
    "IO_THREADS",
    "GROUP_CACHE",
    "list_image_tree",
    "read_shard_index",
    "write_parquet_shards",
    "export_listings",
    "import_listings",
    "clear_listings",
    "block_order",
    "worker_local_order",
    "decode_image",
]

IO_THREADS = 16  # concurrent object reads per process (network latency, not CPU, is the limit)
GROUP_CACHE = 4  # row groups (their encoded image bytes) kept per process
_PARQUET_FILES = 64  # open parquet files (their footers) kept per process
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLASSES_KEY = b"raykfe.classes"

#: objects (and parquet row groups, as ``file#rg<i>``) read by this process; tests count reads
OPENED: collections.Counter[str] = collections.Counter()

_lock = threading.Lock()
_locations: dict[tuple[int, str], Any] = {}
_listings: dict[tuple[str, str], Any] = {}
_pools: dict[int, ThreadPoolExecutor] = {}
_parquet_files: collections.OrderedDict = collections.OrderedDict()
_groups: collections.OrderedDict = collections.OrderedDict()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _pool() -> ThreadPoolExecutor:
    """This process's I/O thread pool (a forked child makes its own)."""
    pid = os.getpid()
    with _lock:
        pool = _pools.get(pid)
        if pool is None:
            pool = _pools[pid] = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="raykfe-io")
        return pool


class Source:
    """A data root (local directory or object-storage URI) that opens its filesystem lazily, once
    per process. Pickles as its URI, so DataLoader workers and Ray workers rebuild it.

    ``public`` is the URI without secrets, the only form used in messages.
    """

    def __init__(self, uri: str, public: str, *, remote: bool) -> None:
        self.uri, self.public, self.remote = uri, public, remote

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "public": self.public, "remote": self.remote}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def location(self):
        """This process's :class:`raykfe.storage.Location` of the root."""
        from .storage import open_uri

        key = (os.getpid(), self.uri)
        loc = _locations.get(key)
        if loc is None:
            loc = _locations[key] = open_uri(self.uri)
        return loc

    def name(self, rel: str) -> str:
        """``rel`` as users see it: ``<public root>/<rel>``."""
        return f"{self.public.split('?')[0].rstrip('/')}/{rel}"

    def read(self, rel: str) -> bytes:
        """The bytes of object ``rel``; a one-line :class:`DataError` naming it when unreadable."""
        OPENED[rel] += 1
        try:
            loc = self.location()
            with loc.fs.open_input_file(loc.path(rel)) as f:  # one GET for the whole object
                return f.read()
        except Exception as exc:  # FileNotFoundError / OSError / ArrowException / StorageError
            raise DataError(
                f"cannot read image '{self.name(rel)}' under data.root ({_first_line(exc)}): "
                "restore or remove the object, or check the endpoint and the credentials"
            ) from None

    def parquet(self, rel: str):
        """An open ``pyarrow.parquet.ParquetFile`` for shard ``rel`` (footer read once per process)."""
        import pyarrow.parquet as pq

        key = (os.getpid(), self.uri, rel)
        with _lock:
            pf = _parquet_files.get(key)
            if pf is not None:
                _parquet_files.move_to_end(key)
                return pf
        loc = self.location()
        pf = pq.ParquetFile(loc.fs.open_input_file(loc.path(rel)))
        with _lock:
            _parquet_files[key] = pf
            while len(_parquet_files) > _PARQUET_FILES:
                _parquet_files.popitem(last=False)
        return pf


# --------------------------------------------------------------------------- listings (cached)


def export_listings() -> dict:
    """This process's listings, to hand to other processes (:func:`import_listings`)."""
    return dict(_listings)


def import_listings(listings: dict | None) -> None:
    """Adopt listings made by another process (e.g. the driver's, in a Ray Train worker)."""
    if listings:
        for key, value in listings.items():
            _listings.setdefault(key, value)


def clear_listings() -> None:
    """Forget every listing (the next load lists again)."""
    _listings.clear()


def list_image_tree(source: Source) -> dict[str, dict[str, list[str]]]:
    """``{"train"|"val": {class: sorted relative keys}}`` of an ImageFolder tree on object storage.

    One recursive listing per split, cached per process by the root's public URI. Only
    ``<split>/<class>/<file>`` with an image suffix counts, as for a local tree.
    """
    key = ("imagefolder", source.public)
    if key in _listings:
        return _listings[key]
    tree: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for rel, _ in image_objects(source.location()):
        split, cls, _ = rel.split("/")
        tree[split].setdefault(cls, []).append(rel)
    tree = {split: {c: sorted(keys) for c, keys in sorted(classes.items())} for split, classes in tree.items()}
    _listings[key] = tree
    return tree


def image_objects(loc: Any) -> Iterator[tuple[str, int]]:
    """``(relative key, size)`` of every ``train|val/<class>/<image>`` object under the location
    of an ImageFolder root on object storage: one recursive listing per split."""
    import pyarrow.fs as pafs

    prefix = f"{loc.root}/" if loc.root else ""
    for split in ("train", "val"):
        selector = pafs.FileSelector(loc.path(split), recursive=True, allow_not_found=True)
        for info in loc.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.startswith(prefix):
                continue
            rel = info.path[len(prefix):]
            parts = rel.split("/")
            if len(parts) == 3 and Path(parts[2]).suffix.lower() in IMAGE_SUFFIXES:
                yield rel, int(info.size)


@dataclass
class ShardIndex:
    """Where every example of a set of parquet shards lies, and its label.

    ``files``: shard names relative to the root, in order; row group ``g`` is row group
    ``group_rg[g]`` of ``files[group_file[g]]`` and holds rows ``group_start[g]:group_start[g+1]``
    of the concatenation; ``labels`` int64 ``[rows]``; ``image_column`` / ``struct`` say how the
    image bytes are stored; ``classes`` the class names when the shards record them.
    """

    files: list[str]
    group_file: np.ndarray
    group_rg: np.ndarray
    group_start: np.ndarray
    labels: np.ndarray
    image_column: str
    struct: bool
    classes: list[str] | None

    def __len__(self) -> int:
        return int(self.labels.size)

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.group_start, rows, side="right") - 1


def _shard_meta(source: Source, rel: str) -> tuple[list[int], np.ndarray, bool, list[str] | None]:
    """``(rows per row group, labels, image column is a struct, classes)`` of one shard."""
    import pyarrow as pa

    pf = source.parquet(rel)
    schema = pf.schema_arrow
    names = schema.names
    if "image" not in names or "label" not in names:
        raise DataError(
            f"parquet shard '{source.name(rel)}' under data.root has columns {names}, not 'image' and "
            "'label': write the shards with raykfe.stream.write_parquet_shards"
        )
    image_type = schema.field("image").type
    struct = pa.types.is_struct(image_type)
    if struct and image_type.get_field_index("bytes") < 0:
        raise DataError(f"parquet shard '{source.name(rel)}': the struct column 'image' has no 'bytes' field")
    labels = pf.read(columns=["label"]).column("label").to_numpy(zero_copy_only=False)
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise DataError(
            f"parquet shard '{source.name(rel)}' under data.root has labels that are not class indices >= 0"
        )
    meta = schema.metadata or {}
    classes = json.loads(meta[CLASSES_KEY]) if CLASSES_KEY in meta else None
    md = pf.metadata
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)], labels.astype(np.int64), struct, classes


def read_shard_index(source: Source, files: Sequence[str]) -> ShardIndex:
    """The :class:`ShardIndex` of ``files`` under ``source``: footers and label columns only, read
    concurrently, cached per process by (root, files)."""
    key = ("parquet", source.public + "|" + "|".join(files))
    if key in _listings:
        return _listings[key]

    def meta(rel: str):
        try:
            return _shard_meta(source, rel)
        except BaseException as exc:
            _parquet_files.pop((os.getpid(), source.uri, rel), None)  # a rewritten shard is read afresh
            if isinstance(exc, RaykfeError) or not isinstance(exc, Exception):
                raise
            raise DataError(
                f"cannot read parquet shard '{source.name(rel)}' under data.root ({_first_line(exc)}): "
                "rewrite the shard, or check the endpoint and the credentials"
            ) from None

    metas = list(_pool().map(meta, files))
    group_file, group_rg, sizes = [], [], []
    for f, (rows, _, _, _) in enumerate(metas):
        for rg, n in enumerate(rows):
            group_file.append(f)
            group_rg.append(rg)
            sizes.append(n)
    structs = {m[2] for m in metas}
    if len(structs) > 1:
        raise DataError(f"parquet shards under data.root '{source.public}' store 'image' in different types: rewrite them alike")
    classes = next((m[3] for m in metas if m[3] is not None), None)
    index = ShardIndex(
        files=list(files),
        group_file=np.asarray(group_file, dtype=np.int64),
        group_rg=np.asarray(group_rg, dtype=np.int64),
        group_start=np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
        labels=np.concatenate([m[1] for m in metas]) if metas else np.zeros(0, np.int64),
        image_column="image",
        struct=bool(structs.pop()) if structs else False,
        classes=classes,
    )
    _listings[key] = index
    return index


def list_shards(source: Source, split: str) -> list[str]:
    """Sorted ``<split>-*.parquet`` names directly under the root (one listing, cached)."""
    key = ("parquet-files", source.public)
    files = _listings.get(key)
    if files is None:
        import pyarrow.fs as pafs

        loc = source.location()
        prefix = f"{loc.root}/" if loc.root else ""
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.root or "/", recursive=False, allow_not_found=True))
        files = sorted(
            i.path[len(prefix):] for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(prefix) and i.path.endswith(".parquet")
        )
        _listings[key] = files
    return [f for f in files if f.startswith(f"{split}-")]


def group_images(source: Source, index: ShardIndex, g: int) -> list[bytes]:
    """The image bytes of row group ``g`` (read once, kept in a small per-process LRU)."""
    key = (os.getpid(), source.uri, index.files[int(index.group_file[g])], int(index.group_rg[g]))
    with _lock:
        hit = _groups.get(key)
        if hit is not None:
            _groups.move_to_end(key)
            return hit
    rel, rg = key[2], key[3]
    OPENED[f"{rel}#rg{rg}"] += 1
    try:
        col = source.parquet(rel).read_row_group(rg, columns=[index.image_column]).column(0)
        if index.struct:
            col = col.combine_chunks().field("bytes")
        values = col.to_pylist()
    except Exception as exc:
        raise DataError(
            f"cannot read row group {rg} of parquet shard '{source.name(rel)}' under data.root "
            f"({_first_line(exc)}): rewrite the shard, or check the endpoint and the credentials"
        ) from None
    with _lock:
        _groups[key] = values
        while len(_groups) > GROUP_CACHE:
            _groups.popitem(last=False)
    return values


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes | Path, image_size: int, name: str) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` resized (bilinear) to ``image_size`` square; a one-line DataError
    naming ``name`` when the bytes are not an image."""
    from PIL import Image

    if data is None:
        raise DataError(f"image '{name}' has no bytes (a null value): rewrite the shard without it")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
            img = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image '{name}' ({_first_line(exc)}): remove or replace the file") from None


def decode_many(items: Sequence[tuple[Callable[[], bytes | Path], str]], image_size: int) -> list[np.ndarray]:
    """Fetch and decode several images concurrently on this process's I/O threads (fetching waits
    on the network; Pillow releases the GIL while it decodes)."""
    if len(items) <= 1:
        return [decode_image(fetch(), image_size, name) for fetch, name in items]
    return list(_pool().map(lambda item: decode_image(item[0](), image_size, item[1]), items))


# --------------------------------------------------------------------------- orders


def block_order(blocks: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """A seeded order of ``range(len(blocks))`` that visits the blocks (row groups) in a random
    order and the rows of each block contiguously, in a random order: the shuffle of sharded
    readers (shard shuffle + within-shard shuffle, as in WebDataset), which reads each row group
    once per epoch."""
    blocks = np.asarray(blocks)
    uniq, inverse = np.unique(blocks, return_inverse=True)
    block_rank = torch.randperm(len(uniq), generator=gen).numpy()[inverse]
    within = torch.rand(len(blocks), generator=gen, dtype=torch.float64).numpy()
    return np.lexsort((within, block_rank))


def worker_local_order(order: Sequence[int], batch: int, workers: int) -> list[int]:
    """``order`` re-arranged so that DataLoader worker ``w`` (which gets batches ``w, w + workers,
    ...``) receives one contiguous run of ``order``.

    With a plain order, consecutive batches (same row group) go to different workers and every
    worker would read every row group; here each row group is read by (about) one worker. Batch
    sizes and the set of examples are unchanged.
    """
    order = list(order)
    if workers <= 1 or batch < 1:
        return order
    full = len(order) // batch
    rest = len(order) - full * batch
    counts = [len(range(w, full, workers)) for w in range(workers)]  # full batches per worker
    runs, start = [], 0
    for w in range(workers):
        size = counts[w] * batch + (rest if rest and w == full % workers else 0)
        runs.append(order[start:start + size])
        start += size
    out: list[int] = []
    for j in range(full + (1 if rest else 0)):
        w, k = j % workers, j // workers
        out.extend(runs[w][k * batch:(k + 1) * batch])
    return out


# --------------------------------------------------------------------------- writing shards


def write_parquet_shards(
    tree: str | os.PathLike[str],
    dest: str,
    *,
    rows_per_shard: int = 1024,
    rows_per_group: int = 128,
    seed: int = 0,
) -> list[str]:
    """Write a local ImageFolder ``tree`` (``train/<class>/*``, optional ``val/<class>/*``) as
    parquet shards under ``dest`` (a local directory or an object-storage URI); the names written.

    Each split is shuffled with ``seed`` and cut into ``<split>-NNNNN-of-MMMMM.parquet`` files of
    ``rows_per_shard`` rows in row groups of ``rows_per_group``. The image files' bytes are stored
    as they are (no re-encoding); ``label`` is the index of the class in the sorted class names of
    ``train/``, which are also stored in the schema metadata (``raykfe.classes``); ``path`` is the
    image's path relative to ``tree``. (Long: scanning, batching rows and writing each shard
    with its metadata is one sequence.)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .storage import open_uri

    base = Path(tree).expanduser()
    if rows_per_shard < 1 or rows_per_group < 1:
        raise ValueError("rows_per_shard and rows_per_group must be positive")

    def scan(split: str) -> dict[str, list[Path]]:
        folder = base / split
        if not folder.is_dir():
            return {}
        out = {}
        for d in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                out[d.name] = files
        return out

    train = scan("train")
    if not train:
        raise DataError(f"no images under '{base / 'train'}': an ImageFolder tree train/<class>/*.png|jpg is needed")
    classes = sorted(train)
    class_index = {c: i for i, c in enumerate(classes)}
    loc = open_uri(dest)
    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int64()), ("path", pa.string())],
        metadata={CLASSES_KEY: json.dumps(classes).encode()},
    )
    written: list[str] = []
    for split, found in (("train", train), ("val", scan("val"))):
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"classes {', '.join(unknown)} of '{base / split}' are not in '{base / 'train'}'")
        items = [(p, class_index[c]) for c in sorted(found) for p in found[c]]
        if not items:
            continue
        order = np.random.default_rng([seed, 0 if split == "train" else 1]).permutation(len(items))
        n_shards = -(-len(items) // rows_per_shard)
        for s in range(n_shards):
            chunk = [items[i] for i in order[s * rows_per_shard:(s + 1) * rows_per_shard]]
            table = pa.table(
                {
                    "image": [p.read_bytes() for p, _ in chunk],
                    "label": [y for _, y in chunk],
                    "path": [p.relative_to(base).as_posix() for p, _ in chunk],
                },
                schema=schema,
            )
            name = f"{split}-{s:05d}-of-{n_shards:05d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, row_group_size=rows_per_group)
            loc.write_bytes(name, sink.getvalue().to_pybytes())
            written.append(name)
    return written
