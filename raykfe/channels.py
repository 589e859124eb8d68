"""Dependency-aware channel surgery in parameter coordinates (the baseline methods' pruning space).

A *group* is a set of channels that must go together: the output channels of a Conv/Linear (the
group's *root*), the BatchNorm after it, the input channels of every layer that reads them, and
everything coupled to them by residual additions, concatenations, element-wise products (SE
blocks) or depthwise convs (which follow their input). torch-pruning's ``DependencyGraph`` finds
the couplings and does the slicing; raykfe's scores (given by the caller) decide what goes, and
raykfe's exact cost model decides how much.

Coordinates. A group has ``size`` units (its "channels", ``0..size-1``). Each member
(:class:`Member`) lists the entries of one module's dimension that the group owns (``index``) and
the unit each belongs to (``root``, many-to-one after a flatten: one conv channel is ``H*W``
inputs of the following Linear). ``kind="out"``: every direct parameter of the module that
torch-pruning slices is sliced along dim 0 (conv/linear rows and biases, depthwise convs,
norm scales and shifts, per-channel parameters such as ConvNeXt's ``layer_scale``); ``kind="in"``:
dim 1 of a conv/linear weight. Every unit maps to the same number of entries in every member,
so a model's size depends only on how MANY units each group loses (:meth:`ChannelGraph.cost`).

Decisions:

* Root and order: the root of a group is its earliest-called Conv/Linear (forward order); groups
  are listed in forward order, each once, however many Conv/Linear layers share it.
* Grouped (non-depthwise) convs (RegNet, ResNeXt): handled exactly. The channels at the same
  position in every conv group are TIED into one unit (a unit of a group whose channels reach a
  conv with G groups is G channels, one per conv group), so every conv group keeps the same
  width and the same positions; torch-pruning's grouped-conv input slicing is exact precisely
  for such removals, and the cost model stays a function of the counts. regnet_x_400mf
  (group width 16) thus has 16 units in each of its grouped groups.
* Depthwise convs (``groups == in == out``) are "out" members of the group that feeds them.
* Bare per-channel ``nn.Parameter`` s (ConvNeXt's ``layer_scale``, sliced along dim 0 by
  torch-pruning as an "unwrapped parameter"): the member names the module that OWNS the parameter
  (``features.1.0`` for ``features.1.0.layer_scale``), so ``model.get_submodule(member.module)``
  always works; a group is skipped if that owner has other direct parameters.
* The classifier: the Conv/Linear layers whose output reaches the model output without passing
  another Conv/Linear keep their output channels (the classes), always; they are listed in
  ``skipped``. Their INPUTS shrink with the group that feeds them. ``include_classifier`` is
  accepted for symmetry with the KFE path (where it prunes the classifier's own directions) and
  changes nothing here.
* ``exclude``: the named modules keep their output channels: every group in which one is an
  "out" member is not prunable (its inputs may still shrink with the group before it). A name
  that is not a module of the model is a ConfigError.
* Skipped as not prunable (``skipped[conv/linear name] = reason``): groups that pass a reshape
  torch-pruning does not map channel by channel (anything but a flatten to ``[N, C*...]``, its
  inverse ``[N, C] -> [N, C, 1, 1]``, or the views autograd puts around a Linear applied to a
  rank > 2 input, which keep the last axis), a transpose/permute of a rank >= 5 tensor, a split
  or chunk of the channels, an op whose index mapping torch-pruning fails to build (the model is
  still analysed: such ops are treated as opaque and every group through them is skipped), a
  transposed conv, a module type raykfe cannot slice (LSTM, embeddings, ``nn.MultiheadAttention``:
  raykfe prunes its own :class:`raykfe.attention.Attention` by heads instead, see
  :meth:`ChannelGraph._attention_heads`), an uneven use
  of the group's channels, or a depthwise conv fed by the model input. ShuffleNetV2's channel
  shuffle (view to rank 5, transpose, view back) and chunk are such ops: its stream groups cannot
  be pruned by index coupling at all (the shuffle interleaves the two halves, and the chunk needs
  equal halves: count constraints, not couplings), so they are skipped; the groups inside each
  branch, the stem and ``conv5`` are pruned, which reaches flops:0.5.
* Function preservation: zeroing every "out" slice of the removed units (conv/linear rows and
  biases, norm scales and shifts, per-channel parameters) makes those channels exactly zero
  everywhere in eval mode, and the pruned model then computes exactly the same function -- except
  where a normalisation computes statistics OVER channels (LayerNorm over channels in ConvNeXt,
  GroupNorm): the zeroed channel still enters the mean and variance of the others, so removing it
  changes them. In ConvNeXt this affects the stream groups (stem/downsample LayerNorm2d and the
  block LayerNorms), not the MLP hidden groups.
* Selection (:meth:`ChannelGraph.select`): global over the units of the scored groups, at most
  ``min(floor(max_layer_ratio * size), size - 1)`` units per group, the k lowest-scored units
  removed with k the smallest at or above the target by bisection on exact costs (never below
  the target: ``tolerance`` only sets ``summary["within_tolerance"]``, since one unit can be
  coarse, e.g. a tied unit of a grouped conv). ``directions:F`` is a KFE-only target: a
  ConfigError here.
* The example input: only its first example is used, cast to the model's device and floating
  dtype (a float32 ``torch.zeros(1, *shape)`` rebuilds a float64 model).

Costs: params = every parameter, MACs = Conv/Linear multiply-accumulates for ONE example, as
:func:`raykfe.counting.count` measures them; the cost model is a sum of products of two affine
functions of the per-group counts (out width x in width per weight), evaluated with numpy.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .counting import count, eval_forward_with_hooks
from .errors import ConfigError
from .plan import Target, normalized, parse_target, rank_keys, smallest_meeting

__all__ = [
    "Member",
    "ChannelGroup",
    "ChannelGraph",
    "apply_channels",
    "channel_layer_fractions",
    "out_layers",
    "aggregate",
    "CLASSIFIER_REASON",
]

_CONVND = nn.modules.conv._ConvNd
_LAYER = (_CONVND, nn.Linear)
_NORM = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
)

CLASSIFIER_REASON = (
    "classifier: produces the model output, so its output channels (the classes) are kept; "
    "its inputs shrink with the group that feeds it"
)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


@dataclass
class Member:
    """The entries of one module's dimension that a group owns (see the module docstring)."""

    module: str  # module name (for a bare per-channel nn.Parameter: the module that owns it)
    kind: str  # "out": direct parameters sliced along dim 0; "in": dim 1 of a conv/linear weight
    index: np.ndarray  # int64 [m]: entries of that dimension
    root: np.ndarray  # int64 [m]: the group unit (0..size-1) of each entry


