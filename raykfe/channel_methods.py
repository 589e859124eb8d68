"""Scores of channel groups for the parameter-coordinate methods (``c-obd``, ``c-obs``, ``kron-obd``,
``kron-obs``, ``sosp-h``, ``sosp-i``, ``l1``, ``slimming``), and the OBS compensating updates.

A group (:class:`raykfe.channels.ChannelGroup`) couples the output channels of several layers
(a conv, its BatchNorm, the convs of a residual stream, ...). Per-layer methods score each coupled
layer's output rows and a group channel scores the SUM over its layers: removing the channel
removes every one of those rows, and the second-order methods' scores are predicted loss
increases, which add when the cross terms between layers are ignored (their own approximation).

* ``c-obd``: rows of every coupled Conv2d / Linear (any groups, depthwise included), exact
  diagonal Fisher.
* ``c-obs``, ``kron-obd``, ``kron-obs``: rows of the coupled Linear / Conv2d (groups=1) layers, with
  K-FAC factors in FULL conv mode (the Fisher of a conv row in parameter coordinates); a depthwise
  conv in the group contributes nothing (K-FAC is not defined for it here).
* ``sosp-h``, ``sosp-i``: a structure is a group channel with ALL its parameter slices (conv rows
  and biases, norm scales and shifts: everything torch-pruning slices along dim 0), so removing it
  makes the channel exactly zero in eval mode; scores come straight from the structure.
* ``l1``: sum of |w| of the coupled conv/linear rows, divided by the group's mean (a global
  ranking of raw L1 norms would just empty the layers with the smallest weights; Li et al. prune
  per layer, a per-group normalisation is the usual global variant).
* ``slimming``: sum of |gamma| of the coupled BatchNorms after sparsity training (raw: that the
  scales are comparable across layers is the point of the L1 penalty). Groups without a
  BatchNorm are not scored, so they are never pruned.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError
from .methods import MethodInfo

if TYPE_CHECKING:  # pragma: no cover
    from .channels import ChannelGraph

__all__ = ["channel_scores", "compensate", "select_plan", "build_pruned", "structure_owner", "aggregate", "StatsSource", "BatchSource"]

_LAYER = (nn.Conv2d, nn.Linear)


def _out_layers(model: nn.Module, graph: "ChannelGraph") -> list[str]:
    """Conv2d / Linear modules whose output channels some group removes, in group order, unique."""
    seen: dict[str, None] = {}
    for g in graph.groups:
        for m in g.members:
            if m.kind == "out" and isinstance(model.get_submodule(m.module), _LAYER):
                seen.setdefault(m.module, None)
    return list(seen)


def aggregate(graph: "ChannelGraph", per_module: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Group channel scores: the sum of the given per-module row scores over the group's "out"
    members (groups none of whose members is scored are left out, so they are not pruned)."""
    out = {}
    for g in graph.groups:
        s, scored = np.zeros(g.size, dtype=np.float64), False
        for m in g.members:
            if m.kind == "out" and m.module in per_module:
                np.add.at(s, m.root, np.asarray(per_module[m.module], dtype=np.float64)[m.index])
                scored = True
        if scored:
            out[g.name] = s
    return out


def structure_owner(model: nn.Module, graph: "ChannelGraph") -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """SOSP structures: ``owner[param name]`` gives each dim-0 slice its structure id (group offset
    + channel) or -1; returns (owner, {group: offset}, number of structures)."""
    names = {id(p): n for n, p in model.named_parameters()}
    owner: dict[str, torch.Tensor] = {}
    offsets, total = {}, 0
    for g in graph.groups:
        offsets[g.name] = total
        for m in g.members:
            if m.kind != "out":
                continue
            module = model.get_submodule(m.module)
            for p in module.parameters(recurse=False):
                name = names.get(id(p))
                if name is None or p.dim() == 0 or p.shape[0] <= int(m.index.max(initial=-1)):
                    continue
                ids = owner.setdefault(name, torch.full((p.shape[0],), -1, dtype=torch.long))
                ids[torch.as_tensor(m.index)] = torch.as_tensor(m.root + total)
        total += g.size
    return owner, offsets, total


class StatsSource(Protocol):
    """Where a method's statistics come from: the pipeline's stages (cached, on the job's backend)
    or, for :func:`raykfe.prune`, the batches given in this process."""

    def kfac(self, layers: list[str], conv_mode: str) -> dict: ...

    def measure(self, kind: str, spec: dict) -> dict[str, torch.Tensor]: ...


class BatchSource:
    """Statistics of ``batches`` computed in this process (the API's reference path)."""

    def __init__(self, model: nn.Module, batches, *, fisher: str = "true", seed: int = 0, max_batches: int | None = None, progress: bool = False):
        self.model, self.batches = model, batches
        self.kw = dict(fisher=fisher, seed=seed, max_batches=max_batches, progress=progress)

    def kfac(self, layers, conv_mode):
        from .capture import collect_factors

        return collect_factors(self.model, self.batches, conv_mode=conv_mode, layers=layers, **self.kw)

    def measure(self, kind, spec):
        from .measure import measure

        return measure(kind, self.model, self.batches, spec, **self.kw)


