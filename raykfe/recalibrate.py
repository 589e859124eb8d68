"""BatchNorm recalibration after surgery (ALGORITHMS.md section 10): exact running statistics of
the pruned model, no weight touched.

Pruning changes what reaches every BatchNorm after a pruned layer, so the running mean / variance
a base model stored are stale, and in eval mode the pruned model normalises with the wrong
statistics (one fine-tuning epoch at momentum 0.1 leaves them ~10% stale). Recalibration
re-estimates them:

* every BatchNorm's input is summed over ``R`` batches of training data, per channel:
  ``count``, ``sum x`` and ``sum x^2`` in float64 (:func:`bn_sums`, a registered statistic, so the
  sums of shards add and could be all-reduced across Train workers like the factor statistics);
* during the pass the BatchNorm layers run in TRAIN mode (each normalises with its batch's own
  statistics, as in training, so a layer's input does not depend on the stale statistics of the
  layers before it) and everything else in eval mode (no dropout); no gradient is computed;
* then ``running_mean = sum / count`` and ``running_var = (sum x^2 - count mean^2) / (count - 1)``
  (unbiased, as PyTorch keeps it), ``num_batches_tracked`` is left as it was, and each layer's
  momentum and the model's train/eval modes are restored (:func:`apply_bn_sums`).

That is the exact mean / unbiased variance over the ``R`` batches, not PyTorch's cumulative
average of per-batch variances (``momentum=None``), which misses the spread of the batch means.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import ConfigError
from .methods import register_statistic

__all__ = ["bn_sums", "apply_bn_sums", "recalibrate", "batchnorms"]

_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """The BatchNorm layers that keep running statistics, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BN) and m.track_running_stats}


@register_statistic("bn")
@torch.no_grad()
def bn_sums(model: nn.Module, batches: Iterable, spec: dict | None = None, *, fisher: str = "true", seed: int = 0,
            max_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per BatchNorm ``{name::count [1], name::sum [C], name::sumsq [C]}`` (float64) of its input
    over ``batches`` (at most ``spec["batches"]`` or ``max_batches``), BatchNorms in train mode."""
    spec = spec or {}
    limit = spec.get("batches", max_batches)
    layers = batchnorms(model)
    sums = {n: [torch.zeros(1, dtype=torch.float64), None, None] for n in layers}

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0].detach().to(torch.float64)
            x = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, N * spatial]
            acc = sums[name]
            acc[0] += x.shape[1]
            s, q = x.sum(dim=1).cpu(), x.square().sum(dim=1).cpu()
            acc[1] = s if acc[1] is None else acc[1] + s
            acc[2] = q if acc[2] is None else acc[2] + q
        return fn

    modes = {m: m.training for m in model.modules()}
    saved = {m: [t.clone() for t in m.buffers(recurse=False)] for m in layers.values()}  # train mode updates them
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = small = 0
    try:
        model.eval()
        for m in layers.values():
            m.train()
        for b, batch in enumerate(batches):
            if limit is not None and b >= limit:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if x.shape[0] < 2:
                small += 1  # a shard's last batch of one: a BatchNorm in train mode cannot normalise it
                continue
            model(x.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, was in modes.items():
            m.train(was)
        for m, bufs in saved.items():
            for t, old in zip(m.buffers(recurse=False), bufs):
                t.copy_(old)
    if layers and not seen:
        if small:
            raise ConfigError("BatchNorm recalibration needs batches of at least 2 examples: raise stats.batch_size")
        raise ConfigError("no batch was given for BatchNorm recalibration: the data is empty")
    out: dict[str, torch.Tensor] = {}
    for n, (c, s, q) in sums.items():
        if s is None:
            continue  # a BatchNorm the forward never reached keeps its statistics
        out[f"{n}::count"], out[f"{n}::sum"], out[f"{n}::sumsq"] = c, s, q
    return out


@torch.no_grad()
def apply_bn_sums(model: nn.Module, sums: Mapping[str, torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics from :func:`bn_sums` (of this model); returns how
    many layers were recalibrated. A layer that saw fewer than 2 values keeps its statistics."""
    done = 0
    for name, m in batchnorms(model).items():
        if f"{name}::count" not in sums:
            continue
        count = float(sums[f"{name}::count"].reshape(-1)[0])
        if count < 2:
            continue
        mean = sums[f"{name}::sum"].to(torch.float64) / count
        var = (sums[f"{name}::sumsq"].to(torch.float64) - count * mean.square()) / (count - 1)
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.clamp_min(0.0).to(m.running_var.dtype))
        done += 1
    return done


def recalibrate(model: nn.Module, batches: Iterable, n_batches: int) -> int:
    """Re-estimate ``model``'s BatchNorm running statistics in place from ``n_batches`` batches
    (``(x, ...)`` or ``x``); weights untouched. Returns the number of layers recalibrated."""
    if n_batches < 1:
        raise ConfigError(f"recalibrate_batches={n_batches} must be >= 1 (0 turns recalibration off)")
    return apply_bn_sums(model, bn_sums(model, batches, {"batches": n_batches}))
