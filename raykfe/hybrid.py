"""Hybrid plans for the KFE methods: layers without a KFE form lose whole channels.

A depthwise or other grouped conv has no Kronecker-factored eigenbasis here, so EigenDamage leaves
it dense, and on a depthwise-separable network that caps what it can remove (the depthwise convs
and everything coupled to them). A hybrid plan removes channels of every channel group
(:class:`raykfe.channels.ChannelGraph`) that has such a conv among its members, together with the
coupled layers (the pointwise conv that feeds it, its BatchNorms, the layer that reads it), while
the other layers lose eigen-directions as usual; one ranking, one bisection, one surgery, one plan
(:func:`raykfe.plan.select` with ``channels=``).

Decisions:

* **Which layers are channel-space.** Every Conv/Linear that is a member ("out" or "in") of a
  hybrid group is pruned through that group and NOT in the eigenbasis, so the two kinds of unit
  never change each other's cost (a KFE layer's widths are those of groups that are not hybrid).
  On a MobileNet every pointwise conv touches a depthwise group, so the plan is all channels.
* **Which groups are hybrid.** Those with a depthwise / grouped conv member, and then every group
  whose Conv/Linear members are ALL channel-space already: such a group's channels would
  otherwise be pruned by nothing. A ConvNeXt block's MLP hidden width is one (its two Linear
  layers are members of the depthwise conv's stream group). No layer leaves the eigenbasis because
  of this rule. A group read by the classifier is not added (the classifier is not
  channel-space): on the quality benchmark's MobileNet-style net, adding its last pointwise
  output group (96 channels read by the classifier only) cut them to ~35 at flops:0.7 and cost
  10-20 points after one epoch on both seeds (``bench/quality.py --archs mobilenet_small``).
* **Scores in loss units, from the consumers.** Removing a channel removes its contribution to the
  layers that READ it; with their K-FAC factors ``F ~= S (x) A`` (the statistics EigenDamage
  collects anyway, in ``stats.conv_mode``), zeroing the input columns ``J`` of a consumer costs
  ``1/2 tr(W_J^T S W_J A_JJ)`` (OBD with the Kronecker-factored Fisher; patch mode sums over the
  kernel offsets, whose ``A`` is the per-pixel one). A unit's score is the sum over its
  consumers' columns, in the same loss units as the eigen-directions' scores, so the two rank
  together. (The producer side is not scored: zeroing a conv's output rows before a BatchNorm
  does not remove the channel, the BatchNorm's shift still feeds it.) Consumers without factors
  (grouped convs, layers over ``stats.max_factor_dim``) add nothing.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from .factors import LayerStats
from .layers import Adapter

__all__ = ["hybrid_groups", "consumer_scores", "compose_removed"]

_LAYER = (nn.Conv2d, nn.Linear)


def _grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1


def hybrid_groups(model: nn.Module, graph, closure: bool = True) -> tuple[list[str], set[str], dict[str, str]]:
    """``(hybrid group names, their Conv/Linear members, {consumer layer: group})``: the groups
    with a grouped / depthwise conv member, then (with ``closure``) the groups whose Conv/Linear
    members are all members of those (module docstring); the layers that read them ("in"
    members), in forward order of the groups."""
    chosen, members = set(), set()
    layers = {g.name: {m.module for m in g.members if isinstance(model.get_submodule(m.module), _LAYER)} for g in graph.groups}
    for g in graph.groups:
        if any(_grouped(model.get_submodule(m.module)) for m in g.members):
            chosen.add(g.name)
            members |= layers[g.name]
    if closure:
        chosen |= {g.name for g in graph.groups if layers[g.name] and layers[g.name] <= members}
    names, consumers = [], {}
    for g in graph.groups:
        if g.name not in chosen:
            continue
        names.append(g.name)
        for mem in g.members:
            mod = model.get_submodule(mem.module)
            if mem.kind == "in" and isinstance(mod, _LAYER) and not _grouped(mod):
                consumers[mem.module] = g.name
    return names, members, consumers


def _column_channels(adapter: Adapter, n_cols: int) -> np.ndarray:
    """The input channel (feature) of each column of ``W~`` without the bias column."""
    if adapter.kind == "conv" and adapter.mode == "full":
        return np.arange(n_cols) // adapter.k2
    return np.arange(n_cols)


def consumer_scores(graph, groups: list[str], adapters: Mapping[str, Adapter], stats: Mapping[str, LayerStats]) -> dict[str, np.ndarray]:
    """Per hybrid group, per unit: ``1/2 sum_consumers tr(W_J^T S W_J A_JJ)`` over the columns ``J``
    of the unit's channels (module docstring), float64."""
    out = {}
    for g in graph.groups:
        if g.name not in groups:
            continue
        s = np.zeros(g.size, dtype=np.float64)
        for mem in g.members:
            if mem.kind != "in" or mem.module not in adapters or mem.module not in stats:
                continue
            a, st = adapters[mem.module], stats[mem.module]
            w = a.weight_matrix()  # [d_out, d_in(+1), k2] patch or [d_out, d_in(+1)]
            n = w.shape[1] - int(a.fold_bias)
            w3 = (w if w.dim() == 3 else w[:, :, None])[:, :n]
            M = torch.einsum("ojk,op,pik->ji", w3, st.S, w3)  # sum_k W_k^T S W_k  [n, n]
            blockwise = (M * st.A[:n, :n]).numpy()
            unit_of = np.full(n, -1, dtype=np.int64)
            channel_unit = dict(zip(mem.index.tolist(), mem.root.tolist()))
            for j, c in enumerate(_column_channels(a, n)):
                unit_of[j] = channel_unit.get(int(c), -1)
            # a unit's block: the entries (j, k) whose columns both belong to it (O(n * k2) of them)
            j, k = np.nonzero((unit_of[:, None] == unit_of[None, :]) & (unit_of >= 0)[:, None])
            s += 0.5 * np.bincount(unit_of[j], weights=blockwise[j, k], minlength=g.size)
        out[g.name] = s
    return out


def compose_removed(groups_in_order, composite: Mapping[str, list[int]], step: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """A step's removals (units of the narrowed groups) on top of earlier ones (units of the
    original groups): the kept units keep their order, so narrowed unit i is the i-th kept one.
    ``groups_in_order``: the original groups (name, size), forward order."""
    removed = {g: list(v) for g, v in composite.items()}
    sizes = dict(groups_in_order)
    for g, idx in step.items():
        gone = set(removed.get(g, []))
        kept = [u for u in range(sizes[g]) if u not in gone]
        removed[g] = sorted(gone | {kept[i] for i in idx})
    return {name: removed[name] for name, _ in groups_in_order if removed.get(name)}
