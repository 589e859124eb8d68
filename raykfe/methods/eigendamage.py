"""EigenDamage importance (ALGORITHMS.md section 3): scores of KFE directions in loss units.

For a layer with augmented weights ``W~`` (``[d_out, d_in]``, or ``[d_out, d_in, k*k]`` in patch
mode, see :mod:`raykfe.layers`) and eigenbasis ``(Q_A, l_A, Q_S, l_S)``:

* ``W' = Q_S^T W~ Q_A`` (patch mode: per kernel offset);
* entry score ``dL_ij = 1/2 * l_S[i] * l_A[j] * sum_kappa W'_ij,kappa^2`` -- the predicted loss
  increase of zeroing that KFE weight (the Fisher is diagonal in the KFE, so OBD == OBS: no
  compensating update);
* output direction i (a column of ``Q_S``, a row of ``W'``) scores ``sum_j dL_ij``; input direction j
  (a column of ``Q_A``) scores ``sum_i dL_ij``.

The original code omits the 1/2; raykfe keeps it so that scores are predicted loss increases.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..eigen import Eigenbasis, eigenbasis
from ..errors import ConfigError
from . import Method, register

__all__ = ["kfe_weight", "entry_scores", "unit_scores", "LayerScores", "score_in_basis", "layer_scores"]

#: chosen with bench/quality.py on seed 0 (BENCHMARKS.md): each layer's scores divided by their mean
#: before the global ranking keeps EigenDamage from emptying a few layers at aggressive targets; the
#: ranking by loss per MAC saved wins on some architectures and loses on others, so both are tried
#: and the plan whose pruned model fits the statistics data better is kept
register(Method("eigendamage", "kfe", "kfac", "EigenDamage: KFE directions scored by the K-FAC Fisher (one pass)",
                shown=("fisher", "conv_mode", "normalize", "rank"), defaults={"normalize": "mean", "rank": "auto"}))
register(Method("eigendamage-iterative", "kfe", "kfac",
                "EigenDamage in rounds of prune, fine-tune, re-collect and merge bases (prune.rounds)", rounds=3,
                shown=("fisher", "conv_mode")))


@dataclass
class LayerScores:
    """Everything the planner and the surgery need from one layer (float64)."""

    basis: Eigenbasis
    w_kfe: torch.Tensor  # W' [d_out, d_in(, k*k)]
    entries: torch.Tensor  # dL [d_out, d_in]

    @property
    def rows(self) -> np.ndarray:
        return self.entries.sum(dim=1).numpy()

    @property
    def cols(self) -> np.ndarray:
        return self.entries.sum(dim=0).numpy()


def kfe_weight(w: torch.Tensor, basis: Eigenbasis) -> torch.Tensor:
    """``W' = Q_S^T W~ Q_A`` in float64, same layout as ``w``."""
    w = w.to(torch.float64)
    if w.dim() == 2:
        return basis.QS.T @ w @ basis.QA
    return torch.einsum("oi,ock,cj->ijk", basis.QS, w, basis.QA)


def entry_scores(w_kfe: torch.Tensor, basis: Eigenbasis) -> torch.Tensor:
    """``dL [d_out, d_in]``: 1/2 l_S[i] l_A[j] ||W'_ij||^2 (summed over kernel offsets)."""
    sq = w_kfe.pow(2)
    if sq.dim() == 3:
        sq = sq.sum(dim=2)
    return 0.5 * sq * basis.lS[:, None] * basis.lA[None, :]


def unit_scores(w_kfe: torch.Tensor, basis: Eigenbasis) -> tuple[torch.Tensor, torch.Tensor]:
    """(row scores ``[d_out]``, column scores ``[d_in]``) of the output and input directions."""
    d = entry_scores(w_kfe, basis)
    return d.sum(dim=1), d.sum(dim=0)


def score_in_basis(name: str, w: torch.Tensor, basis: Eigenbasis) -> LayerScores:
    """EigenDamage scores of weights ``W~`` in an already computed eigenbasis."""
    if tuple(w.shape[:2]) != (basis.QS.shape[0], basis.QA.shape[0]):
        raise ConfigError(
            f"the eigenbasis of layer {name!r} is A{tuple(basis.QA.shape)}/S{tuple(basis.QS.shape)} but its "
            f"weights are {tuple(w.shape[:2])}: statistics were collected on another model or conv_mode"
        )
    wk = kfe_weight(w, basis)
    return LayerScores(basis, wk, entry_scores(wk, basis))


def layer_scores(name: str, adapter, stats) -> LayerScores:
    """Eigendecompose one layer's factors and score its KFE directions."""
    return score_in_basis(name, adapter.weight_matrix(), eigenbasis(name, stats))
