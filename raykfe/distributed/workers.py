"""Ray Train worker functions (each runs on every Train worker; rank 0 is the chief).

* :func:`stats_worker` -- each worker reads its own shard (rank r: the r-th contiguous slice),
  accumulates (sum, count) statistics, all-reduces them in buckets, and the chief stores them.
  Fisher labels are drawn per example index (:func:`raykfe.capture.example_uniforms`), so the
  merged statistics equal the single-process ones whatever the number of workers, and a restarted
  worker redraws the same labels.
* :func:`train_worker` -- data-parallel SGD (DDP via ``ray.train.torch.prepare_model``): every
  epoch each worker takes an equal slice of a seeded permutation, the chief validates, checkpoints
  under the job's stage store and every worker reports the epoch's metrics. A restarted worker
  group resumes from the newest checkpoint; ``stages/<stage>.attempts.json`` lists the epoch after
  which each attempt started.

A test-only fault can be injected through ``config["fault"]`` (set by the driver from the
``RAYKFE_FAULT_INJECT`` environment variable, ``stage:rank:after:marker-file``): the worker of that
rank exits hard once, after ``after`` batches (stats) or epochs (training).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import ray
import ray.train
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..capture import collect_factors
from ..config import TrainConfig, config_from_dict
from ..factors import stats_to_tensors
from ..stages import StageStore
from ..data import loader_options
from ..storage import open_uri
from ..stream import block_order, import_listings, worker_local_order
from .collective import allreduce_stats, allreduce_tensors

__all__ = ["stats_worker", "measure_worker", "train_worker", "IndexedSubset", "ShardSampler", "peak_rss_mb"]


class IndexedSubset(Dataset):
    """``base[indices[i]]`` as ``(x, y, global index)``; a batch is fetched with the base's
    ``__getitems__`` when it has one (concurrent object reads)."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[self.indices[i]]
        return x, y, self.indices[i]

    def __getitems__(self, idx: list[int]):
        chosen = [self.indices[i] for i in idx]
        many = getattr(self.base, "__getitems__", None)
        items = many(chosen) if many is not None else [self.base[j] for j in chosen]
        return [(x, y, j) for (x, y), j in zip(items, chosen)]


