"""Iterative EigenDamage (ALGORITHMS.md section 5): rounds of prune -> fine-tune -> re-collect ->
re-decompose -> merge, driven by a schedule towards the final params/FLOPs target.

Round 1 is the one-pass method. In round r > 1 a layer that is already three layers is pruned
through its ``core``: K-FAC statistics are collected on the core (whose input is already rotated),
its eigenbasis ``(Q_A_new, Q_S_new)`` scores the core's directions, and the kept directions are
merged into the outer rotations, so the layer stays three layers:

    rot_in  <- Q_A_new'^T . rot_in        (Q_A <- Q_A_prev @ Q_A_new when rotations are frozen)
    core    <- Q_S_new'^T . core . Q_A_new'
    rot_out <- rot_out . Q_S_new'          (Q_S <- Q_S_prev @ Q_S_new)

The merge composes the modules as they are (after fine-tuning the rotations need not be
orthonormal), so it is exact: the merged layer computes what the round's three-layer core inside
the old rotations computes. Layers left dense in a round are scored as dense layers in the next.

Schedule: with base cost ``B``, final fraction ``F`` and ``R`` rounds, round r aims at a model of
cost ``B (1 - F)^(r/R)`` (geometric: the same share of what is left every round), expressed as a
fraction of the current model's cost; the last round aims at exactly ``B (1 - F)``. The per-round
layer cap defaults to 0.5 (the paper's protocol). The selection counts the MERGED layer's exact cost
(``meta["c_out"]``, ``meta["ranks"]``: see :func:`raykfe.plan.kfe_cost`), so the plan's counts equal
the rebuilt model's.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
import dataclasses
from typing import Mapping

import torch
from torch import nn

from .layers import make_adapter
from .plan import LayerPlan, Plan, Target, parse_target
from .surgery import KFEConv2d, KFELinear, compose_after, fill_kfe, freeze_rotations, make_kfe_shell, set_module, to_form

__all__ = ["round_layer_names", "round_metas", "round_target", "merge_round", "compose_plan"]

_KFE = (KFELinear, KFEConv2d)


def round_layer_names(model: nn.Module, names) -> dict[str, str]:
    """``{layer: module to collect statistics on}``: the ``core`` of a rebuilt layer, else itself."""
    return {n: f"{n}.core" if isinstance(model.get_submodule(n), _KFE) else n for n in names}


def round_metas(
    model: nn.Module, metas: Mapping[str, dict], collected: Mapping[str, dict], names: Mapping[str, str]
) -> dict[str, dict]:
    """Selection metas of this round: the ORIGINAL layer's geometry (so costs are those of the
    merged layer), with the core's direction counts and current ranks for a rebuilt layer."""
    out = {}
    for n, target in names.items():
        if target == n:
            out[n] = dict(metas[n])
            continue
        core = collected[target]
        shell = model.get_submodule(n)
        r_in, r_out = _width(shell.core, "in"), _width(shell.core, "out")
        out[n] = {**metas[n], "c_out": metas[n]["d_out"], "d_in": core["d_in"], "d_out": core["d_out"], "ranks": [r_in, r_out]}
    return out


def _width(m: nn.Module, side: str) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features if side == "in" else m.out_features
    return m.in_channels if side == "in" else m.out_channels


def round_target(final: "str | Target", base: float, current: float, r: int, rounds: int) -> Target:
    """Round ``r``'s (1-based) target as a fraction of the CURRENT model's cost (see the module doc)."""
    tgt = parse_target(final)
    if tgt.kind == "directions":
        from .errors import ConfigError

        raise ConfigError("iterative rounds need a params:F or flops:F target (directions:F is one-pass only)")
    goal = base * (1.0 - tgt.fraction) ** (r / rounds)
    frac = 1.0 - goal / current
    return Target(tgt.kind, min(max(frac, 1e-6), 1.0 - 1e-6))


def merge_round(
    model: nn.Module,
    plan: Plan,
    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    conv_mode: str,
    freeze: bool = False,
) -> nn.Module:
    """A NEW model with round ``plan`` applied: plain layers become three layers, rebuilt ones get a
    smaller core merged into their rotations. ``weights[layer] = (Q_A, Q_S, W')`` of the module the
    round collected statistics on (the core for a rebuilt layer)."""
    new = copy.deepcopy(model)
    for name, lp in plan.layers.items():
        if lp.action != "kfe":
            continue
        module = new.get_submodule(name)
        qa, qs, wk = weights[name]
        if not isinstance(module, _KFE):
            shell = make_kfe_shell(module, lp)
            fill_kfe(shell, module, lp, qa, qs, wk)
            set_module(new, name, to_form(shell, lp.form))
            continue
        if not (hasattr(module, "rot_in") and hasattr(module, "rot_out")):
            raise ValueError(f"{name} is folded ({', '.join(dict(module.named_children()))}): only a three-layer form prunes again")
        core = module.core
        adapter = make_adapter(f"{name}.core", core, conv_mode)
        core_lp = dataclasses.replace(lp, fold_bias=adapter.fold_bias, has_bias=adapter.has_bias, d_in=adapter.d_in, d_out=adapter.d_out)
        inner = make_kfe_shell(core, core_lp)
        fill_kfe(inner, core, core_lp, qa, qs, wk)
        merged = type(module)(
            OrderedDict(rot_in=compose_after(module.rot_in, inner.rot_in), core=inner.core,
                        rot_out=compose_after(inner.rot_out, module.rot_out))
        )
        set_module(new, name, to_form(merged, lp.form))
    freeze_rotations(new, freeze)
    return new


def compose_plan(previous: Plan | None, current: Plan, metas: Mapping[str, dict], round_index: int) -> Plan:
    """The plan of the model after this round, relative to the ORIGINAL layers (what
    :func:`raykfe.surgery.apply_plan` needs to rebuild the shells on load): a rebuilt layer keeps
    ``r_in``/``r_out`` directions (the indices no longer name eigenvectors of the original factors)."""
    from .plan import dense_cost

    layers: dict[str, LayerPlan] = {}
    for name, lp in current.layers.items():
        before = previous.layers.get(name) if previous is not None else None
        m = metas[name]
        dense_p, dense_m = dense_cost(m)
        if lp.action == "kfe":
            layers[name] = dataclasses.replace(
                lp, d_in=m["d_in"], d_out=m["d_out"], keep_in=list(range(lp.r_in)), keep_out=list(range(lp.r_out)),
                dense_params=dense_p, dense_macs=dense_m,
                predicted_dloss=lp.predicted_dloss + (before.predicted_dloss if before is not None else 0.0),
                reason=f"last pruned in round {round_index}",
            )
        elif before is not None:
            layers[name] = before
        else:
            layers[name] = dataclasses.replace(lp, dense_params=dense_p, dense_macs=dense_m)
    return dataclasses.replace(
        current, layers=layers, base_params=previous.base_params if previous is not None else current.base_params,
        base_macs=previous.base_macs if previous is not None else current.base_macs,
    )
