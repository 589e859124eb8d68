"""The Kronecker-factored eigenbasis (KFE) of each layer's factors (ALGORITHMS.md section 2).

``A = Q_A diag(l_A) Q_A^T`` ``[d_in, d_in]`` and ``S = Q_S diag(l_S) Q_S^T`` ``[d_out, d_out]``: each
factor is symmetrised, checked for finiteness (an error names the layer), decomposed in float64 with
:func:`torch.linalg.eigh` (eigenvalues ascending) and its eigenvalues clamped at 0.
In the KFE the layer's weights are ``W' = Q_S^T W~ Q_A`` and ``F ~= diag(l_S (x) l_A)``.
The cost of one decomposition is ~n^3 (:func:`eigh_cost`), which is what per-layer work is
balanced on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import NumericalError
from .factors import LayerStats

__all__ = ["Eigenbasis", "decompose", "eigenbasis", "eigh_cost"]


@dataclass
class Eigenbasis:
    """Eigenvectors (columns) and clamped eigenvalues of a layer's two factors, float64."""

    QA: torch.Tensor  # [d_in, d_in]
    lA: torch.Tensor  # [d_in]
    QS: torch.Tensor  # [d_out, d_out]
    lS: torch.Tensor  # [d_out]


def decompose(matrix: torch.Tensor, *, layer: str = "?", factor: str = "A") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetrise, check finiteness, eigh in float64, clamp eigenvalues at 0 -> ``(Q, l)``."""
    m = matrix.detach().to(torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise NumericalError(f"factor {factor} of layer {layer!r} is not square: shape {tuple(m.shape)}")
    if not torch.isfinite(m).all():
        bad = int((~torch.isfinite(m)).sum())
        raise NumericalError(
            f"factor {factor} of layer {layer!r} has {bad} NaN/Inf entries: the statistics pass diverged "
            "(check the model's outputs and inputs for NaN, or lower the learning rate that produced it)"
        )
    m = 0.5 * (m + m.T)
    with _threads_for(m.shape[0]):
        evals, evecs = torch.linalg.eigh(m)
    return evecs, evals.clamp_min(0.0)


#: below this size one thread is fastest, and OpenMP threads that spin-wait on a busy machine can
#: make a small eigh hundreds of times slower (seen on 2 shared cores: 512x512 in 7 s instead of 0.03 s)
SINGLE_THREAD_BELOW = 1024


@contextlib.contextmanager
def _threads_for(n: int):
    before = torch.get_num_threads()
    if n < SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        yield


def eigenbasis(name: str, stats: LayerStats) -> Eigenbasis:
    """The KFE of one layer from its statistics (mean factors)."""
    qa, la = decompose(stats.A, layer=name, factor="A")
    qs, ls = decompose(stats.S, layer=name, factor="S")
    return Eigenbasis(qa, la, qs, ls)


def eigh_cost(stats_or_dims) -> float:
    """Relative cost of a layer's eigendecompositions: ``d_in^3 + d_out^3``."""
    if isinstance(stats_or_dims, LayerStats):
        d_in, d_out = stats_or_dims.A_sum.shape[0], stats_or_dims.S_sum.shape[0]
    else:
        d_in, d_out = stats_or_dims
    return float(d_in) ** 3 + float(d_out) ** 3
