"""Apply a plan to a model: each pruned layer becomes rotation -> core -> rotation (ALGORITHMS.md s. 4).

With the kept input directions ``J`` (columns of ``Q_A``) and output directions ``R`` (columns of
``Q_S``), ``Q_A' = Q_A[:, J]``, ``Q_S' = Q_S[:, R]`` and ``W'' = W'[R][:, J]``:

* Linear:        ``rot_in`` Linear(d_in -> r_in) = ``Q_A'^T``, ``core`` Linear(r_in -> r_out) = ``W''``,
  ``rot_out`` Linear(r_out -> d_out) = ``Q_S'``.
* Conv2d patch:  ``rot_in`` 1x1 conv (in_c -> r_in), ``core`` conv with the original kernel, stride,
  padding and dilation (r_in -> r_out), ``rot_out`` 1x1 conv (r_out -> out_c).
* Conv2d full:   ``rot_in`` conv with the original kernel/stride/padding/dilation whose filters are
  the columns of ``Q_A'`` reshaped to ``[in_c, kh, kw]``, ``core`` 1x1, ``rot_out`` 1x1.

Where the bias is folded into ``W~`` (the homogeneous coordinate, see :mod:`raykfe.layers`), the
last row of ``Q_A'`` (the constant input) becomes the bias of ``rot_in``: ``Q_A'^T [x; 1]`` is a
1x1 conv with bias, and zero padding of its output is exactly zero padding of ``[x; 1]``, so the
rebuilt layer is exact at the borders too. (ALGORITHMS.md suggests the last layer; that is exact
only without padding, so raykfe puts it first.) An unfolded bias stays a plain bias on ``rot_out``.

The output width is unchanged, so BatchNorm, residual additions and following layers are untouched.

Forms (ALGORITHMS.md section 11; chosen by :func:`raykfe.plan.select`, recorded as
``LayerPlan.form``): :func:`to_form` folds the three layers, exactly up to rounding, into

* ``fold_out``: ``rot_in`` -> ``core`` with ``rot_out`` folded in (the core's geometry, c_out
  outputs, ``rot_out``'s bias);
* ``fold_in``: ``core`` with ``rot_in`` folded in (the geometry of whichever of the two has the
  kernel, c_in inputs) -> ``rot_out``. A patch-mode ``rot_in`` with a folded bias is never folded
  into a k x k core (zero padding of ``P_in x + b`` is not a padding of the folded conv).

A folded module keeps the names of what is left (``rot_in``/``core`` or ``core``/``rot_out``), so
its checkpoint loads into the same shape built from the plan.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from .plan import LayerPlan, Plan

__all__ = ["KFELinear", "KFEConv2d", "make_kfe_shell", "fill_kfe", "apply_plan", "rebuild", "set_module", "freeze_rotations",
           "to_form", "compose_after", "rotations"]


class KFELinear(nn.Sequential):
    """A pruned Linear: ``rot_in`` (Q_A'^T) -> ``core`` (W'') -> ``rot_out`` (Q_S')."""


class KFEConv2d(nn.Sequential):
    """A pruned Conv2d: ``rot_in`` -> ``core`` -> ``rot_out`` (see the module docstring)."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def make_kfe_shell(module: nn.Module, lp: LayerPlan) -> nn.Sequential:
    """The three-layer module for ``lp`` with the right shapes (weights uninitialised)."""
    r_in, r_out = lp.r_in, lp.r_out
    dev, dt = module.weight.device, module.weight.dtype
    kw = {"device": dev, "dtype": dt}
    out_bias = lp.has_bias and not lp.fold_bias
    if isinstance(module, nn.Linear):
        return KFELinear(
            OrderedDict({
                "rot_in": nn.Linear(module.in_features, r_in, bias=lp.fold_bias, **kw),
                "core": nn.Linear(r_in, r_out, bias=False, **kw),
                "rot_out": nn.Linear(r_out, module.out_features, bias=out_bias, **kw),
            })
        )
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
    if lp.mode == "patch":
        rot_in = nn.Conv2d(module.in_channels, r_in, 1, bias=lp.fold_bias, **kw)
        core = nn.Conv2d(r_in, r_out, module.kernel_size, bias=False, **conv, **kw)
    else:
        rot_in = nn.Conv2d(module.in_channels, r_in, module.kernel_size, bias=lp.fold_bias, **conv, **kw)
        core = nn.Conv2d(r_in, r_out, 1, bias=False, **kw)
    rot_out = nn.Conv2d(r_out, module.out_channels, 1, bias=out_bias, **kw)
    return KFEConv2d(OrderedDict(rot_in=rot_in, core=core, rot_out=rot_out))


