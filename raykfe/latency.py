"""Inference latency of a model on this machine: the median of timed eval-mode forward passes.

CPU figures use the threads torch has (set ``threads`` to pin them); on a GPU the device is
synchronised around every pass. Reported in milliseconds per batch.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["latency_ms"]


@torch.no_grad()
def latency_ms(
    model: nn.Module, example_input: torch.Tensor, *, batch: int = 1, repeats: int = 20, warmup: int = 3,
    threads: int | None = None,
) -> float:
    """Median milliseconds of one forward pass on a batch of ``batch`` copies of ``example_input[:1]``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input[:1].to(device).expand(batch, *example_input.shape[1:]).contiguous()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(max(1, repeats)):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(1000.0 * (time.perf_counter() - t0))
    finally:
        model.train(was_training)
        torch.set_num_threads(before)
    return statistics.median(times)
