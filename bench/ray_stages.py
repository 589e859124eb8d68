"""Benchmark of the distributed stages (issue 3): statistics with 1 vs 2 Train workers vs the
single-process pass; eigendecomposition of torchvision resnet50's factors (224x224) with k actors vs
sequentially; peak memory of the driver and of one worker.

    .venv/bin/python bench/ray_stages.py [--actors 2] [--resnet50-images 4]

Prints markdown tables; asserts nothing. Start-up overhead of a Ray Train run is measured with an
empty worker function and reported separately: throughput uses the time of the pass inside the
workers (each worker reports it), the wall times include everything.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import torch
import torchvision

from raykfe.capture import collect_factors
from raykfe.config import load_config
from raykfe.distributed.actors import EigenPool
from raykfe.distributed.backend import RayBackend
from raykfe.distributed.cluster import connect
from raykfe.distributed.workers import peak_rss_mb
from raykfe.eigen import eigh_cost, eigenbasis
from raykfe.models import build_model
from raykfe.backend import JobContext, LocalBackend
from raykfe.capture import prunable_layers
from raykfe.checkpoint import ModelRecipe
from raykfe.data import job_splits
from raykfe.finetune import state_of
from raykfe.methods.eigendamage import score_in_basis
from raykfe.report import format_table


def _empty_worker(config):
    ray.train.report({"ok": 1})


def stats_section(workers_list):
    rows, mem = [], []
    tmp = tempfile.mkdtemp()
    cfg = load_config("jobs/digits.yaml", ["progress=false", f"output.uri={tmp}/x"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 10)
    splits = job_splits(cfg.data, cfg.seed)
    adapters, _ = prunable_layers(model, splits.test[0][0][None])
    recipe, state = ModelRecipe(dict(model.raykfe_spec)), state_of(model)
    n = len(splits.train)

    t0 = time.perf_counter()
    local = LocalBackend()
    local.open(JobContext.of(cfg))
    local.kfac(recipe, state, list(adapters), cfg.stats.conv_mode)
    t_local = time.perf_counter() - t0
    rows.append(["single process (no Ray, torch threads %d)" % torch.get_num_threads(), "-", f"{t_local:.2f}", f"{t_local:.2f}", f"{n / t_local:.0f}"])

    for w in workers_list:
        wcfg = load_config("jobs/digits.yaml", ["progress=false", f"output.uri={tmp}/w{w}", f"ray.workers={w}"])
        backend = RayBackend(wcfg)
        backend.open(JobContext.of(wcfg))
        t0 = time.perf_counter()
        backend._fit(_empty_worker, recipe, state, "empty")
        overhead = time.perf_counter() - t0
        t0 = time.perf_counter()
        backend.kfac(recipe, state, list(adapters), wcfg.stats.conv_mode)
        wall = time.perf_counter() - t0
        reps = backend.worker_reports["stats"]
        inner = max(r["pass_seconds"] + r["allreduce_seconds"] for r in reps)
        rows.append([f"Ray Train, {w} worker(s), 1 thread each", f"{overhead:.1f}", f"{wall:.1f}", f"{inner:.2f}", f"{n / inner:.0f}"])
        mem.append([f"Train worker (of {w})", f"{max(r['peak_rss_mb'] for r in reps):.0f}"])
    print(f"### Statistics pass: ResNet32 on the digits train split ({n} examples, 32x32, true Fisher, patch mode)\n")
    print(format_table(["run", "Ray Train start-up (empty fit) s", "wall s", "pass + all-reduce s", "examples / s"], rows, markdown=True))
    print()
    return mem


def eigen_section(k: int, images: int):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
    x = torch.randn(images, 3, 224, 224)
    y = torch.randint(0, 1000, (images,))
    adapters, _ = prunable_layers(model, x[:1])
    stats = collect_factors(model, [(x, y)], layers=list(adapters))
    weights = {n: a.weight_matrix() for n, a in adapters.items()}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same single thread an actor uses
    per_layer = {}
    t_all = time.perf_counter()
    for name, st in stats.items():
        t0 = time.perf_counter()
        score_in_basis(name, weights[name], eigenbasis(name, st))
        per_layer[name] = time.perf_counter() - t0
    sequential = time.perf_counter() - t_all
    torch.set_num_threads(before)
    largest_name = max(per_layer, key=per_layer.get)
    pool = EigenPool(actor_cpus=1.0, max_actors=k)
    t0 = time.perf_counter()
    pool.start(len(stats))
    startup = time.perf_counter() - t0
    stats_refs = {n: ray.put(st) for n, st in stats.items()}  # noqa: F841  (warm the object store)
    t0 = time.perf_counter()
    pool.score(stats, weights)
    wall = time.perf_counter() - t0
    groups = pool.groups
    compute = max(pool.compute_seconds())
    pool.shutdown()
    bound = max(per_layer[largest_name], sequential / k)
    dims = {n: (st.A_sum.shape[0], st.S_sum.shape[0]) for n, st in stats.items()}
    print(f"### Eigen stage: torchvision resnet50 at 224x224, {len(stats)} layers (patch mode, fc excluded)\n")
    print(format_table(["measure", "seconds"], [
        ["sequential, 1 thread (total)", f"{sequential:.2f}"],
        [f"largest single layer ({largest_name}, A {dims[largest_name][0]}, S {dims[largest_name][1]})", f"{per_layer[largest_name]:.2f}"],
        [f"starting {k} actors (once per job; not in the ratio)", f"{startup:.2f}"],
        [f"{k} actors, 1 CPU each (wall, incl. shipping factors and results)", f"{wall:.2f}"],
        [f"  of which the busiest actor computing", f"{compute:.2f}"],
        [f"bound max(largest, total / {k})", f"{bound:.2f}"],
        ["ratio wall / bound (goal <= 1.15)", f"{wall / bound:.2f}"],
        ["ratio busiest actor's compute / bound", f"{compute / bound:.2f}"],
    ], markdown=True))
    costs = [sum(eigh_cost(dims[n]) for n in g) for g in groups]
    print(f"\ncost-model loads per actor (d_in^3 + d_out^3, relative): {[round(c / max(costs), 3) for c in costs]}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--resnet50-images", type=int, default=4)
    args = ap.parse_args()
    connect(None, 4)
    mem = stats_section([1, 2])
    eigen_section(args.actors, args.resnet50_images)
    print("### Peak resident memory\n")
    print(format_table(["process", "peak RSS MiB"], [["driver (this process, incl. resnet50 factors)", f"{peak_rss_mb():.0f}"], *mem], markdown=True))


if __name__ == "__main__":
    main()
