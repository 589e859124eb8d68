"""Ray Train worker functions (each runs on every Train worker; rank 0 is the chief).

* :func:`stats_worker` / :func:`measure_worker` -- each worker reads its own shard (rank r: the
  r-th contiguous slice), accumulates (sum, count) statistics, all-reduces them in buckets, and
  the chief leaves them in the backend's inbox (every worker leaves its own figures there too).
  Fisher labels are drawn per example index (:func:`raykfe.capture.example_uniforms`), so the
  merged statistics equal the single-process ones whatever the number of workers, and a restarted
  worker redraws the same labels.
* :func:`train_worker` -- data-parallel SGD (DDP via ``ray.train.torch.prepare_model``): every
  epoch each worker takes an equal slice of a seeded permutation, the chief validates, checkpoints
  under the job's stage store and every worker reports the epoch's metrics; at the end the chief
  leaves the state_dict and the history in the inbox. A restarted worker group resumes from the
  newest checkpoint; ``stages/<stage>.attempts.json`` lists the epoch after which each attempt
  started.

Reliability tests inject worker deaths through :mod:`raykfe.distributed.faults`.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import ray
import ray.train
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..capture import collect_factors
from ..checkpoint import ModelRecipe
from ..data import job_splits, loader_options, make_loader
from ..factors import stats_to_tensors
from ..finetune import TrainSettings, run_training
from ..methods import collect_statistic
from ..stages import StageStore
from ..storage import open_uri
from ..stream import block_order, import_listings, worker_local_order
from .collective import allreduce_stats, allreduce_tensors
from .faults import inject_test_fault

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


def _setup(config: dict):
    ctx = ray.get(config["ctx"])
    tc = ray.train.get_context()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    model = ModelRecipe(**config["recipe"]).build()
    model.load_state_dict(ray.get(config["state"]))
    if config.get("listings") is not None:  # the driver's listing of the data root: not listed again
        import_listings(ray.get(config["listings"]))
    return ctx, tc.get_world_rank(), tc.get_world_size(), model, job_splits(ctx.data, ctx.seed)


def _leave(config: dict, key: str, value) -> None:
    ray.get(config["inbox"].put.remote(key, value))


def _say(config: dict, line: str) -> None:
    """One console line for the user: printed here (the worker's log file) and relayed through the
    inbox to the driver, which prints it once (Ray's own log forwarding is off by default)."""
    print(line, flush=True)
    config["inbox"].say.remote(line)


def _shard_batches(ctx, rank: int, world: int, splits, fault: dict | None, stage: str, max_batches: int | None = None):
    """This worker's shard of the statistics data, as batches: of the first ``n`` training examples
    (``n`` capped by ``max_batches``, else ``stats.max_batches``, times the batch size; nothing
    beyond them is read), rank r takes the r-th of ``world`` contiguous slices, so that a sharded
    store is read in runs, each row group by one rank. The statistics are sums, so the split does
    not change them."""
    s = ctx.stats
    n = len(splits.train)
    cap = max_batches if max_batches is not None else s.max_batches
    if cap is not None:
        n = min(n, cap * s.batch_size)
    workers = int(getattr(splits.train, "workers", 0) or 0)
    order = worker_local_order(range(rank * n // world, (rank + 1) * n // world), s.batch_size, workers)
    subset = IndexedSubset(splits.train, order)
    loader = DataLoader(subset, batch_size=s.batch_size, shuffle=False, **loader_options(subset, workers))
    for b, batch in enumerate(loader):
        inject_test_fault(fault, stage, rank, b)
        yield batch


def _statistics_run(config: dict, compute, reduce, describe: str):
    """The common body of the statistics workers: this rank's shard -> ``compute(model, batches,
    ctx)`` -> ``reduce`` (all-reduce of the sums) -> the chief leaves the result; every worker
    leaves its figures and reports once (Ray Train needs equal calls)."""
    ctx, rank, world, model, splits = _setup(config)
    device = ray.train.torch.get_device()
    model.to(device)
    stage = config["stage"]
    t0 = time.perf_counter()
    shard = _shard_batches(ctx, rank, world, splits, config.get("fault"), stage, config.get("max_batches"))
    result, examples = compute(model, shard, ctx)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = reduce(result, config["bucket_mb"] << 20, device if device.type == "cuda" else None)
    _leave(config, f"{stage}.worker-{rank}", {"rank": rank, "world": world, "examples": examples, "pass_seconds": seconds,
                                            "allreduce_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    if rank == 0:
        _leave(config, stage, result)
        if ctx.progress:
            _say(config, f"[{stage}] {describe} on {world} workers, pass {seconds:.1f} s")
    ray.train.report({"seconds": seconds})


def stats_worker(config: dict) -> None:
    """K-FAC statistics of ``config["layers"]`` on this worker's shard, all-reduced (triangles)."""

    def compute(model, batches, ctx):
        stats = collect_factors(model, batches, fisher=ctx.stats.fisher, conv_mode=config["conv_mode"], seed=ctx.seed,
                                layers=config["layers"], progress=False)
        return stats, next(iter(stats.values())).count

    def reduce(stats, bucket_bytes, device):
        allreduce_stats(stats, bucket_bytes=bucket_bytes, device=device)
        return stats_to_tensors(stats)

    _statistics_run(config, compute, reduce, f"K-FAC statistics of {len(config['layers'])} layers")


def measure_worker(config: dict) -> None:
    """A registered statistic (:func:`raykfe.methods.collect_statistic`) of this worker's shard,
    all-reduced by summation."""

    def compute(model, batches, ctx):
        sums = collect_statistic(config["kind"], model, batches, config["spec"], fisher=ctx.stats.fisher, seed=ctx.seed)
        return sums, int(sums["count"].reshape(-1)[0].item()) if "count" in sums else None

    def reduce(sums, bucket_bytes, device):
        return {k: v.contiguous() for k, v in allreduce_tensors(sums, bucket_bytes=bucket_bytes, device=device).items()}

    config = {**config, "max_batches": config["spec"].get("batches")}  # e.g. BatchNorm recalibration's batches in all
    _statistics_run(config, compute, reduce, f"{config['kind']} statistics")


def _report_epoch(config: dict, record: dict, stage: str, epochs: int, show: bool) -> None:
    """Every worker reports (Ray Train needs equal calls); the chief also says one line per epoch,
    which the driver prints (:func:`_say`)."""
    if show:
        val = f" val_acc {record['val_acc']:.4f}" if record.get("val_acc") is not None else ""
        _say(config, f"[{stage}] epoch {record['epoch']}/{epochs} loss {record['loss']:.4f}{val} lr {record['lr']:.3g}")
    ray.train.report({k: v for k, v in record.items() if v is not None})


def train_worker(config: dict) -> None:
    ctx, rank, world, model, splits = _setup(config)
    stage = config["stage"]
    settings = TrainSettings(**config["train"])
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    per_worker = max(1, settings.batch_size // world)
    workers = int(getattr(splits.train, "workers", 0) or 0)
    seed = ctx.seed + (stage == "finetune")
    sampler = ShardSampler(len(splits.train), rank, world, seed, blocks=getattr(splits.train, "blocks", None),
                           batch=per_worker, workers=workers)
    loader = DataLoader(splits.train, batch_size=per_worker, sampler=sampler, drop_last=True,
                        **loader_options(splits.train, workers))
    store = StageStore(open_uri(ctx.store_uri))
    first = []

    def before_epoch(epoch: int) -> None:
        if not first and rank == 0:  # where this attempt starts: after the newest checkpoint's epoch
            first.append(epoch)
            done = json.loads(store.load_text(f"{stage}.attempts.json") or "[]")
            store.save_text(f"{stage}.attempts.json", json.dumps(done + [epoch - 1]))
        inject_test_fault(config.get("fault"), stage, rank, epoch - 1)
        sampler.set_epoch(epoch)

    unwrap = lambda m: getattr(m, "module", m)  # noqa: E731
    history = run_training(
        model, loader, settings, stage, store,
        val_loader=make_loader(splits.val, 256, shuffle=False) if rank == 0 else None,
        device=device, progress=False, chief=rank == 0, before_epoch=before_epoch,
        on_epoch=lambda rec: _report_epoch(config, rec, stage, settings.epochs, rank == 0 and ctx.progress),
        unwrap=unwrap, seed=seed * 1009 + rank,
    )
    if rank == 0:
        _leave(config, stage, ({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, history))
