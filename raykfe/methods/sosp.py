"""SOSP importance (ALGORITHMS.md section 7): second-order structured pruning, SOSP-H and SOSP-I.

Nonnenmacher et al., ICLR 2022. The formulas below are derived here from the second-order Taylor
expansion of the training loss; the section is marked (verify) in the spec, and the points where
raykfe may differ from the paper are listed at the end.

Notation (everything per example ``n`` of a dataset of ``N``):

* ``z_n = f(x_n; w)`` the logits ``[C]``; ``l_n = CE(z_n, y_n)`` with the DATASET label;
  ``L = (1/N) sum_n l_n``;
* ``p_n = softmax(z_n)``, ``r_n = dl_n/dz_n = p_n - onehot(y_n)``, ``H_n = d^2 l_n/dz_n^2 =
  diag(p_n) - p_n p_n^T``; ``J_n = dz_n/dw`` ``[C, P]``;
* ``g = (1/N) sum_n J_n^T r_n`` (the mean gradient) and ``G = (1/N) sum_n J_n^T H_n J_n``
  (the Gauss-Newton matrix, PSD);
* a structure ``s`` owns dim-0 slices of some parameters (``owner[name][i] == s``);
  ``theta_s`` is ``w`` on those slices and 0 elsewhere; ``theta = sum_s theta_s`` (every owned slice).

Removing a set ``M`` sets ``w -> w - theta_M`` with ``theta_M = sum_{s in M} theta_s``; the Taylor
expansion to second order, with the Hessian replaced by ``G``, gives::

    dL(M) ~= -sum_{s in M} g^T theta_s + 1/2 sum_{s, s' in M} theta_s^T G theta_s'
           = sum_{s in M} [ -g^T theta_s + 1/2 theta_s^T G theta_M ]          (s's share of dL(M))

SOSP-H (:func:`sosp_h_stats`, :func:`sosp_h_scores`) replaces the unknown ``M`` in ``s``'s share by
ALL structures::

    score_s = | -g^T theta_s + 1/2 theta_s^T (G theta) |

``G theta`` costs ONE Gauss-Newton-vector product per batch: ``u = J theta`` by forward mode
(``torch.func.jvp`` of ``torch.func.functional_call`` over the whole batch: ``u`` is ``[N, C]``),
``H_n u_n = p_n * u_n - p_n (p_n . u_n)`` (vectorised over the batch), then ``J^T (H u)`` by one
reverse-mode pass. The primal logits of the same ``jvp`` call carry the autograd graph, so the
gradient ``J^T r`` is a second backward through that graph: per batch, one forward-mode pass and
two backward passes, about 3x a training step. Per-shard statistics are SUMS over examples
(``grad_sum = sum_n J_n^T r_n``, ``gv_sum = sum_n J_n^T H_n J_n theta``) plus a count, so shards
all-reduce / merge by addition. ``gv_sum`` is linear in ``theta``: the scores are only meaningful
for the weights the statistics were collected with.

SOSP-I (:func:`sosp_i_stats`, :func:`sosp_i_scores`) keeps every pair::

    Q_ss' = theta_s^T G theta_s' = (1/N) sum_n u_sn^T H_n u_s'n,   u_sn = J_n theta_s  [C]
    gdot_s = g^T theta_s         = (1/N) sum_n r_n^T u_sn

``H_n = diag(p_n) - p_n p_n^T = sum_c a_nc a_nc^T`` with ``a_nc = sqrt(p_nc) (e_c - p_n)`` (one
line of algebra, using ``sum_c p_nc = 1``), so ``Q = (1/N) V V^T`` with one column of ``V`` per
example and class: ``V[s, (n, c)] = a_nc^T J_n theta_s = <J_n^T a_nc, theta_s>``. That is a
REVERSE-mode quantity: one backward pass with cotangent ``a_nc`` (for every example of the batch at
once: eval-mode examples are independent) gives it for ALL structures (:class:`_Probe`: each
owning module's output gradient, contracted with the module's own JVP along its owned slices,
channel by channel). Cost per batch: one forward and ``k + 1`` backward passes (``k`` classes, the
``+1`` for ``gdot`` with cotangent ``r``), where the formula as written costs ``S`` JVPs; with
``classes=k < C`` each example keeps its ``k`` most probable classes (the reported share of
``trace(H)`` says how much curvature that keeps; exact when ``k = C``). ``V`` has at most ``S``
columns (a wider one is compressed by a QR to the same ``V V^T``), travels between Train workers by
concatenation, and Q is never formed whole: its row sums are taken in blocks
(:mod:`raykfe.methods.gram`), sampled when ``sosp.max_pairs`` says so. ``mode="forward"`` keeps the
formula as written (one JVP per structure, ``chunk`` per vmapped call, micro-batches keeping ``U
[S, m, C]`` under ``_U_BUDGET`` elements), for modules the reverse mode does not know; it stops at
``MAX_SOSP_I_STRUCTURES``.

The SOSP-I saliency "from its row of Q": ``s``'s share of ``dL(M)`` for any ``M`` containing ``s``
is ``-gdot_s + 1/2 Q_ss + 1/2 sum_{s' in M, s' != s} Q_ss'``, whose absolute value is at most::

    score_s = | -gdot_s + 1/2 Q_ss | + 1/2 sum_{s' != s} |Q_ss'|

so ``|dL(M)| <= sum_{s in M} score_s`` for every ``M``: the score is a worst case over removal sets
and needs no guess of ``M``.

Decisions and possible differences from the paper (verify):

* the sign convention: the perturbation is ``-theta_s`` (removal), so the first-order term is
  ``-g^T theta_s`` and the second-order term ``+1/2 theta^T G theta``; a paper formula written with
  ``+g^T theta_s`` differs only inside the absolute value, i.e. where the two terms compete;
* the gradient term is kept (the model need not be at a minimum); the paper may drop it for
  converged networks, which here would mean ``g ~= 0``;
* the SOSP-I bound keeps the diagonal term together with the gradient term inside ONE absolute
  value; a looser variant ``|g^T theta_s| + 1/2 sum_{s'} |Q_ss'|`` is also an upper bound;
* ``G`` uses the dataset labels' cross-entropy Hessian w.r.t. the logits, which does not depend on
  the labels at all; only ``g`` does;
* a structure is exactly the dim-0 slices given by ``owner`` (e.g. a conv filter with its BN scale
  and shift), and ``dL`` is the loss change of ZEROING them. When the activation maps 0 to 0 (ReLU,
  tanh, GELU) and the structure includes the shift that feeds it, the channel's output is then 0,
  so this equals removing the channel together with the next layer's input slice (which ``owner``
  cannot list: it indexes dim 0). Otherwise (a filter whose BN shift is not owned, sigmoid) it
  models zeroing only.

The model runs in eval mode (BatchNorm uses, and does not update, its running statistics: the
buffers go through ``functional_call`` untouched); parameters are used through detached aliases,
so ``.grad`` and ``requires_grad`` are never touched, and the mode, flags and grads are restored
anyway. All sums are float64; the passes themselves run in the model's dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from ..capture import StatisticsPass
from ..errors import ConfigError
from .gram import GramRows, gram_abs_rows
from . import ChannelScores, Method, register, register_statistic

__all__ = [
    "SospStats",
    "SospIStats",
    "sosp_h_stats",
    "sosp_h_scores",
    "sosp_i_stats",
    "sosp_i_scores",
    "MAX_SOSP_I_STRUCTURES",
    "structure_owner",
    "owner_to_lists",
    "owner_from_lists",
]

#: SOSP-I keeps an ``[S, S]`` matrix and runs S JVPs per example: refuse above this
MAX_SOSP_I_STRUCTURES = 4096

#: elements of the per-micro-batch ``U [S, m, C]`` (float64: 2**24 elements = 128 MiB)
_U_BUDGET = 1 << 24

_COUNT = "count"
_SEP = "::"


# ----------------------------------------------------------------------------------- statistics


@dataclass
class SospStats:
    """SOSP-H sums over examples, float64, keyed by owned parameter name.

    ``grad_sum[name] = sum_n dl_n/dw`` and ``gv_sum[name] = sum_n J_n^T H_n J_n theta`` (shape of
    the parameter); ``count = N``.
    """

    grad_sum: dict[str, torch.Tensor]
    gv_sum: dict[str, torch.Tensor]
    count: int = 0

    def merge(self, other: "SospStats") -> "SospStats":
        """Statistics of the two shards' concatenated data (sums and counts add)."""
        _check_same("grad_sum", self.grad_sum, other.grad_sum)
        _check_same("gv_sum", self.gv_sum, other.gv_sum)
        return SospStats(
            {k: v + other.grad_sum[k].to(v.device) for k, v in self.grad_sum.items()},
            {k: v + other.gv_sum[k].to(v.device) for k, v in self.gv_sum.items()},
            self.count + other.count,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"grad_sum::<param>", "gv_sum::<param>", "count"}`` (CPU, contiguous)."""
        out = {f"grad_sum{_SEP}{k}": v.detach().cpu().contiguous() for k, v in self.grad_sum.items()}
        out.update({f"gv_sum{_SEP}{k}": v.detach().cpu().contiguous() for k, v in self.gv_sum.items()})
        out[_COUNT] = torch.tensor(self.count, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "SospStats":
        grad, gv = {}, {}
        for key, t in tensors.items():
            if key == _COUNT:
                continue
            kind, _, name = key.partition(_SEP)
            if kind == "grad_sum":
                grad[name] = t.to(torch.float64)
            elif kind == "gv_sum":
                gv[name] = t.to(torch.float64)
            else:
                raise ValueError(f"unexpected key {key!r} in SOSP-H statistics: expected grad_sum::, gv_sum:: or count")
        if _COUNT not in tensors:
            raise ValueError("SOSP-H statistics tensors have no 'count' entry")
        return cls(grad, gv, int(tensors[_COUNT].item()))


@dataclass
class SospIStats:
    """SOSP-I sums over examples, float64: a factor ``v [S, D]`` of ``q_sum = v v^T`` (``D <= S``),
    ``g_sum [S]``, ``count = N`` and ``trace``: ``[kept, all]`` sums of the softmax curvature's trace
    over the examples (their ratio: the share the kept directions hold, 1 when every class is kept).

    ``Q = q_sum / count`` with ``Q_ss' = theta_s^T G theta_s'``; ``g_sum / count = g^T theta_s``. The
    columns of ``v`` belong to (example, softmax direction) pairs, so shards merge by concatenating
    them (a gather, not a sum: ``to_tensors`` names the factor ``cat::v``); a factor wider than ``S``
    is compressed to ``S`` columns with the same ``v v^T`` (a QR, exact up to rounding).
    """

    v: torch.Tensor
    g_sum: torch.Tensor
    count: int = 0
    trace: torch.Tensor | None = None

    @property
    def q_sum(self) -> torch.Tensor:
        """``v v^T`` ``[S, S]`` (only for models small enough to hold it)."""
        return self.v @ self.v.T

    def share(self) -> float:
        """The share of the softmax curvature's trace the kept directions hold."""
        if self.trace is None or float(self.trace[1]) <= 0:
            return 1.0
        return float(self.trace[0] / self.trace[1])

    def merge(self, other: "SospIStats") -> "SospIStats":
        if self.v.shape[0] != other.v.shape[0]:
            raise ValueError(f"cannot merge SOSP-I statistics of {self.v.shape[0]} and {other.v.shape[0]} structures")
        trace = None if self.trace is None or other.trace is None else self.trace + other.trace
        return SospIStats(
            _compress(torch.cat([self.v, other.v.to(self.v.device)], dim=1)),
            self.g_sum + other.g_sum.to(self.g_sum.device),
            self.count + other.count,
            trace,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "cat::v": self.v.detach().cpu().contiguous(),
            "g_sum": self.g_sum.detach().cpu().contiguous(),
            _COUNT: torch.tensor(self.count, dtype=torch.int64),
        }
        if self.trace is not None:
            out["trace"] = self.trace.detach().cpu().to(torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> "SospIStats":
        missing = [k for k in ("cat::v", "g_sum", _COUNT) if k not in tensors]
        if missing:
            raise ValueError(f"SOSP-I statistics tensors lack {missing}")
        trace = tensors.get("trace")
        return cls(_compress(tensors["cat::v"].to(torch.float64)), tensors["g_sum"].to(torch.float64),
                   int(tensors[_COUNT].item()), None if trace is None else trace.to(torch.float64))


def _check_same(what: str, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(
            f"cannot merge SOSP-H statistics: {what} covers different parameters or shapes "
            f"({sorted(a)} vs {sorted(b)}); collect every shard with the same model and owner map"
        )


# ------------------------------------------------------------------------------------- helpers


def _owned(model: nn.Module, owner: Mapping[str, torch.Tensor], n_structures: int | None) -> dict[str, torch.Tensor]:
    """Validate ``owner`` against the model: ``{name: owner ids (long, on the param's device)}``."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, ids in owner.items():
        if name not in params:
            raise ConfigError(
                f"owner names parameter {name!r}, which the model does not have: use names from model.named_parameters()"
            )
        p = params[name]
        ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or ids.dim() != 1:
            raise ConfigError(f"owner[{name!r}] must be a 1-D integer tensor, got dtype {ids.dtype} shape {tuple(ids.shape)}")
        if p.dim() == 0 or ids.shape[0] != p.shape[0]:
            raise ConfigError(
                f"owner[{name!r}] has length {ids.shape[0]} but the parameter has shape {tuple(p.shape)}: "
                "give one structure id (or -1) per dim-0 slice"
            )
        if ids.numel() and int(ids.min()) < -1:
            raise ConfigError(f"owner[{name!r}] holds id {int(ids.min())}: ids are 0..n_structures-1, or -1 for none")
        if n_structures is not None and ids.numel() and int(ids.max()) >= n_structures:
            raise ConfigError(
                f"owner[{name!r}] holds structure id {int(ids.max())} but n_structures={n_structures}: "
                "pass n_structures = 1 + the largest id"
            )
        out[name] = ids.to(device=p.device, dtype=torch.long)
    if not any(bool((ids >= 0).any()) for ids in out.values()):
        raise ConfigError("owner assigns no parameter slice to any structure: nothing to score")
    return out


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A dim-0 mask ``[rows]`` (or ``[k, rows]``) shaped to broadcast against ``like`` (``[rows, ...]``)."""
    return mask.reshape(*mask.shape, *([1] * (like.dim() - 1))).to(like.dtype)


class _Functional:
    """``f(owned params...) -> logits`` of one batch through ``functional_call`` (eval mode).

    Every other parameter and every buffer is passed as a fixed detached tensor, so BatchNorm uses
    its running statistics and nothing of the module is written.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.names = names
        named = set(names)
        self.fixed = {n: p.detach() for n, p in model.named_parameters() if n not in named}
        self.fixed.update({n: b for n, b in model.named_buffers()})
        params = dict(model.named_parameters())
        self.primals = tuple(params[n].detach() for n in names)

    def fn(self, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        def f(*owned: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, {**self.fixed, **dict(zip(self.names, owned))}, (x,))

        return f


def _targets(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, r)``: softmax and ``dl/dz = p - onehot(y)``, both ``[N, C]`` in the logits' dtype."""
    if logits.dim() != 2:
        raise ConfigError(f"the model's output has shape {tuple(logits.shape)}: SOSP expects logits [N, classes]")
    n, c = logits.shape
    y = y.to(logits.device).long().reshape(-1)
    if y.shape[0] != n:
        raise ConfigError(f"a batch has {y.shape[0]} labels for {n} examples: labels must be [N]")
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ConfigError(f"labels must be class indices in 0..{c - 1}; got {int(y.min())}..{int(y.max())}")
    p = torch.softmax(logits.detach(), dim=1)
    r = p.clone()
    r[torch.arange(n, device=r.device), y] -= 1
    return p, r


def _apply_h(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``H_n u_n = p_n * u_n - p_n (p_n . u_n)`` for every example (``[N, C]``)."""
    return p * u - p * (p * u).sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------- SOSP-H


def sosp_h_stats(
    model: nn.Module,
    batches: Iterable,
    owner: Mapping[str, torch.Tensor],
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> SospStats:
    """SOSP-H sums over ``batches`` (``(x, y)`` or ``(x, y, idx)``): gradient and ``G theta``.

    Per batch: one ``jvp`` (logits with their autograd graph, and ``u = J theta``), then two
    backward passes through the logits with cotangents ``r`` and ``H u``.
    """
    own = _owned(model, owner, None)
    names = list(own)
    grad_sum = {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in model.named_parameters() if n in own}
    gv_sum = {n: torch.zeros_like(t) for n, t in grad_sum.items()}
    count = 0
    with StatisticsPass(model, "SOSP-H statistics", max_batches=max_batches, progress=progress) as run:
        func = _Functional(model, names)
        theta = tuple(w * _rows(own[n] >= 0, w) for n, w in zip(names, func.primals))
        for x, y, _ in run.batches(batches):
            primals = tuple(w.detach().requires_grad_(True) for w in func.primals)  # aliases: .grad stays untouched
            with torch.enable_grad():
                logits, u = jvp(func.fn(x), primals, theta)
            u = u.detach()
            p, r = _targets(logits, y)
            hu = _apply_h(p, u)
            grads = torch.autograd.grad(logits, primals, r, retain_graph=True, allow_unused=True)
            gvs = torch.autograd.grad(logits, primals, hu, allow_unused=True)
            for n, g, gv in zip(names, grads, gvs):
                if g is not None:  # a parameter the forward never reaches has zero gradient
                    grad_sum[n] += g.detach().to(torch.float64)
                if gv is not None:
                    gv_sum[n] += gv.detach().to(torch.float64)
            count += int(logits.shape[0])
    if count == 0:
        raise ConfigError("no batch was seen: the data given for SOSP statistics is empty")
    return SospStats(grad_sum, gv_sum, count)


def sosp_h_scores(model: nn.Module, owner: Mapping[str, torch.Tensor], stats: SospStats, n_structures: int) -> np.ndarray:
    """``score_s = | -g^T theta_s + 1/2 theta_s^T (G theta) |`` ``[n_structures]`` float64.

    ``g = grad_sum / count``, ``G theta = gv_sum / count``; ``theta_s`` is read from the model's
    current parameters, which must be those the statistics were collected with.
    """
    if n_structures < 1:
        raise ConfigError(f"n_structures={n_structures} must be >= 1")
    if stats.count < 1:
        raise ConfigError("the SOSP-H statistics are empty (count=0): collect them with sosp_h_stats first")
    own = _owned(model, owner, n_structures)
    missing = [n for n in own if n not in stats.grad_sum or n not in stats.gv_sum]
    if missing:
        raise ConfigError(f"the SOSP-H statistics lack parameters {missing}: collect them with the same owner map")
    params = dict(model.named_parameters())
    delta = torch.zeros(n_structures, dtype=torch.float64)
    for n, ids in own.items():
        w = params[n].detach().to(torch.float64)
        g = stats.grad_sum[n].to(w.device) / stats.count
        gth = stats.gv_sum[n].to(w.device) / stats.count
        per_row = (w * (0.5 * gth - g)).reshape(w.shape[0], -1).sum(dim=1)  # [rows]
        keep = ids >= 0
        delta.index_add_(0, ids[keep].cpu(), per_row[keep].cpu())
    return delta.abs().numpy()


# ---------------------------------------------------------------------------------------- SOSP-I


def _compress(v: torch.Tensor) -> torch.Tensor:
    """A factor with at most ``S`` columns and the same ``v v^T`` (``v^T = QR`` -> ``R^T``)."""
    if v.shape[1] <= v.shape[0]:
        return v
    return torch.linalg.qr(v.T, mode="r").R.T.contiguous()


def _layer_axis(module: nn.Module) -> int | None:
    """The output axis whose channel ``o`` depends on the dim-0 slice ``o`` of the module's own
    parameters and on nothing else of them, or None for a module raykfe does not know that of."""
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return 1
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return 1
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm):
        if type(module).forward is nn.LayerNorm.forward:
            return -len(module.normalized_shape)
        return 1 if len(module.normalized_shape) == 1 else None  # a channels-first wrapper (LayerNorm2d)
    params = list(module.parameters(recurse=False))  # a per-channel scale [C, 1, ..., 1] (ConvNeXt's layer scale)
    if params and all(p.dim() >= 2 and all(d == 1 for d in p.shape[1:]) for p in params):
        return 1
    return None


class _Probe:
    """Reverse-mode SOSP-I: ``v_s = <J^T a, theta_s>`` for every structure from ONE backward pass.

    Every module owning structure slices gets a forward hook that adds a zero leaf to its output
    (whose gradient is then ``dlogits/doutput`` contracted with the cotangent ``a``) and keeps the
    module's JVP along its owned slices, ``dy``, computed on the hook's input. Channel ``o`` of ``dy``
    is the JVP along the structure owning slice ``o`` alone (the module acts per channel:
    :func:`_layer_axis`), so ``<J^T a, theta_s> = sum over the calls and channels of s of
    sum_positions grad * dy``: per example, because the examples of an eval-mode batch are independent.
    """

    def __init__(self, model: nn.Module, own: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.layers: dict[nn.Module, tuple[str, list[str], torch.Tensor, int]] = {}
        self.masks: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self.unsupported: list[str] = []
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for pname, ids in own.items():
            mod, _, local = pname.rpartition(".")
            by_module.setdefault(mod, {})[local] = ids
        for mod, params in by_module.items():
            module = model.get_submodule(mod)
            axis = _layer_axis(module)
            chan = None
            for ids in params.values():
                if chan is None:
                    chan = ids.clone()
                elif chan.shape != ids.shape or bool(((chan >= 0) & (ids >= 0) & (chan != ids)).any()):
                    axis = None  # two parameters of one channel owned by different structures
                    break
                else:
                    chan = torch.where(chan >= 0, chan, ids)
            if axis is None:
                self.unsupported.append(f"{mod or 'the model'} ({type(module).__name__})")
                continue
            self.layers[module] = (mod, list(params), chan, axis)
            self.masks[module] = {n: ids >= 0 for n, ids in params.items()}
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.busy = False
        self.handles: list = []

    def __enter__(self) -> "_Probe":
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.calls = [], []

    def _hook(self, module, args, kwargs, out):
        if self.busy:
            return None
        name, locals_, chan, axis = self.layers[module]
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[axis] != chan.shape[0]:
            raise ConfigError(
                f"SOSP-I cannot read {name} ({type(module).__name__}): its output {tuple(getattr(out, 'shape', ()))} has "
                f"no axis of its {chan.shape[0]} channels where raykfe expects one: use method sosp-h"
            )
        own = dict(module.named_parameters(recurse=False))
        primals = tuple(own[n].detach() for n in locals_)
        tangents = tuple(p * _rows(self.masks[module][n], p) for n, p in zip(locals_, primals))
        f = lambda *ps: functional_call(module, dict(zip(locals_, ps)), args, kwargs)  # noqa: E731
        self.busy = True
        try:
            with torch.no_grad():
                dy = jvp(f, primals, tangents)[1]
        finally:
            self.busy = False
        m = out.shape[0]
        dy = dy.detach().movedim(axis, 1).reshape(m, chan.shape[0], -1)
        leaf = torch.zeros_like(out, requires_grad=True)
        self.calls.append((leaf, dy, chan.to(out.device), axis))
        return out + leaf

    def contract(self, logits: torch.Tensor, cotangent: torch.Tensor, n_structures: int) -> torch.Tensor:
        """``[S, m]``: ``<J_n^T cotangent_n, theta_s>`` for every structure and example."""
        leaves = [c[0] for c in self.calls]
        grads = torch.autograd.grad(logits, leaves, cotangent, retain_graph=True, allow_unused=True)
        m = logits.shape[0]
        out = torch.zeros(n_structures, m, dtype=torch.float64, device=logits.device)
        for (_, dy, chan, axis), g in zip(self.calls, grads):
            if g is None:
                continue
            per = (g.movedim(axis, 1).reshape(m, chan.shape[0], -1) * dy).sum(dim=-1)  # [m, channels]
            keep = chan >= 0
            out.index_add_(0, chan[keep], per[:, keep].T.to(torch.float64))
        return out


def _softmax_columns(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangents ``a_j = sqrt(p_c) (e_c - p)`` for each example's ``k`` most probable classes ``c``
    (``[k, m, C]``; ``H = sum over all C of a a^T``) and the share of ``trace(H)`` they keep, summed."""
    m, C = p.shape
    top = p.topk(k, dim=1).indices  # [m, k]
    norms = p * (1 - 2 * p + p.square().sum(dim=1, keepdim=True))  # ||a_c||^2 for every class
    kept = norms.gather(1, top).sum()
    cols = []
    rows = torch.arange(m, device=p.device)
    for j in range(k):
        c = top[:, j]
        pc = p[rows, c].sqrt()[:, None]
        a = -pc * p
        a[rows, c] += pc[:, 0]
        cols.append(a)
    return torch.stack(cols), torch.stack([kept, norms.sum()]).to(torch.float64)


def sosp_i_stats(
    model: nn.Module,
    batches: Iterable,
    owner: Mapping[str, torch.Tensor],
    n_structures: int,
    *,
    max_batches: int | None = None,
    classes: int | None = None,
    mode: str = "auto",
    chunk: int = 32,
    progress: bool = False,
) -> SospIStats:
    """SOSP-I sums over ``batches``: a factor ``v`` of ``q_sum`` and ``g_sum`` (module docstring).

    ``mode="reverse"`` (the default where every owning module is one raykfe knows, ``"auto"``):
    per batch one forward and ``k + 1`` backward passes, ``k`` the softmax directions kept per
    example (``classes``, None: all, exact); ``mode="forward"``: one JVP per structure per example
    (``chunk`` structures per vmapped call), exact, refused above ``MAX_SOSP_I_STRUCTURES``.
    """
    if n_structures < 1:
        raise ConfigError(f"n_structures={n_structures} must be >= 1")
    if chunk < 1:
        raise ConfigError(f"chunk={chunk} must be >= 1 (structures per vmapped JVP)")
    if classes is not None and classes < 1:
        raise ConfigError(f"sosp.classes={classes} must be >= 1, or null for every class")
    if mode not in ("auto", "reverse", "forward"):
        raise ConfigError(f"SOSP-I mode={mode!r}: use 'auto', 'reverse' or 'forward'")
    own = _owned(model, owner, n_structures)
    S = n_structures
    probe = _Probe(model, own)
    if mode == "auto":
        mode = "forward" if probe.unsupported else "reverse"
    if mode == "reverse" and probe.unsupported:
        raise ConfigError(f"SOSP-I's reverse mode cannot read {', '.join(probe.unsupported)}: use mode 'forward' or method sosp-h")
    if mode == "forward" and S > MAX_SOSP_I_STRUCTURES:
        raise ConfigError(
            f"n_structures={n_structures} is above the SOSP-I limit of {MAX_SOSP_I_STRUCTURES} for "
            f"{', '.join(probe.unsupported) or 'forward mode'} (S JVPs per example): use method sosp-h"
        )
    device = next(model.parameters()).device
    g_sum = torch.zeros(S, dtype=torch.float64, device=device)
    trace = torch.zeros(2, dtype=torch.float64)
    parts: list[torch.Tensor] = []
    width = 0
    count = 0
    with StatisticsPass(model, "SOSP-I statistics", max_batches=max_batches, progress=progress) as run:
        func = _Functional(model, list(own)) if mode == "forward" else None
        for x, y, _ in run.batches(batches):
            if mode == "reverse":
                with probe, torch.enable_grad():
                    logits = model(x)
                    p, r = _targets(logits, y)
                    k = min(classes or logits.shape[1], logits.shape[1])
                    cots, tr = _softmax_columns(p, k)
                    cols = torch.stack([probe.contract(logits, a, S) for a in cots], dim=2)  # [S, m, k]
                    g_sum += probe.contract(logits, r, S).sum(dim=1)
                trace += tr.cpu()
                v = cols.reshape(S, -1)
            else:
                v, g = _forward_columns(func, x, y, own, S, chunk, device)
                g_sum += g
                trace += 1.0  # every direction kept: the shares are equal
            parts.append(v)
            width += v.shape[1]
            if width > 2 * S:  # keep at most S columns (plus one batch)
                parts = [_compress(torch.cat(parts, dim=1))]
                width = parts[0].shape[1]
            count += int(x.shape[0])
    if count == 0:
        raise ConfigError("no batch was seen: the data given for SOSP statistics is empty")
    return SospIStats(_compress(torch.cat(parts, dim=1)), g_sum, count, trace)


def _forward_columns(func: "_Functional", x, y, own, S: int, chunk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward mode: ``U [S, m, C]`` by one JVP per structure, then the factor columns
    ``sqrt(p_c) (u_c - p . u)`` of every example and class, and ``g`` ``[S]``."""
    names = list(own)
    with torch.no_grad():
        logits = func.fn(x)(*func.primals)
    p, r = _targets(logits, y)
    n_ex, C = logits.shape
    m = max(1, min(n_ex, _U_BUDGET // max(1, S * C)))
    starts = list(range(0, S, chunk))

    def tangents(start: int) -> tuple[torch.Tensor, ...]:
        ids = torch.arange(start, min(start + chunk, S), device=device)
        return tuple(_rows(own[n].to(device)[None, :] == ids[:, None], w) * w[None] for n, w in zip(names, func.primals))

    cols, g = [], torch.zeros(S, dtype=torch.float64, device=device)
    for lo in range(0, n_ex, m):
        pm, rm = p[lo:lo + m].to(torch.float64), r[lo:lo + m].to(torch.float64)
        U = _structure_jvps(func.fn(x[lo:lo + m]), func.primals, tangents, starts, (S, pm.shape[0], C), device)
        centred = U - torch.einsum("smc,mc->sm", U, pm)[..., None]
        cols.append((centred * pm.sqrt()[None]).reshape(S, -1))
        g += torch.einsum("smc,mc->s", U, rm)
    return torch.cat(cols, dim=1), g


def _structure_jvps(f, primals, tangents, starts, shape, device) -> torch.Tensor:
    """``U [S, m, C]``: the logits' JVP along every structure's tangent, ``chunk`` structures per
    vmapped call (``tangents(start)`` gives them; a chunk of one is a plain JVP)."""
    U = torch.empty(*shape, dtype=torch.float64, device=device)
    for start in starts:
        T = tangents(start)
        with torch.no_grad():
            if T[0].shape[0] == 1:
                u = jvp(f, primals, tuple(t[0] for t in T))[1][None]
            else:
                u = vmap(lambda *t: jvp(f, primals, t)[1])(*T)
        U[start : start + u.shape[0]] = u.to(torch.float64)
    return U


def sosp_i_rows(stats: SospIStats, *, block: int = 2048, max_pairs: int | None = None, seed: int = 0,
                workers: int | None = None) -> tuple[np.ndarray, GramRows]:
    """``(scores, rows)``: ``score_s = | -gdot_s + 1/2 Q_ss | + 1/2 sum_{s' != s} |Q_ss'|`` ``[S]``
    float64, the row sums of ``|Q|`` computed in blocks (:func:`raykfe.methods.gram.gram_abs_rows`,
    sampled when ``max_pairs`` is below the number of block pairs).

    The SOSP-I saliency from s's row of ``Q``: an upper bound on ``|s's share of dL(M)|`` over every
    removal set ``M`` containing ``s`` (module docstring).
    """
    if stats.count < 1:
        raise ConfigError("the SOSP-I statistics are empty (count=0): collect them with sosp_i_stats first")
    rows = gram_abs_rows(stats.v, block=block, max_pairs=max_pairs, seed=seed, workers=workers)
    n = stats.count
    diag = rows.diag / n
    gdot = stats.g_sum.detach().cpu().to(torch.float64).numpy() / n
    off = rows.rows / n - np.abs(diag)
    return np.abs(0.5 * diag - gdot) + 0.5 * off, rows


def sosp_i_scores(stats: SospIStats, **kw) -> np.ndarray:
    """The SOSP-I scores alone (:func:`sosp_i_rows`)."""
    return sosp_i_rows(stats, **kw)[0]


# ------------------------------------------------------------------------------------------ methods


def structure_owner(model: nn.Module, graph) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """SOSP structures of a channel graph: a structure is a group channel with ALL its dim-0
    parameter slices (conv rows and biases, norm scales and shifts: everything channel surgery
    slices), so removing it makes the channel exactly zero in eval mode. Returns ``owner[param
    name]`` (each dim-0 slice's structure id, group offset + channel, or -1), ``{group: offset}``
    and the number of structures."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[str, torch.Tensor] = {}
    offsets, total = {}, 0
    for g in graph.groups:
        offsets[g.name] = total
        for m in g.members:
            if m.kind != "out":
                continue
            for p in model.get_submodule(m.module).parameters(recurse=False):
                name = names.get(id(p))
                if name is None or p.dim() == 0 or p.shape[0] <= int(m.index.max(initial=-1)):
                    continue
                ids = owner.setdefault(name, torch.full((p.shape[0],), -1, dtype=torch.long))
                ids[torch.as_tensor(m.index)] = torch.as_tensor(m.root + total)
        total += g.size
    return owner, offsets, total


def owner_to_lists(owner: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """``owner`` as JSON-able lists (what travels to Ray Train workers in a statistic's spec)."""
    return {k: [int(i) for i in v.tolist()] for k, v in owner.items()}


def owner_from_lists(owner: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.long) for k, v in owner.items()}


@register_statistic("sosp-h")
def _sosp_h_statistic(model, batches, spec, *, fisher, seed, max_batches, progress) -> dict[str, torch.Tensor]:
    return sosp_h_stats(model, batches, owner_from_lists(spec["owner"]), max_batches=max_batches, progress=progress).to_tensors()


@register_statistic("sosp-i")
def _sosp_i_statistic(model, batches, spec, *, fisher, seed, max_batches, progress) -> dict[str, torch.Tensor]:
    return sosp_i_stats(model, batches, owner_from_lists(spec["owner"]), spec["n_structures"], max_batches=max_batches,
                        classes=spec.get("classes"), progress=progress).to_tensors()


def sosp_i_cost(S: int, classes: int | None, num_classes: int, block: int, max_pairs: int | None) -> str:
    """What an SOSP-I run will cost, said before it starts: passes per batch and the block pairs of Q."""
    from .gram import block_pairs

    k = min(classes or num_classes, num_classes)
    pairs, B, total = block_pairs(S, block, max_pairs)
    gflop = 2.0 * len(pairs) * min(block, S) ** 2 * S / 1e9  # the factor has at most S columns
    kind = "every pair" if len(pairs) == total else f"{len(pairs)} of {total} pairs sampled"
    return (f"sosp-i: {S} structures; per batch 1 forward and {k + 1} backward passes ({k} softmax direction"
            f"{'s' if k != 1 else ''} per example, about {(2 * k + 4) / 3:.1f} training steps); Q in {B} block"
            f"{'s' if B != 1 else ''} of {min(block, S)}: {kind}, at most {gflop:.1f} GFLOP")


class Sosp(Method):
    """SOSP-H / SOSP-I: every group channel is a structure (:func:`structure_owner`), scored from
    the statistic of the same name, all-reduced across workers (SOSP-I's factor: gathered)."""

    def channel_scores(self, model, graph, source, settings) -> ChannelScores:
        owner, offsets, total = structure_owner(model, graph)
        spec = {"owner": owner_to_lists(owner), "n_structures": total}
        if self.name == "sosp-i":
            probe = _Probe(model, _owned(model, owner, total))
            if probe.unsupported and total > MAX_SOSP_I_STRUCTURES:  # refuse before the pass, not after
                raise ConfigError(
                    f"the model has {total} channel structures and SOSP-I's reverse mode cannot read "
                    f"{', '.join(probe.unsupported)}; forward mode stops at {MAX_SOSP_I_STRUCTURES} structures "
                    "(S JVPs per example): use method sosp-h, which costs one JVP per batch"
                )
            spec["classes"] = settings.sosp_classes
            out = _logits_width(model)
            source.log("raykfe: " + sosp_i_cost(total, settings.sosp_classes, out, settings.sosp_block, settings.sosp_max_pairs))
        tensors = source.measure(self.statistics, spec)
        if self.name == "sosp-h":
            s = sosp_h_scores(model, owner, SospStats.from_tensors(tensors), total)
        else:
            stats = SospIStats.from_tensors(tensors)
            t0 = time.perf_counter()
            s, rows = sosp_i_rows(stats, block=settings.sosp_block, max_pairs=settings.sosp_max_pairs, seed=settings.seed)
            source.log(f"raykfe: sosp-i: {stats.count} examples, Q factor of {stats.v.shape[1]} columns, "
                       f"{rows.pairs} of {rows.total_pairs} block pairs in {time.perf_counter() - t0:.1f} s; "
                       f"softmax curvature kept {100 * stats.share():.1f}%"
                       + ("" if rows.exact else f"; sampled row sums: median relative standard error "
                                                f"{100 * rows.relative_error():.1f}%"))
        s = np.asarray(s, dtype=np.float64)
        return ChannelScores({g.name: s[offsets[g.name]:offsets[g.name] + g.size] for g in graph.groups})


def _logits_width(model: nn.Module) -> int:
    """The number of classes: the last Linear's output width (what the softmax directions count)."""
    spec = getattr(model, "raykfe_spec", None) or {}
    if spec.get("num_classes"):
        return int(spec["num_classes"])
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(last[-1].out_features) if last else 1


#: scores divided by their group's mean before the global ranking (bench/quality.py, seed 0: BENCHMARKS.md)
register(Sosp("sosp-h", "channels", "sosp-h", "SOSP-H: one Gauss-Newton-vector product scores every channel",
              defaults={"normalize": "mean"}))
register(Sosp("sosp-i", "channels", "sosp-i", "SOSP-I: pairwise Gauss-Newton interactions of all channels",
              defaults={"normalize": "mean"}))