def channel_scores(
    info: MethodInfo, model: nn.Module, graph: "ChannelGraph", source: StatsSource, *, damping: float = 1e-3,
    max_factor_dim: int | None = None,
):
    """``({group: channel scores}, kfac)`` for ``info``'s method; ``kfac`` = (stats, layers) for the
    K-FAC methods (their compensating updates need them), else None."""
    from .methods import obs

    kind = info.statistics
    if kind == "none":
        per = {n: obs.l1_scores(model.get_submodule(n).weight.detach()).numpy() for n in _out_layers(model, graph)}
        scores = aggregate(graph, per)
        return {g: s / s.mean() if s.mean() > 0 else s for g, s in scores.items()}, None
    if kind == "bn-sparsity":
        per = {}
        for g in graph.groups:
            for m in g.members:
                mod = model.get_submodule(m.module)
                if m.kind == "out" and isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                    per[m.module] = mod.weight.detach().abs().to(torch.float64).numpy()
        scores = aggregate(graph, per)
        if not scores:
            raise ConfigError("prune.method=slimming needs BatchNorm layers and the model has none to prune: choose another method")
        return scores, None
    if kind == "kfac-full":
        from .capture import find_layers

        adapters, _ = find_layers(model, "full", max_factor_dim)
        layers = [n for n in _out_layers(model, graph) if n in adapters]
        if not layers:
            raise ConfigError(f"prune.method={info.name} found no Linear/Conv2d (groups=1) layer to score: choose another method")
        stats = source.kfac(layers, "full")
        fn = {"c-obs": obs.cobs_scores, "kron-obd": obs.kron_obd_scores, "kron-obs": obs.kron_obs_scores}[info.name]
        per = {}
        for n in layers:
            st = stats[n]
            args = (adapters[n].weight_matrix().to(torch.float64), st.A, st.S)
            per[n] = np.asarray(fn(*args) if info.name == "kron-obd" else fn(*args, damping=damping), dtype=np.float64)
        return aggregate(graph, per), (stats, layers)
    if kind == "diag-fisher":
        layers = _out_layers(model, graph)
        df = obs.DiagFisher.from_tensors(source.measure("diag-fisher", {"layers": layers}))
        per = {}
        for n in layers:
            mod, d = model.get_submodule(n), df.diag(n)
            per[n] = np.asarray(obs.cobd_scores(
                mod.weight.detach().to(torch.float64), d["weight"],
                None if mod.bias is None else mod.bias.detach().to(torch.float64), d.get("bias"),
            ), dtype=np.float64)
        return aggregate(graph, per), None
    if kind in ("sosp-h", "sosp-i"):
        from .measure import owner_to_lists
        from .methods import sosp

        owner, offsets, total = structure_owner(model, graph)
        tensors = source.measure(kind, {"owner": owner_to_lists(owner), "n_structures": total})
        if kind == "sosp-h":
            s = sosp.sosp_h_scores(model, owner, sosp.SospStats.from_tensors(tensors), total)
        else:
            s = sosp.sosp_i_scores(sosp.SospIStats.from_tensors(tensors))
        s = np.asarray(s, dtype=np.float64)
        return {g.name: s[offsets[g.name]:offsets[g.name] + g.size] for g in graph.groups}, None
    raise ConfigError(f"prune.method={info.name} needs statistics {kind!r}, which raykfe does not know")


def compensate(
    info: MethodInfo, model: nn.Module, graph: "ChannelGraph", removed: Mapping[str, Sequence[int]], kfac, damping: float
) -> nn.Module:
    """A copy of ``model`` whose coupled layers got ``info``'s OBS compensating update for the rows
    that ``removed`` takes out (the removed rows are zeroed; the surgery then drops them)."""
    from .capture import find_layers
    from .methods import obs

    stats, layers = kfac
    update = {"c-obs": obs.cobs_update, "kron-obs": obs.kron_obs_update}[info.name]
    new = copy.deepcopy(model)
    adapters, _ = find_layers(new, "full", None)
    wanted = set(layers)
    for g in graph.groups:
        gone = np.asarray(removed.get(g.name, []), dtype=np.int64)
        if gone.size == 0:
            continue
        for m in g.members:
            if m.kind != "out" or m.module not in wanted:
                continue
            rows = sorted(int(i) for i in m.index[np.isin(m.root, gone)])
            if not rows:
                continue
            a, st = adapters[m.module], stats[m.module]
            w = update(a.weight_matrix().to(torch.float64), st.A, st.S, rows, damping=damping)
            obs.write_weight_matrix(a, w)
    return new


def select_plan(info: MethodInfo, graph: "ChannelGraph", scores, target, example: torch.Tensor, *, max_layer_ratio: float,
                tolerance: float, damping: float, options: dict):
    """The global selection as a :class:`raykfe.channels.ChannelPlan` (``options``: the caller's
    settings, recorded beside the selection's own)."""
    from .channels import ChannelPlan, channel_layer_fractions

    removed, summary = graph.select(scores, target, max_layer_ratio=max_layer_ratio, tolerance=tolerance)
    return ChannelPlan(
        method=info.name, target=str(target), removed=removed, skipped=dict(graph.skipped),
        base_params=summary["base_params"], base_macs=summary["base_macs"], params=summary["params"], macs=summary["macs"],
        options={
            **options, "max_layer_ratio": max_layer_ratio, "tolerance": tolerance, "damping": damping,
            "input_shape": list(example.shape[1:]), "summary": summary, "statistics": info.statistics,
            "layers": {k: list(v) for k, v in channel_layer_fractions(graph, removed).items()},
        },
    )


def build_pruned(info: MethodInfo, model: nn.Module, graph: "ChannelGraph", plan, kfac, damping: float, example: torch.Tensor) -> nn.Module:
    """The pruned model of ``plan`` (after the method's compensating update), its counts checked
    against the plan's."""
    from .channels import apply_channels
    from .counting import count

    source = compensate(info, model, graph, plan.removed, kfac, damping) if info.compensates else model
    pruned = apply_channels(source, example, plan.removed)
    measured = count(pruned, example)
    if (measured.params, measured.macs) != (plan.params, plan.macs):
        raise RuntimeError(f"channel surgery gave {measured}, the plan predicted params={plan.params} macs={plan.macs}")
    return pruned
