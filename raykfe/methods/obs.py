"""Parameter-coordinate baselines: C-OBD, Kron-OBD, Kron-OBS, C-OBS and L1, per output row.

Registered here (the end of the module): ``c-obd`` (the diagonal Fisher statistic), ``c-obs``,
``kron-obd`` and ``kron-obs`` (K-FAC factors in full conv mode, the OBS ones with their
compensating update); ``l1`` uses :func:`l1_scores` from :mod:`raykfe.methods.magnitude`.

The structure scored is an OUTPUT channel / neuron: row ``i`` of a layer's weights. Two layouts:

* the module's own weight ``[out, ...]`` (+ bias ``[out]``) for C-OBD and L1;
* ``W~ = adapter.weight_matrix()`` (:mod:`raykfe.layers`) for the K-FAC methods: ``[d_out, d_in]``
  (Linear, Conv2d ``conv_mode="full"``) or ``[d_out, d_in, k2]`` (Conv2d ``"patch"``), with a folded
  bias as the last input column. ``vec`` is row-major (``W~.flatten()``) and the Fisher of the layer
  is ``F ~= S (x) A`` (patch: ``S (x) A (x) I_k2``, one copy of ``S (x) A`` per kernel offset), with
  ``A``/``S`` the mean factors of :class:`raykfe.factors.LayerStats`.

Damping (Tikhonov, all the OBS-type formulas): ``A_d = A + damping * mean(diag A) * I`` and
``S_d = S + damping * mean(diag S) * I`` (an all-zero factor gets ``damping * I``), default
``damping=1e-3``, so ``F_d = S_d (x) A_d``. The original EigenDamage code inverts the factors with
``eps=1e-10``, which blows up on the (near-)singular factors of real networks; raykfe damps
relatively instead. ``damping=0`` is allowed and raises :class:`raykfe.errors.NumericalError` when
a factor is singular. Kron-OBD and C-OBD are not damped (they never invert anything).

Scores (float64, one per row ``i``; a score is the predicted loss increase of zeroing the row):

* C-OBD: ``1/2 sum_{j in row i} w_j^2 F_jj`` with the exact Fisher diagonal
  (:func:`collect_diag_fisher`), weight and bias entries of the row.
* Kron-OBD: ``1/2 S_ii w_i^T A w_i`` (patch: summed over kernel offsets), i.e. the quadratic form
  ``1/2 vec(W_i)^T (S (x) A)_{ii} vec(W_i)``. NOTE: the original code squares the weights
  element-wise before multiplying by ``A`` (``S_ii * sum_j (w^2 A)_j``-like); that is not a quadratic
  form of the Fisher and raykfe implements the quadratic form.
* Kron-OBS: the exact OBS loss increase of removing row ``i`` (all of its entries, jointly, with the
  best compensating update of all the other weights) under ``F_d``. With ``q`` the entries of row i,
  ``[F_d^{-1}]_qq = [S_d^{-1}]_ii A_d^{-1}`` so ``1/2 w_q^T ([F_d^{-1}]_qq)^{-1} w_q =
  1/2 w_i^T A_d w_i / [S_d^{-1}]_ii`` (patch: summed over offsets).
* C-OBS (the EigenDamage paper's baseline): element-wise OBS with the diagonal of the K-FAC inverse,
  ``1/2 w_ij^2 / ([S_d^{-1}]_ii [A_d^{-1}]_jj)``, summed over the row (and offsets):
  :func:`cobs_entry_scores` / :func:`cobs_scores`.
* L1: ``sum |w|`` over the row, any layout.

Updates (return the new ``W~``, removed rows exactly 0):

* :func:`kron_obs_update`, the exact JOINT OBS update for a set ``R`` of rows (``K`` = the rest).
  ``min 1/2 dw^T F_d dw`` s.t. ``dw_Q = -w_Q`` (``Q`` = entries of the rows in R) gives
  ``dw = -F_d^{-1}_{:,Q} (F_d^{-1}_{QQ})^{-1} w_Q``; with ``F_d^{-1} = S_d^{-1} (x) A_d^{-1}`` the
  ``A_d^{-1}`` of the first factor and the ``A_d`` of the inverted block cancel, leaving
  ``dW = -(S_d^{-1})_{:,R} ((S_d^{-1})_{RR})^{-1} W_R`` (per offset in patch mode): the update mixes
  rows only. By the block-inverse identity ``(S_d^{-1})_{KR} ((S_d^{-1})_{RR})^{-1} = -S_{d,KK}^{-1}
  S_{d,KR}``, computed as ``W_K <- W_K + S_{d,KK}^{-1} S_{d,KR} W_R`` (a Cholesky solve with the kept
  block; no full inverse). Its loss increase is ``1/2 sum_offsets tr(W_R^T M W_R A_d)`` with
  ``M = ((S_d^{-1})_{RR})^{-1}`` = the Schur complement of ``S_{d,KK}``: :func:`kron_obs_joint_loss`.
* :func:`cobs_update`, the SUM of the single-weight OBS updates of every removed entry:
  ``dW = -S_d^{-1} C A_d^{-1}`` (per offset) with ``C_ij = w_ij / ([S_d^{-1}]_ii [A_d^{-1}]_jj)`` for
  rows i in R and 0 elsewhere; then the removed rows are set to 0. This is not the joint optimum:
  its loss increase ``1/2 dw^T F_d dw`` is >= the Kron-OBS joint minimum. Measured
  (tests/test_obs.py::test_cobs_update_is_not_the_joint_optimum: d_out=8, d_in=6, k2=3, 3 rows
  removed, random SPD factors with condition number 1e2, damping=1e-3): the C-OBS update's loss
  increase is 23282 vs the joint minimum 9016.2, a relative gap of +1.58 (2.58x).

In patch mode with a folded bias, the bias column of ``W~`` is non-zero at the centre tap only.
Kron-OBS keeps the other taps at 0 (its update is a row mix); C-OBS's ``C A_d^{-1}`` does not, and
:func:`write_weight_matrix` folds the bias column's taps into the bias by summing them (exact at the
output positions whose every tap reads a real pixel; exact everywhere when only the centre is set).

Exact Fisher diagonal (:func:`collect_diag_fisher`): for every listed Linear/Conv2d (any groups,
stride, padding incl. 'same' and non-zero padding modes, dilation), per-example weight gradients
from the layer input ``a`` (forward hook) and the output gradient ``Ds`` (tensor hook on the output,
which survives in-place activations): Linear ``G_n = sum_t Ds_{n,t} a_{n,t}^T``; Conv per group g
``G_n[g] = sum_t Ds_{n,t}[g] (x) patch_{n,t}[g]`` (``F.unfold`` of the padded input); bias
``sum_t Ds_{n,t}``. The loss of example n is the cross-entropy with its sampled label
(``fisher="true"``, :func:`raykfe.capture.sample_labels`, so the labels do not depend on batching
or sharding) or its dataset label (``"empirical"``); the batch loss is their SUM, so ``Ds`` is
per example. ``sum_n G_n^2`` is accumulated in float64. Examples are processed in chunks so that
one chunk's temporaries (unfolded patches, output gradient, per-example gradients and their
squares) hold at most ``max(max_chunk_elems, one example's worth)`` elements (default ``2**24``:
<= 128 MiB at 8 bytes) on top of the activations autograd keeps anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, NumericalError
from ..factors import merge_index_ranges
from ..layers import conv_pad
from . import ChannelScores, Method, register, register_statistic

__all__ = [
    "DiagFisher",
    "collect_diag_fisher",
    "cobd_scores",
    "kron_obd_scores",
    "kron_obs_scores",
    "kron_obs_update",
    "kron_obs_joint_loss",
    "cobs_entry_scores",
    "cobs_scores",
    "cobs_update",
    "l1_scores",
    "damped",
    "split_weight_matrix",
    "write_weight_matrix",
]

F64 = torch.float64

#: default bound on the elements of one chunk's temporaries in :func:`collect_diag_fisher`
MAX_CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------------------------
# exact Fisher diagonal
# ------------------------------------------------------------------------------------------------


@dataclass
class DiagFisher:
    """Sums of squared per-example gradients, kept as (sum, count) so that shards merge by adding.

    ``sums[module name] = {"weight": sum_n g_n^2, "bias": ...}`` (float64, shaped like the module's
    parameters; "bias" only when the module has one) and ``count = N`` examples. ``index_ranges``:
    the implicit example indices (``[start, stop)`` pairs) a true-Fisher pass without ``idx`` drew
    its labels from, else None; :meth:`merge` refuses overlapping ones, like
    :func:`raykfe.factors.merge_index_ranges`. The flat tensors of :meth:`to_tensors` (sums to
    all-reduce, whose workers always pass global indices) do not carry them.
    """

    sums: dict[str, dict[str, torch.Tensor]]
    count: int = 0
    index_ranges: list | None = None

    def merge(self, other: "DiagFisher") -> "DiagFisher":
        if set(self.sums) != set(other.sums):
            raise ConfigError(
                f"cannot merge diagonal Fishers of different layers ({sorted(self.sums)} vs {sorted(other.sums)}): "
                "collect every shard with the same layers"
            )
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, params in self.sums.items():
            theirs = other.sums[name]
            if set(params) != set(theirs) or any(params[k].shape != theirs[k].shape for k in params):
                raise ConfigError(
                    f"cannot merge diagonal Fishers of layer {name!r}: parameter shapes differ between shards; "
                    "collect every shard from the same model"
                )
            out[name] = {k: params[k] + theirs[k].to(params[k].device) for k in params}
        return DiagFisher(out, self.count + other.count, merge_index_ranges(self.index_ranges, other.index_ranges))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"module::weight": sum, ..., "count": int64 [1]}`` (all-reduce by summing / safetensors)."""
        tensors = {
            f"{name}::{key}": t.detach().cpu().contiguous() for name, params in self.sums.items() for key, t in params.items()
        }
        tensors["count"] = torch.tensor([self.count], dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "DiagFisher":
        if "count" not in tensors:
            raise ConfigError("the diagonal-Fisher tensors have no 'count' entry: they were not written by DiagFisher.to_tensors")
        sums: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key == "count":
                continue
            name, sep, param = key.rpartition("::")
            if not sep:
                raise ConfigError(f"diagonal-Fisher tensor key {key!r} is not 'module::param': not written by DiagFisher.to_tensors")
            sums.setdefault(name, {})[param] = t.to(F64)
        return cls(sums, int(tensors["count"].reshape(-1)[0].item()))

    def diag(self, name: str) -> dict[str, torch.Tensor]:
        """Mean Fisher diagonal of one module: ``{"weight": sums/count, "bias": ...}``."""
        if name not in self.sums:
            raise ConfigError(f"layer {name!r} has no diagonal Fisher: collect it with layers=[..., {name!r}]")
        return {k: v / max(self.count, 1) for k, v in self.sums[name].items()}


def _conv_pad(module: nn.Conv2d) -> tuple[tuple[int, int, int, int], str]:
    """``F.pad`` amounts (w_left, w_right, h_top, h_bottom) (:func:`raykfe.layers.conv_pad`) and mode."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return conv_pad(module), mode


def _example_elems(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> int:
    """Elements of one example's temporaries: patches, output gradient, gradient and its square."""
    per_grad = 2 * module.weight.numel() + (2 * module.bias.numel() if module.bias is not None else 0)
    out = g[0].numel()
    if isinstance(module, nn.Conv2d):
        k2 = module.kernel_size[0] * module.kernel_size[1]
        t = out // module.out_channels
        return module.in_channels * k2 * t + x[0].numel() * 2 + out + per_grad
    return x[0].numel() + out + per_grad


def _per_example_grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example gradients of ``module``'s weight ``[C, *weight.shape]`` and bias ``[C, out]``."""
    c = x.shape[0]
    if isinstance(module, nn.Conv2d):
        pad, mode = _conv_pad(module)
        if any(pad):
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)  # [C, Cin*k2, T]
        groups = module.groups
        t = cols.shape[-1]
        cols = cols.reshape(c, groups, -1, t)  # channel-major unfold: each group's channels are contiguous
        gg = g.reshape(c, groups, module.out_channels // groups, t)
        gw = (gg @ cols.transpose(-1, -2)).reshape(c, *module.weight.shape)
        gb = g.reshape(c, module.out_channels, t).sum(dim=2) if module.bias is not None else None
        return gw, gb
    a = x.reshape(c, -1, x.shape[-1])  # [C, T, d_in]; T > 1 for inputs with extra leading dims
    gg = g.reshape(c, -1, g.shape[-1])  # [C, T, d_out]
    gw = gg.transpose(1, 2) @ a
    gb = gg.sum(dim=1) if module.bias is not None else None
    return gw, gb


def collect_diag_fisher(
    model: nn.Module,
    batches: Iterable,
    *,
    layers: Sequence[str],
    fisher: str = "true",
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
    max_chunk_elems: int = MAX_CHUNK_ELEMS,
    first_index: int = 0,
) -> DiagFisher:
    """The exact Fisher diagonal (sums of squared per-example gradients) of the listed layers.

    ``batches`` yields ``(x, y)`` or ``(x, y, idx)`` (idx: global example indices; else
    ``first_index`` + the running position, recorded in ``index_ranges`` for the true Fisher so
    that overlapping hand-made shards are refused on merge). Listed layers must be ``nn.Linear``
    or ``nn.Conv2d`` modules called once per forward; a listed layer the forward never reaches
    has an all-zero diagonal. The model is run in eval mode;
    its parameters' ``requires_grad``, ``.grad`` and its train/eval mode are left as they were.
    """
    from ..capture import StatisticsPass, _check_fisher, fisher_labels

    _check_fisher(fisher)
    if max_chunk_elems < 1:
        raise ConfigError(f"max_chunk_elems={max_chunk_elems} must be >= 1")
    modules = _diag_layers(model, layers)
    sums = {n: {k: torch.zeros(p.shape, dtype=F64, device=p.device) for k, p in (("weight", m.weight), ("bias", m.bias))
                if p is not None} for n, m in modules.items()}
    calls: dict[str, int] = {}
    hooks = {m: _diag_hook(n, sums[n], calls, max_chunk_elems) for n, m in modules.items()}
    targets = [m.weight for m in modules.values()]
    with StatisticsPass(model, "Fisher diagonal", hooks=hooks, max_batches=max_batches, progress=progress,
                        first_index=first_index) as run:
        # only the listed weights require grad: every listed output then requires grad, and
        # autograd.grad (not backward) leaves every .grad untouched
        for p, _, _ in run.saved:
            p.requires_grad_(False)
        for w in targets:
            w.requires_grad_(True)
        for x, y, idx in run.batches(batches):
            calls.clear()
            with torch.enable_grad():
                logits = model(x)
                loss = F.cross_entropy(logits, fisher_labels(logits, y, idx, fisher, seed), reduction="sum")
                if loss.requires_grad:
                    torch.autograd.grad(loss, targets, allow_unused=True)
    if not run.seen:
        raise ConfigError("no batch was seen: the data given for the Fisher diagonal is empty")
    return DiagFisher(sums, run.seen, run.implicit_range if fisher == "true" else None)


def _diag_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(layers, str):
        raise ConfigError(f"layers={layers!r} is a string: pass a list of module names, e.g. layers=[{layers!r}]")
    names = list(dict.fromkeys(layers))
    if not names:
        raise ConfigError("layers=[] is empty: list the Linear/Conv2d module names to collect the Fisher diagonal of")
    modules = dict(model.named_modules())
    bad = [n for n in names if type(modules.get(n)) not in (nn.Linear, nn.Conv2d)]
    if bad:
        raise ConfigError(f"layers {bad} are not nn.Linear/nn.Conv2d modules of the model: list only those")
    return {n: modules[n] for n in names}


def _diag_hook(name: str, acc: dict[str, torch.Tensor], calls: dict[str, int], max_chunk_elems: int):
    """The forward hook of one layer: a tensor hook on its output adds the squared per-example
    gradients of its weight (and bias), a chunk of examples at a time."""

    def accumulate(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        dtype = torch.promote_types(g.dtype, torch.float32)
        x, g = x.to(dtype), g.detach().to(dtype)
        chunk = max(1, max_chunk_elems // _example_elems(module, x, g))
        for s in range(0, x.shape[0], chunk):
            gw, gb = _per_example_grads(module, x[s : s + chunk], g[s : s + chunk])
            acc["weight"] += gw.to(F64).square().sum(dim=0)
            if gb is not None:
                acc["bias"] += gb.to(F64).square().sum(dim=0)

    def hook(mod, inputs, output):
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:
            raise ConfigError(
                f"layer {name!r} is called more than once per forward (shared weights): "
                "its per-example gradient is not one outer product; leave it out of layers"
            )
        if output.requires_grad:
            x = inputs[0].detach()
            output.register_hook(lambda g: accumulate(mod, x, g))  # returns None: the gradient is unchanged

    return hook


# ------------------------------------------------------------------------------------------------
# scores and updates
# ------------------------------------------------------------------------------------------------


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to(F64)


def _check_damping(damping: float) -> float:
    damping = float(damping)
    if not damping >= 0.0:
        raise ConfigError(f"damping={damping} must be >= 0 (relative Tikhonov damping, e.g. 1e-3)")
    return damping


def damped(M: torch.Tensor, damping: float) -> torch.Tensor:
    """``M + damping * mean(diag M) * I`` in float64 (``damping * I`` when ``diag M`` is all zero)."""
    damping = _check_damping(damping)
    M = _f64(M)
    lam = damping * M.diagonal().mean().item()
    if lam <= 0.0:
        lam = damping
    return M + lam * torch.eye(M.shape[0], dtype=F64, device=M.device)


def _cholesky(M: torch.Tensor, which: str, damping: float) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        raise NumericalError(
            f"factor {which} is not positive definite with damping={damping}: use a larger damping (e.g. 1e-3)"
        )
    return L


def _spd_inverse(M: torch.Tensor, which: str, damping: float) -> torch.Tensor:
    return torch.cholesky_inverse(_cholesky(M, which, damping))


def _as3(w, A, S) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """float64 ``(W~ [d_out, d_in, k2], A, S, was_2d)`` after checking the shapes agree."""
    w, A, S = _f64(w), _f64(A), _f64(S)
    if w.dim() not in (2, 3):
        raise ConfigError(
            f"weight matrix of shape {tuple(w.shape)}: expected W~ [d_out, d_in] or [d_out, d_in, k2] "
            "(adapter.weight_matrix())"
        )
    d_out, d_in = w.shape[:2]
    if tuple(A.shape) != (d_in, d_in) or tuple(S.shape) != (d_out, d_out):
        raise ConfigError(
            f"factor shapes A{tuple(A.shape)}, S{tuple(S.shape)} do not match W~{tuple(w.shape)}: "
            f"expected A ({d_in}, {d_in}) and S ({d_out}, {d_out}) from the same layer and conv_mode"
        )
    was_2d = w.dim() == 2
    return (w[:, :, None] if was_2d else w), A, S, was_2d


def _out(w3: torch.Tensor, was_2d: bool) -> torch.Tensor:
    return w3[:, :, 0] if was_2d else w3


def _rows(removed: Sequence[int], d_out: int) -> list[int]:
    rows = sorted({int(r) for r in removed})
    if rows and (rows[0] < 0 or rows[-1] >= d_out):
        raise ConfigError(f"removed rows {rows} are out of range for a layer with d_out={d_out}: use 0..{d_out - 1}")
    return rows


def _quad(w3: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``sum_k w_ik^T A w_ik`` per row i: ``[d_out]``."""
    return torch.einsum("ojk,jl,olk->o", w3, A, w3)


def l1_scores(weight: torch.Tensor) -> torch.Tensor:
    """``sum |w|`` over each output row (dim 0), any layout: float64 ``[d_out]``."""
    w = _f64(weight)
    return w.abs().reshape(w.shape[0], -1).sum(dim=1)


def cobd_scores(
    weight: torch.Tensor,
    fdiag_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fdiag_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """C-OBD: ``1/2 sum_row w^2 F_diag`` (+ ``1/2 b_i^2 F_b,i``), module layout ``[out, ...]``: ``[out]``."""
    w, f = _f64(weight), _f64(fdiag_weight)
    if w.shape != f.shape:
        raise ConfigError(
            f"fdiag_weight of shape {tuple(f.shape)} does not match the weight {tuple(w.shape)}: "
            "use DiagFisher.diag(name)['weight']"
        )
    scores = 0.5 * (w.square() * f).reshape(w.shape[0], -1).sum(dim=1)
    if (bias is None) != (fdiag_bias is None):
        raise ConfigError("cobd_scores needs both bias and fdiag_bias, or neither")
    if bias is not None:
        b, fb = _f64(bias), _f64(fdiag_bias)
        if b.shape != fb.shape or tuple(b.shape) != (w.shape[0],):
            raise ConfigError(
                f"bias {tuple(b.shape)} / fdiag_bias {tuple(fb.shape)} must both have shape ({w.shape[0]},): "
                "use DiagFisher.diag(name)['bias']"
            )
        scores = scores + 0.5 * b.square() * fb
    return scores


def kron_obd_scores(w: torch.Tensor, A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Kron-OBD: ``1/2 S_ii w_i^T A w_i`` (patch: summed over offsets), undamped: ``[d_out]``."""
    w3, A, S, _ = _as3(w, A, S)
    return 0.5 * S.diagonal() * _quad(w3, A)


def kron_obs_scores(w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, damping: float = 1e-3) -> torch.Tensor:
    """Kron-OBS: ``1/2 w_i^T A_d w_i / [S_d^{-1}]_ii`` (patch: summed over offsets): ``[d_out]``."""
    w3, A, S, _ = _as3(w, A, S)
    A_d, S_d = damped(A, damping), damped(S, damping)
    s_inv = _spd_inverse(S_d, "S", damping).diagonal()
    _cholesky(A_d, "A", damping)  # the formula holds for a positive definite A_d only
    return 0.5 * _quad(w3, A_d) / s_inv


def kron_obs_update(
    w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, removed: Sequence[int], damping: float = 1e-3
) -> torch.Tensor:
    """Exact joint OBS update removing rows ``removed`` under ``S_d (x) A_d``: the new ``W~``.

    ``W_K <- W_K - (S_d^{-1})_{KR} ((S_d^{-1})_{RR})^{-1} W_R = W_K + S_{d,KK}^{-1} S_{d,KR} W_R``
    (per offset; ``A`` cancels), removed rows set to 0.
    """
    w3, A, S, was_2d = _as3(w, A, S)
    d_out = w3.shape[0]
    rows = _rows(removed, d_out)
    S_d = damped(S, damping)
    new = w3.clone()
    if not rows:
        return _out(new, was_2d)
    gone = set(rows)
    keep = [i for i in range(d_out) if i not in gone]
    if keep:
        K = torch.tensor(keep, device=w3.device)
        R = torch.tensor(rows, device=w3.device)
        L = _cholesky(S_d[K][:, K], "S (kept rows)", damping)
        w_r = w3[R].reshape(len(rows), -1)
        new[K] += torch.cholesky_solve(S_d[K][:, R] @ w_r, L).reshape(len(keep), *w3.shape[1:])
    new[rows] = 0.0
    return _out(new, was_2d)


def kron_obs_joint_loss(
    w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, removed: Sequence[int], damping: float = 1e-3
) -> float:
    """Loss increase of :func:`kron_obs_update`: ``1/2 sum_k tr(W_R^T ((S_d^{-1})_{RR})^{-1} W_R A_d)``."""
    w3, A, S, _ = _as3(w, A, S)
    rows = _rows(removed, w3.shape[0])
    if not rows:
        return 0.0
    A_d, S_d = damped(A, damping), damped(S, damping)
    S_inv = _spd_inverse(S_d, "S", damping)
    M = torch.linalg.inv(S_inv[rows][:, rows])
    w_r = w3[rows]
    return 0.5 * float(torch.einsum("rjk,rs,sik,ji->", w_r, M, w_r, A_d))


def _cobs_c(w3: torch.Tensor, A: torch.Tensor, S: torch.Tensor, damping: float):
    A_inv = _spd_inverse(damped(A, damping), "A", damping)
    S_inv = _spd_inverse(damped(S, damping), "S", damping)
    denom = S_inv.diagonal()[:, None, None] * A_inv.diagonal()[None, :, None]
    return A_inv, S_inv, denom


def cobs_entry_scores(w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, damping: float = 1e-3) -> torch.Tensor:
    """Per-entry C-OBS ``1/2 w_ij^2 / ([S_d^{-1}]_ii [A_d^{-1}]_jj)``, same layout as ``w``."""
    w3, A, S, was_2d = _as3(w, A, S)
    _, _, denom = _cobs_c(w3, A, S, damping)
    return _out(0.5 * w3.square() / denom, was_2d)


def cobs_scores(w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, damping: float = 1e-3) -> torch.Tensor:
    """C-OBS row scores: :func:`cobs_entry_scores` summed over the row (and offsets): ``[d_out]``."""
    e = cobs_entry_scores(w, A, S, damping)
    return e.reshape(e.shape[0], -1).sum(dim=1)


def cobs_update(
    w: torch.Tensor, A: torch.Tensor, S: torch.Tensor, removed: Sequence[int], damping: float = 1e-3
) -> torch.Tensor:
    """Sum of the single-weight OBS updates of the removed rows' entries: the new ``W~``.

    ``dW = -S_d^{-1} C A_d^{-1}`` (per offset), ``C_ij = w_ij / ([S_d^{-1}]_ii [A_d^{-1}]_jj)`` on the
    removed rows, 0 elsewhere; removed rows are then set to 0.
    """
    w3, A, S, was_2d = _as3(w, A, S)
    rows = _rows(removed, w3.shape[0])
    A_inv, S_inv, denom = _cobs_c(w3, A, S, damping)
    new = w3.clone()
    if not rows:
        return _out(new, was_2d)
    C = torch.zeros_like(w3)
    C[rows] = w3[rows] / denom[rows]
    new -= torch.einsum("oi,ijk,jl->olk", S_inv, C, A_inv)
    new[rows] = 0.0
    return _out(new, was_2d)


# ------------------------------------------------------------------------------------------------
# writing W~ back into the module
# ------------------------------------------------------------------------------------------------


def split_weight_matrix(adapter, w_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W~`` -> (module weight, bias or None), float64: the inverse of ``adapter.weight_matrix()``.

    ``None`` for the bias when it is not folded into ``W~`` (then the module's bias is left alone).
    Patch mode: the bias is the sum of the bias column over the kernel offsets (the centre tap
    when, as ``weight_matrix()`` builds it, the other taps are 0).
    """
    module = adapter.module
    w = _f64(w_new)
    expected = tuple(adapter.weight_matrix().shape)
    if tuple(w.shape) != expected:
        raise ConfigError(
            f"W~ of shape {tuple(w.shape)} does not fit layer {adapter.name!r}: expected {expected} "
            f"(adapter.weight_matrix() with conv_mode={adapter.mode!r})"
        )
    fold = adapter.fold_bias
    n_in = w.shape[1] - int(fold)
    bias = None
    if w.dim() == 3:  # conv, patch mode: [out, c_in (+1), k2]
        weight = w[:, :n_in].reshape(module.weight.shape)
        if fold:
            bias = w[:, n_in].sum(dim=1)
    else:
        weight = w[:, :n_in].reshape(module.weight.shape)
        if fold:
            bias = w[:, n_in]
    return weight, bias


@torch.no_grad()
def write_weight_matrix(adapter, w_new: torch.Tensor) -> None:
    """Write ``W~`` (e.g. from :func:`kron_obs_update`) into the adapter's module, weight and bias."""
    weight, bias = split_weight_matrix(adapter, w_new)
    module = adapter.module
    module.weight.copy_(weight.to(module.weight.dtype))
    if bias is not None:
        module.bias.copy_(bias.to(module.bias.dtype))


# ------------------------------------------------------------------------------------------------
# the registered methods (channel space: a group channel scores the sum of its coupled rows)
# ------------------------------------------------------------------------------------------------


@register_statistic("diag-fisher")
def _diag_fisher_statistic(model, batches, spec, *, fisher, seed, max_batches, progress) -> dict[str, torch.Tensor]:
    """The exact Fisher diagonal of ``spec["layers"]`` as flat sums (:meth:`DiagFisher.to_tensors`)."""
    return collect_diag_fisher(model, batches, layers=spec["layers"], fisher=fisher, seed=seed, max_batches=max_batches,
                               progress=progress).to_tensors()


class COBD(Method):
    """Rows of every coupled Conv/Linear (any groups, depthwise included), exact diagonal Fisher."""

    def channel_scores(self, model, graph, source, settings) -> ChannelScores:
        from ..channels import aggregate, out_layers

        layers = out_layers(model, graph)
        df = DiagFisher.from_tensors(source.measure("diag-fisher", {"layers": layers}))
        per = {}
        for n in layers:
            mod, d = model.get_submodule(n), df.diag(n)
            bias = None if mod.bias is None else mod.bias.detach().to(F64)
            per[n] = cobd_scores(mod.weight.detach().to(F64), d["weight"], bias, d.get("bias")).numpy()
        return ChannelScores(aggregate(graph, per))


@dataclass(frozen=True)
class KroneckerChannels(Method):
    """Rows of the coupled Linear / Conv2d (groups=1) layers scored with K-FAC factors in FULL conv
    mode (the Fisher of a conv row in parameter coordinates); a depthwise conv in the group
    contributes nothing. ``score_fn(W~, A, S, damping)`` per layer; ``update_fn`` (the OBS methods,
    ``compensates=True``) gives the compensated ``W~`` for the removed rows."""

    score_fn: Callable | None = None
    update_fn: Callable | None = None

    def _layers(self, model, graph, settings):
        from ..capture import find_layers
        from ..channels import out_layers

        adapters, _ = find_layers(model, "full", settings.max_factor_dim)
        layers = [n for n in out_layers(model, graph) if n in adapters]
        if not layers:
            raise ConfigError(f"prune.method={self.name} found no Linear/Conv2d (groups=1) layer to score: choose another method")
        return adapters, layers

    def channel_scores(self, model, graph, source, settings) -> ChannelScores:
        from ..channels import aggregate

        adapters, layers = self._layers(model, graph, settings)
        stats = source.kfac(layers, "full")
        per = {n: np.asarray(self.score_fn(adapters[n].weight_matrix().to(F64), stats[n].A, stats[n].S, settings.damping),
                             dtype=np.float64) for n in layers}
        return ChannelScores(aggregate(graph, per), aux=(stats, layers))

    def compensate(self, model, graph, removed, aux, settings):
        """A copy of ``model`` whose coupled layers got the OBS update for the rows ``removed``
        takes out (the removed rows are zeroed; the surgery then drops them)."""
        if self.update_fn is None:
            return model
        from ..capture import find_layers

        stats, layers = aux
        new = copy.deepcopy(model)
        adapters, _ = find_layers(new, "full", None)
        wanted = set(layers)
        for g in graph.groups:
            gone = np.asarray(removed.get(g.name, []), dtype=np.int64)
            if g.name in graph._heads:
                # attention heads lose their rows with no update: q and k reach the loss through the
                # softmax of their product, not through their own K-FAC factor, and on the digits ViT
                # kron-obs's update of the kept heads' rows took flops:0.5 from 85.5% to 11.7%
                # (bench/vit_quality.py); the MLP widths keep their update
                continue
            for m in g.members if gone.size else ():
                if m.kind != "out" or m.module not in wanted:
                    continue
                rows = sorted(int(i) for i in m.index[np.isin(m.root, gone)])
                if rows:
                    a, st = adapters[m.module], stats[m.module]
                    write_weight_matrix(a, self.update_fn(a.weight_matrix().to(F64), st.A, st.S, rows, damping=settings.damping))
        return new


#: the second-order channel methods rank each group's scores divided by their mean: measured with
#: bench/quality.py on seed 0 for c-obd and kron-obs (BENCHMARKS.md), the same for their siblings
NORMALIZED = {"normalize": "mean"}

register(COBD("c-obd", "channels", "diag-fisher", "channel OBD with the exact diagonal Fisher", defaults=NORMALIZED))
register(KroneckerChannels(
    "c-obs", "channels", "kfac-full", "channel OBS, element-wise with the damped K-FAC inverse, sum-of-singles update",
    compensates=True, shown=("fisher", "damping", "normalize"), score_fn=lambda w, A, S, d: cobs_scores(w, A, S, damping=d),
    update_fn=cobs_update, defaults=NORMALIZED,
))
register(KroneckerChannels(
    "kron-obd", "channels", "kfac-full", "channel OBD with the K-FAC Fisher: 1/2 S_ii w_i^T A w_i",
    score_fn=lambda w, A, S, d: kron_obd_scores(w, A, S), defaults=NORMALIZED,
))
register(KroneckerChannels(
    "kron-obs", "channels", "kfac-full", "channel OBS with the damped K-FAC Fisher and its joint compensating update",
    compensates=True, shown=("fisher", "damping", "normalize"), score_fn=lambda w, A, S, d: kron_obs_scores(w, A, S, damping=d),
    update_fn=kron_obs_update, defaults=NORMALIZED,
))
