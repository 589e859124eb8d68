"""The EKFAC correction of EigenDamage's scores (George et al., NeurIPS 2018; ALGORITHMS.md s. 10).

In the Kronecker-factored eigenbasis K-FAC's Fisher is diagonal with entries ``l_S[i] l_A[j]``,
products of the factors' eigenvalues. EKFAC keeps the eigenbasis and replaces that diagonal by the
measured second moment of the per-example weight gradients projected into it::

    s_ij = E_n[ (Q_S^T G_n Q_A)_ij^2 ]          scores  dL_ij = 1/2 W'_ij^2 s_ij

with ``G_n`` one example's gradient of ``W~`` (the layer's weights in :mod:`raykfe.layers`'s
layout, the bias as the homogeneous column): ``sum_t Ds_t a_t^T`` for a Linear (over the extra
leading positions) and a conv in full mode; in patch mode ONE such gradient per kernel offset
``kappa`` (``a_t,kappa`` the input pixel, with the constant channel, that offset reads at output
position t), projected and squared per offset: ``W~``, ``s`` and the scores are
``[d_out, d_in, k^2]`` and the scores sum over the offsets, as EigenDamage's do. The labels are
the Fisher's (sampled per example index, or the data's), so ``s`` has the scale of the Fisher
that ``l_S l_A`` approximates and the two kinds of score are interchangeable.

:func:`ekfac_sums` is a registered statistic (``"ekfac"``): a sum over examples of the squares,
plus ``count``, so Ray Train workers all-reduce it like the factor statistics. It needs the
eigenbases, so it is a second pass after the eigendecomposition. Per-example gradients are formed
a chunk of examples at a time (at most ``2**24`` float64 elements, 128 MiB, per chunk).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .capture import StatisticsPass, fisher_labels
from .layers import Adapter, conv_pad, make_adapter
from .methods import register_statistic
from .methods.eigendamage import LayerScores

__all__ = ["ekfac_sums", "per_example_kfe_squares", "rescored"]

F64 = torch.float64
CHUNK_ELEMS = 1 << 24


def _samples(adapter: Adapter, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [N, d_in, K, T], ds [N, d_out, T])``: each example's layer inputs (with the constant
    column of a folded bias) per weight slot K (kernel offsets in patch mode, else 1) and output
    position T, and its output gradients."""
    n = x.shape[0]
    if adapter.kind == "linear":
        a = x.reshape(n, -1, x.shape[-1])  # [N, T, d_in]
        if adapter.fold_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a.transpose(1, 2)[:, :, None, :], g.reshape(n, -1, g.shape[-1]).transpose(1, 2)
    m = adapter.module
    ds = g.reshape(n, g.shape[1], -1)  # [N, C_out, T]
    if adapter.mode == "full":
        cols = adapter.unfold(x)  # [N, C*k2, T]
        if adapter.fold_bias:  # the homogeneous coordinate is never padded
            cols = torch.cat([cols, cols.new_ones(n, 1, cols.shape[-1])], dim=1)
        return cols[:, :, None, :], ds
    if adapter.fold_bias:  # a constant input channel, zero-padded like the others
        x = torch.cat([x, x.new_ones(n, 1, *x.shape[2:])], dim=1)
    pad = conv_pad(m)
    cols = F.unfold(F.pad(x, pad) if any(pad) else x, m.kernel_size, dilation=m.dilation, stride=m.stride)
    return cols.reshape(n, x.shape[1], adapter.k2, -1), ds  # channel-major unfold: [N, C(+1), k2, T]


def per_example_kfe_squares(adapter: Adapter, x: torch.Tensor, g: torch.Tensor, QA: torch.Tensor, QS: torch.Tensor) -> torch.Tensor:
    """``sum_n (Q_S^T G_n Q_A)^2`` over the examples of one batch: ``[d_out, d_in, K]`` float64."""
    a, ds = _samples(adapter, x.detach().to(F64), g.detach().to(F64))
    d_out, d_in, K = ds.shape[1], a.shape[1], a.shape[2]
    per = max(1, CHUNK_ELEMS // max(1, 2 * d_out * d_in * K))
    total = torch.zeros(d_out, d_in, K, dtype=F64, device=x.device)
    for s in range(0, a.shape[0], per):
        G = torch.einsum("not,nikt->noik", ds[s:s + per], a[s:s + per])  # [n, d_out, d_in, K]
        P = torch.einsum("oa,noik,ib->nabk", QS, G, QA)
        total += P.square().sum(dim=0)
    return total


@register_statistic("ekfac")
def ekfac_sums(model: nn.Module, batches: Iterable, spec: Mapping, *, fisher: str = "true", seed: int = 0,
               max_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{layer::s_sum [d_out, d_in, K], count [1]}`` over ``batches`` for ``spec["layers"] = {name:
    {"QA": .., "QS": ..}}`` in ``spec["conv_mode"]``: the sums of :func:`per_example_kfe_squares`."""
    mode, layers = spec["conv_mode"], spec["layers"]
    modules = dict(model.named_modules())
    adapters = {n: make_adapter(n, modules[n], mode) for n in layers}
    bases = {n: (torch.as_tensor(b["QA"], dtype=F64), torch.as_tensor(b["QS"], dtype=F64)) for n, b in layers.items()}
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(mod, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()

                def on_grad(g: torch.Tensor) -> None:
                    qa, qs = (q.to(g.device) for q in bases[name])
                    part = per_example_kfe_squares(adapters[name], x, g, qa, qs)
                    sums[name] = part if name not in sums else sums[name] + part

                output.register_hook(on_grad)
        return fn

    hooks = {modules[n]: hook(n) for n in layers}
    with StatisticsPass(model, "EKFAC", hooks=hooks, max_batches=max_batches, progress=progress) as run:
        for p, _, _ in run.saved:
            p.requires_grad_(False)
        for x, y, idx in run.batches(batches):
            x = x.detach().requires_grad_(True) if x.is_floating_point() else x
            if not x.is_floating_point():
                run.restore_flags()
            with torch.enable_grad():
                logits = model(x)
                F.cross_entropy(logits, fisher_labels(logits, y, idx, fisher, seed), reduction="sum").backward()
    out = {f"{n}::s_sum": s.cpu() for n, s in sums.items()}
    out["count"] = torch.tensor([run.seen], dtype=torch.int64)
    return out


def rescored(scores: Mapping[str, LayerScores], sums: Mapping[str, torch.Tensor]) -> dict[str, LayerScores]:
    """EigenDamage's scores with EKFAC's measured second moments in place of ``l_S l_A``."""
    count = float(sums["count"].reshape(-1)[0])
    out = {}
    for n, sc in scores.items():
        s = sums[f"{n}::s_sum"].to(F64) / max(count, 1.0)  # [d_out, d_in, K]
        w = sc.w_kfe if sc.w_kfe.dim() == 3 else sc.w_kfe[:, :, None]
        out[n] = LayerScores(sc.basis, sc.w_kfe, 0.5 * (w.square() * s).sum(dim=2))
    return out