@torch.no_grad()
def fill_kfe(shell: nn.Sequential, module: nn.Module, lp: LayerPlan, QA: torch.Tensor, QS: torch.Tensor, w_kfe: torch.Tensor) -> None:
    """Write ``Q_A'``, ``W''`` and ``Q_S'`` (float64 in, cast to the layer's dtype) into ``shell``."""
    J = torch.as_tensor(lp.keep_in, dtype=torch.long)
    R = torch.as_tensor(lp.keep_out, dtype=torch.long)
    qa = QA[:, J]  # [d_in, r_in]
    qs = QS[:, R]  # [d_out, r_out]
    core = w_kfe[R][:, J]  # [r_out, r_in(, k*k)]
    rot_in, core_m, rot_out = shell.rot_in, shell.core, shell.rot_out
    dt = rot_in.weight.dtype
    qa_w = qa[:-1] if lp.fold_bias else qa  # rows of the real inputs
    if lp.fold_bias:
        rot_in.bias.copy_(qa[-1].to(dt))
    if lp.kind == "linear":
        rot_in.weight.copy_(qa_w.T.to(dt))
        core_m.weight.copy_(core.to(dt))
        rot_out.weight.copy_(qs.to(dt))
    elif lp.mode == "patch":
        rot_in.weight.copy_(qa_w.T.reshape(lp.r_in, -1, 1, 1).to(dt))
        core_m.weight.copy_(core.reshape(core_m.weight.shape).to(dt))
        rot_out.weight.copy_(qs.reshape(*qs.shape, 1, 1).to(dt))
    else:
        rot_in.weight.copy_(qa_w.T.reshape(rot_in.weight.shape).to(dt))
        core_m.weight.copy_(core.reshape(*core.shape, 1, 1).to(dt))
        rot_out.weight.copy_(qs.reshape(*qs.shape, 1, 1).to(dt))
    if lp.has_bias and not lp.fold_bias:
        rot_out.bias.copy_(module.bias.detach())


@torch.no_grad()
def compose_after(first: nn.Module, second: nn.Module) -> nn.Module:
    """``x -> second(first(x))`` as one module with ``first``'s geometry; ``second`` is a 1x1 conv
    or a Linear (float64 arithmetic, cast back to ``first``'s dtype)."""
    ws = second.weight.reshape(second.weight.shape[0], -1).to(torch.float64)  # [out, mid]
    w = torch.einsum("nr,r...->n...", ws, first.weight.to(torch.float64))
    bias = ws @ first.bias.to(torch.float64) if first.bias is not None else None
    if second.bias is not None:
        bias = second.bias.to(torch.float64) if bias is None else bias + second.bias.to(torch.float64)
    new = copy.deepcopy(first)
    if isinstance(new, nn.Linear):
        new.out_features = w.shape[0]
    else:
        new.out_channels = w.shape[0]
    new.weight = nn.Parameter(w.to(first.weight.dtype))
    new.bias = nn.Parameter(bias.to(first.weight.dtype)) if bias is not None else None
    return new


