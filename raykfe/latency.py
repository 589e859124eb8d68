"""Inference latency of a model on this machine: the median of timed eval-mode forward passes.

CPU figures use the threads torch has (set ``threads`` to pin them); on a GPU the device is
synchronised around every pass. Reported in milliseconds per batch.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["latency_profile", "job_latency"]


@torch.no_grad()
def latency_profile(
    models: dict[str, nn.Module], example_input: torch.Tensor, *, batches=(1, 32), repeats: int = 10,
    threads: int | None = None, gpu: torch.device | str | None = None, warmup: int = 3,
) -> dict[str, dict[str, dict[str, float]]]:
    """``{name: {"cpu": {"1": ms, "32": ms}, "cuda": {...}}}`` for every model: the median of
    ``repeats`` timed eval-mode passes per batch size, on CPU with ``threads`` torch threads and,
    when ``gpu`` is given and CUDA is available, on that GPU. The models' passes are INTERLEAVED
    (base, pruned, base, pruned, ...) so a burst of load on a shared machine hits every model
    alike and their ratio stays meaningful. Models are copied; the originals are not moved."""
    import copy

    targets = [torch.device("cpu")]
    if gpu is not None and torch.device(gpu).type == "cuda" and torch.cuda.is_available():
        targets.append(torch.device(gpu))
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in models}
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        for dev in targets:
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            copies = {name: copy.deepcopy(m).to(dev).eval() for name, m in models.items()}
            for b in batches:
                x = example_input[:1].to(dev).expand(b, *example_input.shape[1:]).contiguous()
                times: dict[str, list[float]] = {name: [] for name in copies}
                for _ in range(warmup):
                    for m in copies.values():
                        m(x)
                for _ in range(max(1, repeats)):
                    for name, m in copies.items():
                        sync()
                        t0 = time.perf_counter()
                        m(x)
                        sync()
                        times[name].append(1000.0 * (time.perf_counter() - t0))
                for name, ts in times.items():
                    out[name].setdefault(dev.type, {})[str(b)] = statistics.median(ts)
    finally:
        torch.set_num_threads(before)
    return out


def job_latency(lc, device: str, base: nn.Module, pruned: nn.Module, example: torch.Tensor, log) -> dict | None:
    """A job's latency figures (``lc``: :class:`raykfe.config.LatencyConfig`): base and pruned at
    ``lc.batches`` on CPU, and on the job's GPU when it runs on one, measured in the driver after
    fine-tuning, the two models interleaved; None with ``lc.repeats == 0``."""
    if lc.repeats == 0:
        return None
    threads = lc.threads or torch.get_num_threads()
    log(f"raykfe: latency of the base and pruned models (batches {', '.join(map(str, lc.batches))}; CPU, {threads} thread(s))")
    gpu = device if device.startswith("cuda") else None
    prof = latency_profile({"base": base, "pruned": pruned}, example, batches=lc.batches, repeats=lc.repeats, threads=threads, gpu=gpu)
    return {"threads": threads, **prof}