@dataclass
class ChannelGroup:
    name: str  # the root module (a Conv/Linear whose output channels define the group)
    size: int  # number of units
    members: list[Member]

    def member(self, module: str, kind: str = "out") -> Member | None:
        for m in self.members:
            if m.module == module and m.kind == kind:
                return m
        return None


# --------------------------------------------------------------------------------------------
# torch-pruning
# --------------------------------------------------------------------------------------------


def _tp():
    try:
        import torch_pruning
    except ImportError:  # pragma: no cover - a dependency of raykfe
        raise ConfigError("channel pruning needs torch-pruning: pip install torch-pruning") from None
    return torch_pruning


def _example(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """One example, on the model's device and (floating) dtype."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ConfigError("example_input must be a batched tensor [N, ...] with N >= 1, e.g. torch.zeros(1, 3, 32, 32)")
    x = example_input[:1]
    p = next(iter(model.parameters()), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() and p.is_floating_point() else x.dtype)
    return x


def _shape_of(fn, output_nr: int = 0):
    try:
        return tuple(fn._input_metadata[output_nr].shape)
    except Exception:  # pragma: no cover - metadata missing in some autograd nodes
        return None


def _in_shape(grad_fn):
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        if hasattr(grad_fn, attr):
            return tuple(getattr(grad_fn, attr))
    for fn, nr in getattr(grad_fn, "next_functions", ()):
        if fn is not None:
            return _shape_of(fn, nr)
    return None


def _op_name(node) -> str:
    fn = node.grad_fn
    return fn.name() if hasattr(fn, "name") else type(node.module).__name__


def _next_to_linear(node) -> bool:
    """Within two hops of a Linear (the views autograd puts around a Linear on a rank > 2 input)."""
    near = [node]
    for _ in range(2):
        near = [n for x in near for n in (*x.inputs, *x.outputs)]
        if any(isinstance(n.module, nn.Linear) for n in near):
            return True
    return False


def _source(node, ops, hops: int = 8):
    """The node a tensor comes from before slices and element-wise ops with a single input (pads)."""
    for _ in range(hops):
        if node.type not in (ops.OPTYPE.ELEMENTWISE, getattr(ops.OPTYPE, "SLICE", None)) or len(node.inputs) != 1:
            break
        node = node.inputs[0]
    return node


def _unsafe_reason(node, ops) -> str | None:
    """Why torch-pruning's channel mapping through this (non-module) op cannot be trusted, or None."""
    fn = node.grad_fn
    if fn is None:
        return None
    out = _shape_of(fn)
    name = _op_name(node)
    if node.type in (ops.OPTYPE.SPLIT, ops.OPTYPE.UNBIND):
        return (
            f"passes a split of the channels ({name}); its pieces are read by different layers, "
            "which raykfe's count-based cost model does not express"
        )
    if node.type == ops.OPTYPE.RESHAPE:
        inp = _in_shape(fn)
        if inp is None or out is None:
            return f"passes a reshape ({name}) of unknown shape, which torch-pruning cannot map channel by channel"
        if inp == out:
            return None
        if len(out) == 2 and len(inp) >= 2 and out[0] == inp[0]:
            return None  # flatten [N, C, ...] -> [N, C*...]: torch-pruning maps it
        if len(inp) == 2 and len(out) >= 3 and out[:2] == inp and all(s == 1 for s in out[2:]):
            return None  # [N, C] -> [N, C, 1, 1]
        if inp[-1] == out[-1] and _next_to_linear(node):
            return None  # leading dims merged/split around a Linear: its feature axis (the last) is kept
        return (
            f"passes a reshape {list(inp)} -> {list(out)} ({name}), e.g. a channel shuffle, which "
            "torch-pruning does not map channel by channel"
        )
    if node.type == ops.OPTYPE.CONCAT:
        sources = [_source(n, ops) for n in node.inputs]
        if len(set(map(id, sources))) < len(sources):
            return (
                f"passes a concatenation of the same channels more than once ({name}, e.g. Swin's patch merging "
                "of four strided slices), which torch-pruning does not map channel by channel"
            )
    lname = name.lower()
    if ("transpose" in lname or "permute" in lname) and out is not None and len(out) >= 5:
        return f"passes a transpose of a rank-{len(out)} tensor ({name}), e.g. a channel shuffle"
    return None


def _neutralise(node, ops) -> None:
    """Treat an op torch-pruning cannot map as element-wise (identity mapping, never rebuilt), so that
    building groups does not fail on it; every group through it is skipped anyway."""
    node.type = ops.OPTYPE.ELEMENTWISE
    for dep in node.dependencies:
        dep.index_mapping = [None, None]
    for other in (*node.inputs, *node.outputs):
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping = [None, None]


def _build_dependency(model: nn.Module, x: torch.Tensor):
    """(DependencyGraph, {node: reason} of the ops whose channel mapping cannot be trusted)."""
    tp = _tp()
    ops = tp.ops
    im = tp.dependency.index_mapping
    dg = tp.DependencyGraph()
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dg.build_dependency(model, example_inputs=(x,), verbose=False)
            except Exception as exc:  # the index mapping of an odd op: repaired below
                if not hasattr(dg, "module2node") or not dg.module2node:
                    raise ConfigError(
                        f"torch-pruning cannot trace the model ({type(exc).__name__}: {exc}): "
                        "use a model whose forward takes one tensor, or a KFE method"
                    ) from None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

    unsafe: dict = {}
    dummy = {ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.RESHAPE, ops.OPTYPE.UNBIND, ops.OPTYPE.EXPAND,
             ops.OPTYPE.SLICE, ops.OPTYPE.ELEMENTWISE}
    for node in dg.module2node.values():
        if node.type in dummy:
            reason = _unsafe_reason(node, ops)
            if reason:
                unsafe[node] = reason
                _neutralise(node, ops)
    updaters = {
        ops.OPTYPE.CONCAT: im.update_concat_index_mapping,
        ops.OPTYPE.SPLIT: im.update_split_index_mapping,
        ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping,
        ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
        ops.OPTYPE.EXPAND: im.update_expand_index_mapping,
        ops.OPTYPE.SLICE: im.update_slice_index_mapping,
    }
    for node in list(dg.module2node.values()):
        fn = updaters.get(node.type)
        if fn is None:
            continue
        try:
            fn(dg, node)
        except Exception as exc:
            unsafe[node] = f"passes {_op_name(node)}, whose channel mapping torch-pruning cannot build ({type(exc).__name__})"
            _neutralise(node, ops)
    im.update_index_mapping(dg)  # what get_pruning_group runs each time: must pass now
    return dg, unsafe


def _output_layers(dg, ops) -> set:
    """Conv/Linear modules whose output reaches the model output without another Conv/Linear."""
    found, seen = set(), set()
    sinks = [n for n in dg.module2node.values() if n.type == ops.OPTYPE.OUTPUT or not n.outputs]
    found.update(n.module for n in sinks if isinstance(n.module, _LAYER))
    stack = [n for n in sinks if not isinstance(n.module, _LAYER)]
    while stack:
        node = stack.pop()
        for inp in node.inputs:
            if inp in seen:
                continue
            seen.add(inp)
            if isinstance(inp.module, _LAYER):
                found.add(inp.module)
            else:
                stack.append(inp)
    return found


def _trace_layers(model: nn.Module, x: torch.Tensor) -> tuple[list[str], dict[str, list[tuple]]]:
    """Conv/Linear names in first-call order and the output shape of every call."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    calls: dict[str, list[tuple]] = {}

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            n = names[module]
            if n not in calls:
                order.append(n)
                calls[n] = []
            calls[n].append(tuple(output.shape))

    eval_forward_with_hooks(model, x, {m: hook for m in model.modules() if isinstance(m, _LAYER)})
    return order, calls


def _is_depthwise(m: nn.Module) -> bool:
    """torch-pruning's rule (``groups == out_channels > 1``)."""
    return isinstance(m, _CONVND) and m.groups == m.out_channels and m.out_channels > 1


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# --------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------


class ChannelGraph:
    """The prunable channel groups of a model and an exact cost model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        exclude: Sequence[str] = (),
        include_classifier: bool = False,
        _keep_dg: bool = False,
    ):
        self.include_classifier = bool(include_classifier)  # no effect: see the module docstring
        if isinstance(exclude, str):
            exclude = (exclude,)
        module_names = {n for n, _ in model.named_modules()}
        for name in exclude:
            if name not in module_names or name == "":
                raise ConfigError(f"prune.exclude names {name!r}, which is not a layer of the model: use a name from model.named_modules()")
        self.exclude = tuple(exclude)
        x = _example(model, example_input)
        base = count(model, x)
        self.base_params, self.base_macs = int(base.params), int(base.macs)
        order, calls = _trace_layers(model, x)
        dg, unsafe = _build_dependency(model, x)
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self._unit_of_root: dict[str, np.ndarray] = {}
        self._sliced: dict[str, list[str]] = {}  # "out" member module -> its direct params sliced on dim 0
        self._layer_out: dict[str, int] = {}
        self._heads: dict[str, str] = {}  # head group name -> its Attention module
        self._analyse(model, dg, unsafe, order)
        self._attention_heads(model, order)
        for name, m in model.named_modules():
            if isinstance(m, _LAYER):
                self._layer_out[name] = int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)
                if name not in calls and name not in self.skipped:
                    self.skipped[name] = "not called in the forward pass"
        self._index = {g.name: i for i, g in enumerate(self.groups)}
        self._build_cost_model(model, calls)
        self._dg = dg if _keep_dg else None

    # ---------------------------------------------------------------- groups
    def _analyse(self, model: nn.Module, dg, unsafe: dict, order: list[str]) -> None:
        tp = _tp()
        ops = tp.ops
        mod_name = {m: n for n, m in model.named_modules()}
        param_owner: dict[int, tuple[str, str]] = {}
        for mn, m in model.named_modules():
            for pn, p in m.named_parameters(recurse=False):
                param_owner.setdefault(id(p), (mn, pn))
        param_dim = {id(u.parameters): u.pruning_dim for u in getattr(dg, "unwrapped_parameters", [])}
        outputs = _output_layers(dg, ops)
        excluded = set(self.exclude)
        visited: set[str] = set()
        for name in order:
            module = model.get_submodule(name)
            if name in visited:
                continue
            if module not in dg.module2node:
                self.skipped[name] = "not reached from the model output"
                continue
            if module in outputs:
                self.skipped[name] = CLASSIFIER_REASON
                visited.add(name)
                continue
            if isinstance(module, _CONVND) and module.transposed:
                self.skipped[name] = "transposed conv: raykfe's channel surgery does not handle it"
                visited.add(name)
                continue
            pruner = dg.get_pruner_of_module(module)
            n_out = pruner.get_out_channels(module) if pruner is not None else None
            if not n_out:
                self.skipped[name] = "torch-pruning has no output-channel pruner for it"
                visited.add(name)
                continue
            try:
                group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n_out)))
            except Exception as exc:
                self.skipped[name] = f"torch-pruning cannot build its group ({type(exc).__name__}: {exc})"
                visited.add(name)
                continue
            result, reason, outs = self._group_of(model, name, module, group, dg, ops, unsafe, mod_name, param_owner,
                                                  param_dim, outputs, excluded)
            visited.update(outs)
            visited.add(name)
            if result is None:
                for o in [name] + [o for o in outs if o != name]:
                    if isinstance(model.get_submodule(o), _LAYER):
                        self.skipped.setdefault(o, reason)
                continue
            self.groups.append(result)
        for name in self.exclude:
            if isinstance(model.get_submodule(name), _LAYER):
                self.skipped[name] = "excluded by prune.exclude (its output channels are kept)"

    def _attention_heads(self, model: nn.Module, order: list[str]) -> None:
        """One group per :class:`raykfe.attention.Attention` whose projections are plain Linear
        layers: its units are the heads, each owning its rows of q / k / v ("out") and its columns
        of out_proj ("in"). torch-pruning cannot follow the head reshape (those layers were
        skipped); the units are independent of the stream's channels, so the group composes with
        every other one. Zeroing a head's v rows and bias makes its output exactly zero, as
        everywhere else. Groups are kept in forward order of their roots."""
        from .attention import Attention

        taken = {(m.module, m.kind) for g in self.groups for m in g.members}
        pos = {n: i for i, n in enumerate(order)}
        for name, att in model.named_modules():
            if type(att) is not Attention or att.num_heads < 2:
                continue
            parts = {p: f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
            mods = {p: model.get_submodule(n) for p, n in parts.items()}
            h = att.num_heads
            widths = (mods["q_proj"].out_features, mods["k_proj"].out_features, mods["v_proj"].out_features,
                      mods["out_proj"].in_features)
            if (any(type(m) is not nn.Linear for m in mods.values()) or widths[0] != widths[1] or widths[2] != widths[3]
                    or any(w % h for w in widths) or parts["q_proj"] not in pos):
                continue
            if any(parts[p] in self.exclude for p in ("q_proj", "k_proj", "v_proj")):
                continue
            keys = [(parts[p], "out") for p in ("q_proj", "k_proj", "v_proj")] + [(parts["out_proj"], "in")]
            if any(k in taken for k in keys):
                continue
            members = []
            for (module, kind), width in zip(keys, widths):
                idx = np.arange(width, dtype=np.int64)
                members.append(Member(module, kind, idx, idx // (width // h)))
            self.groups.append(ChannelGroup(parts["q_proj"], h, members))
            self._heads[parts["q_proj"]] = name
            for p in ("q_proj", "k_proj", "v_proj"):
                self.skipped.pop(parts[p], None)
        self.groups.sort(key=lambda g: pos.get(g.name, len(pos)))

    def _group_of(self, model, name, root, group, dg, ops, unsafe, mod_name, param_owner, param_dim, outputs, excluded):
        """(ChannelGroup or None, reason, names of the group's "out" modules). (Long: one walk over
        torch-pruning's group items that collects members, ties grouped convs and checks every
        rule of the module docstring; the rules depend on each other's partial results.)"""
        reasons: list[str] = []
        raw: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        grouped: list[tuple[str, str, int, int]] = []  # (module, kind, G, width per conv group)
        outs: list[str] = []
        sliced: dict[str, list[str]] = {}  # owner module -> its bare parameters in the group
        n_root = root.out_features if isinstance(root, nn.Linear) else root.out_channels
        if _is_depthwise(root):
            reasons.append(f"depthwise conv {name} is not fed by a prunable layer (the model input?)")
        for item in group.items:
            dep = item.dep
            target, m = dep.target, dep.target.module
            idxs = [int(i) for i in item.idxs]
            roots = [int(r) for r in item.root_idxs]
            if isinstance(m, nn.Parameter):
                owner, pname = param_owner.get(id(m), (None, None))
                if owner is None:
                    reasons.append("a coupled parameter is not a parameter of the model")
                    continue
                if param_dim.get(id(m), 0) != 0:
                    reasons.append(f"parameter {owner}.{pname} would be sliced along dim {param_dim[id(m)]}, not 0")
                    continue
                key = (owner, "out")
                sliced.setdefault(owner, [])
                if pname not in sliced[owner]:
                    sliced[owner].append(pname)
            elif not isinstance(m, nn.Module) or m not in mod_name:
                if target in unsafe:
                    reasons.append(unsafe[target])
                if target.type == ops.OPTYPE.OUTPUT:
                    reasons.append("its channels reach the model output")
                if target.type == ops.OPTYPE.CUSTOMIZED:
                    reasons.append("it passes a customized op")
                continue
            else:
                mn = mod_name[m]
                if isinstance(m, _CONVND):
                    if m.transposed:
                        reasons.append(f"transposed conv {mn} is coupled, which raykfe's surgery does not handle")
                        continue
                    if _is_depthwise(m):
                        if m.in_channels != m.out_channels:
                            reasons.append(f"conv {mn} has groups == out_channels != in_channels")
                            continue
                        kind = "out"
                    else:
                        kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                        if m.groups > 1:
                            width = (m.out_channels if kind == "out" else m.in_channels) // m.groups
                            grouped.append((mn, kind, m.groups, width))
                elif isinstance(m, nn.Linear):
                    kind = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
                elif isinstance(m, _NORM):
                    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) != 1:
                        reasons.append(f"LayerNorm {mn} normalises over several dims")
                        continue
                    if isinstance(m, nn.PReLU) and m.num_parameters == 1:
                        continue  # one shared slope: nothing to slice
                    kind = "out"
                else:
                    reasons.append(f"{type(m).__name__} {mn} is coupled and raykfe cannot slice it")
                    continue
                key = (mn, kind)
                if kind == "out":
                    if isinstance(m, _LAYER) and m in outputs:
                        reasons.insert(0, CLASSIFIER_REASON)
                    if mn in excluded:
                        reasons.insert(0, f"coupled with {mn}, which prune.exclude keeps")
            if key[1] == "out":
                outs.append(key[0])
            ix, rt = raw.setdefault(key, ([], []))
            ix.extend(idxs)
            rt.extend(roots)
        outs = list(dict.fromkeys(outs))
        if reasons:
            return None, reasons[0], outs
        # a module owning bare per-channel parameters: its direct parameters must all be sliced, so
        # that "out" keeps meaning "every direct parameter along dim 0"
        for owner, pnames in sliced.items():
            mod = model.get_submodule(owner)
            direct = [pn for pn, _ in mod.named_parameters(recurse=False)]
            if isinstance(mod, (*_LAYER, *_NORM)) or sorted(direct) != sorted(pnames):
                return None, f"{owner or 'the model'} has parameters beside the coupled per-channel one(s) {pnames}", outs
        # tie the units across conv groups
        uf = _UnionFind(n_root)
        for mn, kind, G, width in grouped:
            ix, rt = raw[(mn, kind)]
            first: dict[int, int] = {}
            for i, r in zip(ix, rt):
                pos = i % width
                if pos in first:
                    uf.union(first[pos], r)
                else:
                    first[pos] = r
        comp = np.array([uf.find(r) for r in range(n_root)], dtype=np.int64)
        uniq, unit_of_root = np.unique(comp, return_inverse=True)  # units ordered by their first channel
        size = int(uniq.size)
        members = []
        for (mn, kind), (ix, rt) in raw.items():
            index = np.asarray(ix, dtype=np.int64)
            unit = unit_of_root[np.asarray(rt, dtype=np.int64)]
            if np.unique(index).size != index.size:
                return None, f"{mn} receives some channels of the group twice", outs
            per = np.bincount(unit, minlength=size)
            if per.min() != per.max() or per.min() == 0:
                return None, (
                    f"{mn} uses the group's channels unevenly (a slice or split), which the count-based "
                    "cost model cannot express"
                ), outs
            order = np.argsort(index, kind="stable")
            members.append(Member(mn, kind, index[order], unit[order].astype(np.int64)))
        for mn, kind, G, width in grouped:
            mem = next(m for m in members if m.module == mn and m.kind == kind)
            for u in range(size):
                sel = mem.index[mem.root == u]
                pos = np.unique(sel % width)
                expected = (np.arange(G)[:, None] * width + pos[None, :]).ravel()
                if sel.size != expected.size or not np.array_equal(np.sort(sel), np.sort(expected)):
                    return None, (
                        f"grouped conv {mn} ({G} groups): the group's channels cannot be removed at the same "
                        "positions in every conv group"
                    ), outs
        if size < 2:
            return None, "the group has a single unit (all channels tied across conv groups)", outs
        self._unit_of_root[name] = unit_of_root.astype(np.int64)
        for owner, pnames in sliced.items():
            self._sliced[owner] = pnames
        return ChannelGroup(name=name, size=size, members=members), "", outs

    # ---------------------------------------------------------------- costs
    def _build_cost_model(self, model: nn.Module, calls: dict[str, list[tuple]]) -> None:
        n = len(self.groups)
        out_red: dict[str, np.ndarray] = {}
        in_red: dict[str, np.ndarray] = {}
        for gi, g in enumerate(self.groups):
            for mem in g.members:
                mult = mem.index.size // g.size
                red = out_red if mem.kind == "out" else in_red
                red.setdefault(mem.module, np.zeros(n, dtype=np.int64))[gi] += mult
        zero = np.zeros(n, dtype=np.int64)
        A0, Am, B0, Bm, div, cp, cm = [], [], [], [], [], [], []

        def term(a0, am, b0, bm, d, p, mac):
            A0.append(a0); Am.append(am); B0.append(b0); Bm.append(bm); div.append(d); cp.append(p); cm.append(mac)

        seen: set[int] = set()
        for mn, m in model.named_modules():
            o, i = out_red.get(mn), in_red.get(mn)
            if o is None and i is None:
                continue
            o = zero if o is None else o
            i = zero if i is None else i
            if isinstance(m, _LAYER):
                if isinstance(m, nn.Linear):
                    c_out, c_in, k, G, dw = m.out_features, m.in_features, 1, 1, False
                else:
                    c_out, c_in, k, G, dw = m.out_channels, m.in_channels, math.prod(m.kernel_size), m.groups, _is_depthwise(m)
                positions = sum(math.prod(shape) // c_out for shape in calls.get(mn, []))
                if dw:
                    term(c_out, o, 1, zero, 1, k if id(m.weight) not in seen else 0, positions * k)
                else:
                    term(c_out, o, c_in, i, G, k if id(m.weight) not in seen else 0, positions * k)
                seen.add(id(m.weight))
                if m.bias is not None and id(m.bias) not in seen:
                    seen.add(id(m.bias))
                    term(c_out, o, 1, zero, 1, 1, 0)
                continue
            if isinstance(m, _NORM):
                channels = {
                    nn.LayerNorm: lambda mod: mod.normalized_shape[-1],
                    nn.GroupNorm: lambda mod: mod.num_channels,
                    nn.PReLU: lambda mod: mod.num_parameters,
                }
                c = next((f(m) for t, f in channels.items() if isinstance(m, t)), None)
                c = m.num_features if c is None else c
                names = [pn for pn, p in m.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == c]
            else:
                names = self._sliced.get(mn, [])
            for pn, p in m.named_parameters(recurse=False):
                if pn in names and id(p) not in seen:
                    seen.add(id(p))
                    term(p.shape[0], o, 1, zero, 1, p.numel() // p.shape[0], 0)
        as_i = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        self._A0, self._B0, self._div = as_i(A0), as_i(B0), as_i(div)
        self._Am = np.asarray(Am, dtype=np.int64).reshape(len(A0), n)
        self._Bm = np.asarray(Bm, dtype=np.int64).reshape(len(B0), n)
        self._cp, self._cm = as_i(cp), as_i(cm)
        self._prod0 = self._A0 * (self._B0 // np.maximum(self._div, 1))
        self._sizes = np.array([g.size for g in self.groups], dtype=np.int64)

    def _cost_vec(self, r: np.ndarray) -> tuple[int, int]:
        if self._A0.size == 0:
            return self.base_params, self.base_macs
        a = self._A0 - self._Am @ r
        b = (self._B0 - self._Bm @ r) // self._div
        d = a * b - self._prod0
        return self.base_params + int(self._cp @ d), self.base_macs + int(self._cm @ d)

    def _counts(self, removed: Mapping[str, int]) -> np.ndarray:
        r = np.zeros(len(self.groups), dtype=np.int64)
        for name, k in removed.items():
            gi = self._group_index(name)
            k = int(k)
            if not 0 <= k < self.groups[gi].size:
                raise ConfigError(
                    f"group {name!r} has {self.groups[gi].size} channels: remove between 0 and {self.groups[gi].size - 1}, not {k}"
                )
            r[gi] = k
        return r

    def _group_index(self, name: str) -> int:
        gi = self._index.get(name)
        if gi is None:
            why = self.skipped.get(name)
            if why:
                raise ConfigError(f"{name!r} is not a prunable channel group ({why}): leave it out")
            raise ConfigError(f"{name!r} is not a channel group of the model: use a name from ChannelGraph.groups")
        return gi

    def group(self, name: str) -> ChannelGroup:
        return self.groups[self._group_index(name)]

    def cost(self, removed: Mapping[str, int]) -> tuple[int, int]:
        """(params, MACs per example) after removing ``removed[group]`` units of each group."""
        return self._cost_vec(self._counts(removed))

    # ---------------------------------------------------------------- selection
    def _check_select(self, scores, tgt: Target, max_layer_ratio: float, tolerance: float) -> Target:
        if not scores:
            example = next(iter(self.skipped.items()), None)
            why = f" (e.g. {example[0]}: {example[1]})" if example else ""
            raise ConfigError(
                f"no channel group is scored: the model has {len(self.groups)} prunable groups and {len(self.skipped)} "
                f"skipped layers{why}; use a KFE method or another model"
            )
        if tgt.kind == "directions":
            raise ConfigError(
                f"target {tgt} counts eigen-directions, which only the KFE methods have: "
                "use 'params:F' or 'flops:F' with a channel method"
            )
        if not (0.0 < float(max_layer_ratio) <= 1.0):
            raise ConfigError(f"prune.max_layer_ratio={max_layer_ratio} must be in (0, 1]")
        if not float(tolerance) >= 0.0:
            raise ConfigError(f"prune.tolerance={tolerance} must be >= 0")
        return tgt

    def unit_cost(self, name: str, metric: int) -> int:
        """What removing one unit of group ``name`` saves of ``metric`` (0 params, 1 MACs) at the
        model's current widths."""
        return (self.base_params, self.base_macs)[metric] - self.cost({name: 1})[metric]

    def eligible_units(self, scores, metric: int, max_layer_ratio: float, caps, rank: str, normalize: str):
        """The eligible units (per group, the cap lowest-scored ones, ``caps[group]`` overriding
        ``max_layer_ratio``) sorted by :func:`raykfe.plan.rank_keys` after ``normalize``
        (ties: group in forward order, then unit), as :class:`raykfe.plan._Units` with axis 2."""
        from .plan import _Units

        keys, u_group, u_chan, total = [], [], [], 0
        for name, raw in scores.items():
            gi = self._group_index(name)
            size = self.groups[gi].size
            s = np.asarray(raw, dtype=np.float64).reshape(-1)
            if s.size != size:
                raise ConfigError(f"scores[{name!r}] has {s.size} entries but the group has {size} channels: score each channel once")
            if not np.all(np.isfinite(s)):
                raise ConfigError(f"scores[{name!r}] has NaN or infinite entries: check the statistics of that group")
            s = normalized(s, normalize)
            total += size
            cap = max(0, min(int(math.floor(max_layer_ratio * size)), size - 1))
            if caps is not None and name in caps:
                cap = max(0, min(int(caps[name]), size - 1))
            order = np.argsort(s, kind="stable")[:cap]
            keys.append(rank_keys(s[order], self.unit_cost(name, metric), rank))
            u_group.append(np.full(order.size, gi, dtype=np.int64))
            u_chan.append(order.astype(np.int64))
        if not keys:
            z = np.zeros(0, dtype=np.int64)
            return _Units(z, z, z, total, np.zeros(0))
        key, ug, uc = np.concatenate(keys), np.concatenate(u_group), np.concatenate(u_chan)
        perm = np.lexsort((uc, ug, key))  # key, then group (forward order), then channel
        return _Units(ug[perm], np.full(perm.size, 2, dtype=np.int64), uc[perm], total, key[perm])

    def cost_of_counts(self, counts: np.ndarray) -> tuple[int, int]:
        """(params, MACs) after removing ``counts[i]`` units of group i (in ``self.groups`` order)."""
        return self._cost_vec(np.asarray(counts, dtype=np.int64))

    def select(
        self,
        scores: Mapping[str, np.ndarray],
        target: "str | Target",
        *,
        max_layer_ratio: float = 0.95,
        tolerance: float = 0.02,
        rank: str = "score",
        normalize: str = "none",
        caps: Mapping[str, int] | None = None,
    ) -> tuple[dict[str, list[int]], dict]:
        """Global selection of the channels to remove for ``target`` (see the module docstring):
        units ranked by ``rank`` after ``normalize`` (:func:`raykfe.plan.rank_keys`), at most
        ``caps[group]`` (else ``max_layer_ratio``) per group.

        Returns ``({group: sorted removed units}, summary)``; ``summary`` has ``params``, ``macs``,
        ``base_params``, ``base_macs``, ``achieved``, ``removed_channels``, ``channels`` (units of
        the scored groups), ``target`` and ``within_tolerance`` (achieved - target <= tolerance).
        """
        tgt = self._check_select(scores, parse_target(target), max_layer_ratio, tolerance)
        metric = 1 if tgt.kind == "flops" else 0
        base = (self.base_params, self.base_macs)[metric]
        units = self.eligible_units(scores, metric, max_layer_ratio, caps, rank, normalize)
        ug, uc, total = units.layer, units.index, units.total
        n_groups = len(self.groups)

        def outcome(k: int) -> tuple[int, int]:
            return self._cost_vec(np.bincount(ug[:k], minlength=n_groups).astype(np.int64))

        def reduction(k: int) -> float:
            return 1.0 - outcome(k)[metric] / base if base else 0.0

        best = reduction(ug.size)
        if best < tgt.fraction - 1e-12:
            raise ConfigError(
                f"target {tgt} is unreachable with channel pruning: removing every eligible channel removes at most "
                f"{best:.3f} of the {'MACs' if metric else 'parameters'} (prune.max_layer_ratio={max_layer_ratio}); "
                "lower the target or raise prune.max_layer_ratio"
            )
        k = smallest_meeting(reduction, ug.size, tgt.fraction)
        params, macs = outcome(k)
        removed = {g.name: sorted(int(c) for c in uc[:k][ug[:k] == gi]) for gi, g in enumerate(self.groups)
                   if np.any(ug[:k] == gi)}  # forward order
        achieved = 1.0 - (params, macs)[metric] / base if base else 0.0
        summary = {
            "target": str(tgt), "params": int(params), "macs": int(macs), "base_params": self.base_params,
            "base_macs": self.base_macs, "achieved": float(achieved), "within_tolerance": bool(achieved - tgt.fraction <= tolerance),
            "removed_channels": int(k), "channels": int(total),
        }
        return removed, summary

    def __repr__(self) -> str:
        return f"ChannelGraph({len(self.groups)} groups, {len(self.skipped)} skipped, params={self.base_params}, macs={self.base_macs})"


# --------------------------------------------------------------------------------------------
# surgery
# --------------------------------------------------------------------------------------------


def _clean_removed(graph: ChannelGraph, removed: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for name, idx in removed.items():
        idx = sorted({int(i) for i in idx})
        if not idx:
            continue
        g = graph.group(name)
        if idx[0] < 0 or idx[-1] >= g.size:
            raise ConfigError(f"removed[{name!r}] has channel {idx[0] if idx[0] < 0 else idx[-1]} outside 0..{g.size - 1}")
        if len(idx) >= g.size:
            raise ConfigError(f"removed[{name!r}] removes all {g.size} channels of the group: keep at least one")
        out[name] = idx
    return out


def apply_channels(model: nn.Module, example_input: torch.Tensor, removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """A NEW model: ``model`` (untouched) with the ``removed`` units of each group sliced out of
    every coupled layer. Deterministic in the architecture: a freshly built base model and the
    same ``removed`` give the same shapes (how a saved result is rebuilt)."""
    new = copy.deepcopy(model)
    if not any(len(v) for v in removed.values()):
        return new
    graph = ChannelGraph(new, example_input, _keep_dg=True)
    todo = _clean_removed(graph, removed)
    dg = graph._dg
    flags = {n: p.requires_grad for n, p in new.named_parameters()}
    was_training = new.training
    try:
        for g in graph.groups:
            if g.name not in todo or g.name in graph._heads:
                continue
            roots = np.nonzero(np.isin(graph._unit_of_root[g.name], todo[g.name]))[0].tolist()
            module = new.get_submodule(g.name)
            pruner = dg.get_pruner_of_module(module)
            group = dg.get_pruning_group(module, pruner.prune_out_channels, roots)
            group.prune(record_history=False)
    finally:
        graph._dg = None
        new.train(was_training)
    for g in graph.groups:
        if g.name in graph._heads and g.name in todo:
            _remove_heads(new, graph._heads[g.name], g, todo[g.name])
    for n, p in new.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return new


@torch.no_grad()
def _remove_heads(model: nn.Module, attention: str, group: ChannelGroup, heads: Sequence[int]) -> None:
    """Slice ``heads`` out of an Attention's projections (in place) and lower its head count."""
    from .surgery import set_module

    for mem in group.members:
        lin = model.get_submodule(mem.module)
        keep = torch.as_tensor(mem.index[~np.isin(mem.root, heads)])
        out = mem.kind == "out"
        new = nn.Linear(lin.in_features if out else keep.numel(), keep.numel() if out else lin.out_features,
                        bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
        new.weight.copy_(lin.weight[keep] if out else lin.weight[:, keep])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[keep] if out else lin.bias)
        set_module(model, mem.module, new.train(lin.training))
    att = model.get_submodule(attention)
    att.num_heads = group.size - len(set(heads))


def channel_layer_fractions(graph: ChannelGraph, removed: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
    """``{conv/linear name: (output channels kept, before)}`` for every Conv/Linear that is an "out"
    member of a group, in group order."""
    cut: dict[str, int] = {}
    for g in graph.groups:
        k = len(set(int(i) for i in removed.get(g.name, ())))
        for m in g.members:
            if m.kind == "out" and m.module in graph._layer_out:
                cut[m.module] = cut.get(m.module, 0) + k * (m.index.size // g.size)
    return {n: (graph._layer_out[n] - c, graph._layer_out[n]) for n, c in cut.items()}


# --------------------------------------------------------------------------------------------
# per-layer scores -> group scores
# --------------------------------------------------------------------------------------------


def out_layers(model: nn.Module, graph: ChannelGraph) -> list[str]:
    """Conv2d / Linear modules whose output channels some group removes, in group order, unique."""
    seen: dict[str, None] = {}
    for g in graph.groups:
        for m in g.members:
            if m.kind == "out" and isinstance(model.get_submodule(m.module), (nn.Conv2d, nn.Linear)):
                seen.setdefault(m.module, None)
    return list(seen)


def aggregate(graph: ChannelGraph, per_module: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Group channel scores: the sum of the given per-module output-row scores over the group's
    "out" members. Removing a channel removes every one of those rows, and the second-order
    methods' scores are predicted loss increases, which add when the cross terms between layers
    are ignored (their own approximation). Groups none of whose members is scored are left out,
    so they are not pruned."""
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