@torch.no_grad()
def _compose_before(first: nn.Module, second: nn.Module) -> nn.Module:
    """``x -> second(first(x))`` as one module with ``second``'s geometry; ``first`` is a 1x1 conv
    without bias (a Linear or a biased one go through :func:`compose_after`)."""
    assert first.bias is None, "a biased 1x1 before a k x k conv does not fold exactly"
    wf = first.weight.reshape(first.weight.shape[0], -1).to(torch.float64)  # [mid, in]
    w = torch.einsum("om...,mc->oc...", second.weight.to(torch.float64), wf)
    new = copy.deepcopy(second)
    new.in_channels = w.shape[1]
    new.weight = nn.Parameter(w.to(second.weight.dtype))
    return new


def to_form(shell: nn.Sequential, form: str) -> nn.Sequential:
    """The three-layer ``shell`` in ``form`` (module docstring): the same function, fewer layers."""
    if form == "three":
        return shell
    cls = type(shell)
    if form == "fold_out":
        return cls(OrderedDict(rot_in=shell.rot_in, core=compose_after(shell.core, shell.rot_out)))
    if form != "fold_in":
        raise ValueError(f"unknown layer form {form!r}")
    patch = isinstance(shell.core, nn.Conv2d) and tuple(shell.rot_in.kernel_size) == (1, 1) and shell.rot_in.stride == (1, 1) \
        and shell.rot_in.padding in ((0, 0), "valid") and shell.rot_in.bias is None  # the core holds the geometry
    core = _compose_before(shell.rot_in, shell.core) if patch else compose_after(shell.rot_in, shell.core)
    return cls(OrderedDict(core=core, rot_out=shell.rot_out))


def rotations(module: nn.Module) -> list[nn.Module]:
    """The rotation layers a KFE layer still has (none once both are folded into its core)."""
    return [getattr(module, n) for n in ("rot_in", "rot_out") if hasattr(module, n)] \
        if isinstance(module, (KFELinear, KFEConv2d)) else []


def freeze_rotations(model: nn.Module, freeze: bool = True) -> None:
    """Make the rotations of every KFE layer (non-)trainable; cores always train."""
    for m in model.modules():
        for sub in rotations(m):
            for p in sub.parameters():
                p.requires_grad_(not freeze)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """A NEW model with every ``kfe`` layer of ``plan`` replaced by its form (``lp.form``).

    ``weights[name] = (Q_A, Q_S, W')`` fills the new layers; without it (loading a checkpoint) the
    shells are left for ``load_state_dict``. ``model`` itself is not modified.
    """
    new = copy.deepcopy(model)
    for name, lp in plan.layers.items():
        if lp.action != "kfe":
            continue
        old = new.get_submodule(name)
        shell = make_kfe_shell(old, lp)
        if weights is not None:
            qa, qs, wk = weights[name]
            fill_kfe(shell, old, lp, qa, qs, wk)
        set_module(new, name, to_form(shell, lp.form))
    freeze_rotations(new, plan.freeze_rotations)
    return new


def rebuild(model: nn.Module, plan: Plan, weights=None) -> nn.Module:
    """A NEW model with ``plan``'s structure: its ``nn.MultiheadAttention`` modules as raykfe's
    :class:`raykfe.attention.Attention` (as the engine pruned them; their state_dicts load either
    way), its channel removals (traced on ``plan.input_shape``), then its KFE layers (filled from
    ``weights`` when given, else left for ``load_state_dict``)."""
    from .attention import attention_names, convert_attention

    if attention_names(model):
        model = copy.deepcopy(model)
        convert_attention(model)
    if plan.removed:
        from .channels import apply_channels
        from .errors import StorageError

        if not plan.input_shape:
            raise StorageError("the plan removes channels but records no input_shape: re-run the job that wrote it")
        model = apply_channels(model, torch.zeros(1, *plan.input_shape), plan.removed)
    return apply_plan(model, plan, weights)