class ShardSampler(Sampler):
    """Per epoch, a seeded permutation of ``n`` examples; rank r takes slice r of ``world`` equal ones.

    With ``blocks`` (the storage block - parquet row group - of each example) the permutation
    visits blocks in a random order and each block's examples together (:func:`raykfe.stream.
    block_order`), and with ``batch`` and ``workers`` > 1 each DataLoader worker gets one contiguous
    run of the rank's slice (:func:`raykfe.stream.worker_local_order`): every row group is read
    about once per epoch instead of once per rank and DataLoader worker.
    """

    def __init__(
        self, n: int, rank: int, world: int, seed: int, *, blocks: torch.Tensor | None = None, batch: int = 1,
        workers: int = 0,
    ) -> None:
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0
        self.blocks, self.batch, self.workers = blocks, batch, workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        per = self.n // self.world
        if self.blocks is None:
            perm = torch.randperm(self.n, generator=gen)
            return iter(perm[self.rank * per:(self.rank + 1) * per].tolist())
        order = block_order(self.blocks.numpy(), gen)[self.rank * per:(self.rank + 1) * per]
        return iter(worker_local_order(order.tolist(), self.batch, self.workers))


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _maybe_fail(fault: dict | None, stage: str, rank: int, step: int) -> None:
    if not fault or fault.get("stage") != stage or int(fault.get("rank", -1)) != rank or step != int(fault.get("after", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed {stage} rank {rank} after {step}\n")
    os._exit(1)


def _setup(config: dict):
    from ..pipeline import ModelRecipe, data_splits

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    model = ModelRecipe(**config["recipe"]).build()
    model.load_state_dict(ray.get(config["state"]))
    if config.get("listings") is not None:  # the driver's listing of the data root: not listed again
        import_listings(ray.get(config["listings"]))
    return cfg, rank, world, model, data_splits(cfg)


def _shard_batches(cfg, rank: int, world: int, splits, fault: dict | None, stage: str):
    """This worker's shard of the statistics data, as batches: of the first ``n`` training examples
    (``n`` capped by ``stats.max_batches``; nothing beyond them is read), rank r takes the r-th of
    ``world`` contiguous slices, so that a sharded store is read in runs, each row group by one rank.
    The statistics are sums, so the split does not change them."""
    n = len(splits.train)
    if cfg.stats.max_batches is not None:
        n = min(n, cfg.stats.max_batches * cfg.stats.batch_size)
    workers = int(getattr(splits.train, "workers", 0) or 0)
    order = worker_local_order(range(rank * n // world, (rank + 1) * n // world), cfg.stats.batch_size, workers)
    subset = IndexedSubset(splits.train, order)
    loader = DataLoader(subset, batch_size=cfg.stats.batch_size, shuffle=False, **loader_options(subset, workers))
    for b, batch in enumerate(loader):
        _maybe_fail(fault, stage, rank, b)
        yield batch


def stats_worker(config: dict) -> None:
    cfg, rank, world, model, splits = _setup(config)
    device = ray.train.torch.get_device()
    model.to(device)
    stage = config.get("stage", "stats")
    t0 = time.perf_counter()
    stats = collect_factors(
        model, _shard_batches(cfg, rank, world, splits, config.get("fault"), "stats"), fisher=cfg.stats.fisher,
        conv_mode=config.get("conv_mode") or cfg.stats.conv_mode, seed=cfg.seed, layers=config["layers"], progress=False,
    )
    seconds = time.perf_counter() - t0
    examples = stats[config["layers"][0]].count
    t0 = time.perf_counter()
    allreduce_stats(stats, bucket_bytes=cfg.ray.bucket_mb << 20, device=device if device.type == "cuda" else None)
    store = StageStore(open_uri(cfg.output.uri))
    store.save_text(f"{stage}.worker-{rank}.json", json.dumps({
        "rank": rank, "world": world, "examples": examples, "pass_seconds": seconds,
        "allreduce_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
    }))
    if rank == 0:
        store.save(stage, *stats_to_tensors(stats))
        if cfg.progress:
            print(f"[{stage}] {stats[config['layers'][0]].count} examples on {world} workers, "
                  f"{len(stats)} layers, pass {seconds:.1f} s", flush=True)
    ray.train.report({"layers": len(stats), "examples": stats[config["layers"][0]].count})


def measure_worker(config: dict) -> None:
    """The parameter-coordinate methods' statistics (:func:`raykfe.measure.measure`) of this
    worker's shard, all-reduced by summation; the chief stores them as stage ``config["stage"]``."""
    from ..measure import measure

    cfg, rank, world, model, splits = _setup(config)
    device = ray.train.torch.get_device()
    model.to(device)
    stage = config["stage"]
    t0 = time.perf_counter()
    sums = measure(
        config["kind"], model, _shard_batches(cfg, rank, world, splits, config.get("fault"), "stats"), config["spec"],
        fisher=cfg.stats.fisher, seed=cfg.seed,
    )
    seconds = time.perf_counter() - t0
    sums = allreduce_tensors(sums, bucket_bytes=cfg.ray.bucket_mb << 20, device=device if device.type == "cuda" else None)
    if rank == 0:
        StageStore(open_uri(cfg.output.uri)).save(stage, {k: v.contiguous() for k, v in sums.items()}, {"kind": config["kind"]})
        if cfg.progress:
            print(f"[{stage}] {config['kind']} on {world} workers, pass {seconds:.1f} s", flush=True)
    ray.train.report({"seconds": seconds})


def _report_epoch(record: dict, stage: str, epochs: int, show: bool) -> None:
    """Every worker reports (Ray Train needs equal calls); the chief also prints one line per epoch,
    which reaches the driver's terminal (a tqdm bar does not survive Ray's log forwarding)."""
    if show:
        val = f" val_acc {record['val_acc']:.4f}" if record.get("val_acc") is not None else ""
        print(f"[{stage}] epoch {record['epoch']}/{epochs} loss {record['loss']:.4f}{val} lr {record['lr']:.3g}", flush=True)
    ray.train.report({k: v for k, v in record.items() if v is not None})


def train_worker(config: dict) -> None:
    from ..data import make_loader
    from ..pipeline import run_training

    cfg, rank, world, model, splits = _setup(config)
    stage = config["stage"]
    tcfg = TrainConfig(**{**config["tcfg"], "milestones": tuple(config["tcfg"]["milestones"])})
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    per_worker = max(1, tcfg.batch_size // world)
    workers = int(getattr(splits.train, "workers", 0) or 0)
    sampler = ShardSampler(len(splits.train), rank, world, cfg.seed + (stage == "finetune"),
                           blocks=getattr(splits.train, "blocks", None), batch=per_worker, workers=workers)
    loader = DataLoader(splits.train, batch_size=per_worker, sampler=sampler, drop_last=True,
                        **loader_options(splits.train, workers))
    fault = config.get("fault")
    store = StageStore(open_uri(cfg.output.uri))
    first = []

    def before_epoch(epoch: int) -> None:
        if not first and rank == 0:  # where this attempt starts: after the newest checkpoint's epoch
            first.append(epoch)
            done = json.loads(store.load_text(f"{stage}.attempts.json") or "[]")
            store.save_text(f"{stage}.attempts.json", json.dumps(done + [epoch - 1]))
        _maybe_fail(fault, stage, rank, epoch - 1)
        sampler.set_epoch(epoch)

    run_training(
        model, loader, tcfg, stage, store,
        val_loader=make_loader(splits.val, 256, shuffle=False) if rank == 0 else None,
        device=device, progress=False, chief=rank == 0, before_epoch=before_epoch,
        on_epoch=lambda rec: _report_epoch(rec, stage, tcfg.epochs, rank == 0 and cfg.progress),
        unwrap=lambda m: getattr(m, "module", m), seed=(cfg.seed + (stage == "finetune")) * 1009 + rank,
    )
