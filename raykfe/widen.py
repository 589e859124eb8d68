"""Widening as data: a widened architecture is a base model spec plus new channel-group widths.

The mirror image of channel surgery (:mod:`raykfe.channels`). Where pruning removes units of a
channel group from every coupled layer, widening ADDS units to every coupled layer: the output
rows of the group's producers (conv/linear weight and bias, dim 0), the matching entries of its
norms (scale, shift, running statistics), depthwise convs (which follow their input), bare
per-channel parameters, and the input columns of its consumers (dim 1 of a conv/linear weight).
The channel dependency graph says which layers widen together, so a residual stream, a
concatenation or a flatten into a Linear widens as one unit.

Coordinates and layout
----------------------
A group of ``size`` units grows to ``n >= size`` units. In a member that owns ``m`` entries of a
dimension per unit (``m = 1`` for a plain conv channel, ``H*W`` for a channel flattened into a
Linear, ``G`` for a unit tied across the ``G`` groups of a grouped conv), that dimension grows by
``(n - size) * m``. Only the sizes matter: every module whose shape changes is built anew and
freshly initialised (the widened network is trained from scratch, as in the SOSP paper), so where
the new entries sit is irrelevant. Modules whose shape does not change keep their (equally fresh)
initialisation from :func:`raykfe.models.build_model`.

Initialisation of a reshaped module (the rule raykfe's own models use): Conv weights
Kaiming-normal (fan_out, ReLU) and zero bias; norms scale 1, shift 0, running statistics reset;
Linear PyTorch's default; a bare per-channel parameter keeps the mean of its old entries in its
new ones (ConvNeXt's ``layer_scale`` is a constant).

The spec (:class:`Widths`, JSON)::

    {"format": 1, "kind": "raykfe.widths",
     "model": {"name": "resnet32", "num_classes": 10, "width": 1.0},   # build_model's spec
     "input_shape": [3, 32, 32],                                       # the example the graph is traced on
     "base": {"conv1": 16, "layer1.0.conv1": 16, ...},                 # every group's size in the base
     "groups": {"layer3.0.conv1": 128, ...}}                           # the widened ones, in units

``build_model(**spec)`` with ``spec = widths.spec()`` (the model spec plus a ``widths`` entry)
rebuilds the widened architecture anywhere (a Ray Train worker, :func:`raykfe.checkpoint.load`):
no pickles, only this data. A spec whose groups equal the base sizes is the base model.

Refused (one-line :class:`ConfigError` naming them): names that are not channel groups (the
model input has none; the classifier's outputs are the classes), attention head groups (set the
model's number of heads instead), and groups whose widened width a GroupNorm or grouped conv
cannot divide.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "Widths", "WIDTHS_FORMAT", "widen", "widths_for", "build_widened", "widenable_groups", "widened_macs",
    "bottleneck_groups", "scaled_widths", "uniform_widths", "plan_bottlenecks", "read_widths", "job_model",
]

WIDTHS_FORMAT = 1
_KIND = "raykfe.widths"
_CONVND = nn.modules.conv._ConvNd
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


# --------------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Widths:
    """A widened architecture as data (see the module docstring)."""

    model: dict  # build_model's spec of the base: name, num_classes, width (, image_size)
    input_shape: tuple[int, ...]  # one example without the batch, e.g. (3, 32, 32)
    base: dict[str, int]  # every channel group's size (units) in the base
    groups: dict[str, int] = field(default_factory=dict)  # widened groups -> new size (units)

    def spec(self) -> dict:
        """``build_model(**spec)`` builds this architecture (the base spec when nothing widens)."""
        grown = {k: v for k, v in self.groups.items() if v != self.base.get(k)}
        if not grown:
            return dict(self.model)
        return {**self.model, "widths": {"input_shape": list(self.input_shape), "base": dict(self.base), "groups": grown}}

    def to_dict(self) -> dict:
        return {"format": WIDTHS_FORMAT, "kind": _KIND, "model": dict(self.model), "input_shape": list(self.input_shape),
                "base": dict(self.base), "groups": dict(self.groups)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @staticmethod
    def from_dict(d) -> "Widths":
        if not isinstance(d, dict) or d.get("kind", _KIND) != _KIND:
            raise ConfigError("a widths spec must be a JSON object with kind 'raykfe.widths': write it with raykfe.widen")
        if int(d.get("format", WIDTHS_FORMAT)) > WIDTHS_FORMAT:
            raise ConfigError(f"the widths spec has format {d['format']}, newer than this raykfe reads ({WIDTHS_FORMAT}): upgrade raykfe")
        model, shape, base, groups = d.get("model"), d.get("input_shape"), d.get("base"), d.get("groups", {})
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            raise ConfigError("the widths spec has no model spec ('model': {name, num_classes, width}): write it with raykfe.widen")
        if (not isinstance(shape, (list, tuple)) or not shape
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
            raise ConfigError(f"the widths spec's input_shape={shape!r} is invalid: give one example's shape, e.g. [3, 32, 32]")
        for key, table in (("base", base), ("groups", groups)):
            if not isinstance(table, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in table.items()):
                raise ConfigError(f"the widths spec's {key!r} must map channel group names to integer sizes")
        return Widths(dict(model), tuple(shape), dict(base), dict(groups))

    @staticmethod
    def from_json(text: str) -> "Widths":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise ConfigError("the widths spec is not valid JSON: write it with raykfe.widen") from None
        return Widths.from_dict(d)


# --------------------------------------------------------------------------------------------
# which groups can widen
# --------------------------------------------------------------------------------------------


def _member_refusal(model: nn.Module, graph, group) -> str | None:
    if group.name in graph._heads:
        return "its units are attention heads: set the model's number of heads instead"
    for mem in group.members:
        m = model.get_submodule(mem.module)
        if isinstance(m, _CONVND):
            if m.transposed:
                return f"transposed conv {mem.module} is coupled"
        elif not isinstance(m, (nn.Linear, *_NORMS)) and mem.module not in graph._sliced:
            return f"{type(m).__name__} {mem.module} is coupled and raykfe cannot widen it"
    return None


def widenable_groups(model: nn.Module, graph) -> dict[str, int]:
    """``{group: size}`` of the groups of ``graph`` (a :class:`raykfe.channels.ChannelGraph` of
    ``model``) that :func:`widen` can grow, in forward order."""
    return {g.name: g.size for g in graph.groups if _member_refusal(model, graph, g) is None}


def _check_groups(model: nn.Module, graph, groups: Mapping[str, int]) -> dict[str, int]:
    """The widened groups (new size != size) after checking every name and size; one ConfigError
    naming every refused group."""
    if not isinstance(groups, Mapping):
        raise ConfigError(f"widths must map channel group names to sizes, got {type(groups).__name__}")
    bad: list[str] = []
    out: dict[str, int] = {}
    for name, n in groups.items():
        g = graph.groups[graph._index[name]] if name in graph._index else None
        if g is None:
            why = graph.skipped.get(name)
            short = "the classifier: its outputs are the classes" if why and why.startswith("classifier") else why
            bad.append(f"{name!r} ({short or 'not a channel group of the model'})")
            continue
        why = _member_refusal(model, graph, g)
        if why:
            bad.append(f"{name!r} ({why})")
            continue
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < g.size:
            bad.append(f"{name!r} (size {n!r}: give an integer >= its {g.size} units; prune to narrow)")
            continue
        if n != g.size:
            out[name] = int(n)
    if bad:
        raise ConfigError(f"cannot widen {', '.join(bad)}: widen only the groups listed by raykfe.widen.widenable_groups")
    return out


# --------------------------------------------------------------------------------------------
# growing modules
# --------------------------------------------------------------------------------------------


def _deltas(graph, grown: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """Entries each module's output (dim 0) and input (dim 1) dimension gains."""
    out_d: dict[str, int] = {}
    in_d: dict[str, int] = {}
    for name, n in grown.items():
        g = graph.group(name)
        for mem in g.members:
            extra = (n - g.size) * (mem.index.size // g.size)
            d = out_d if mem.kind == "out" else in_d
            d[mem.module] = d.get(mem.module, 0) + extra
    return out_d, in_d


def _fresh(shape, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=like.dtype), requires_grad=like.requires_grad)


@torch.no_grad()
def _grow(module: nn.Module, name: str, od: int, idd: int, sliced: Sequence[str]) -> str | None:
    """Grow ``module`` in place by ``od`` outputs and ``idd`` inputs and re-initialise it; the
    reason it cannot, or None."""
    if isinstance(module, _CONVND):
        depthwise = module.groups == module.out_channels == module.in_channels and module.groups > 1
        if depthwise:
            if idd:
                return f"depthwise conv {name} gains inputs apart from its outputs"
            module.in_channels += od
            module.groups += od
        else:
            module.in_channels += idd
        module.out_channels += od
        if module.in_channels % module.groups or module.out_channels % module.groups:
            return f"conv {name} has {module.groups} groups, which do not divide its widened channels"
        module.weight = _fresh((module.out_channels, module.in_channels // module.groups, *module.kernel_size), module.weight)
        if module.bias is not None:
            module.bias = _fresh((module.out_channels,), module.bias)
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return None
    if isinstance(module, nn.Linear):
        module.out_features += od
        module.in_features += idd
        module.weight = _fresh((module.out_features, module.in_features), module.weight)
        if module.bias is not None:
            module.bias = _fresh((module.out_features,), module.bias)
        module.reset_parameters()
        return None
    if idd:
        return f"{type(module).__name__} {name} gains inputs"
    if isinstance(module, _NORMS):
        if isinstance(module, nn.LayerNorm):
            c = module.normalized_shape[-1] + od
            module.normalized_shape = (c,)
        elif isinstance(module, nn.GroupNorm):
            c = module.num_channels = module.num_channels + od
            if c % module.num_groups:
                return f"GroupNorm {name} has {module.num_groups} groups, which do not divide its widened {c} channels"
        elif isinstance(module, nn.PReLU):
            c = module.num_parameters = module.num_parameters + od
        else:
            c = module.num_features = module.num_features + od
        for pn, p in list(module.named_parameters(recurse=False)):
            if p.dim() >= 1:
                setattr(module, pn, _fresh((c, *p.shape[1:]), p))
        for bn, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() >= 1:
                setattr(module, bn, torch.empty((c, *b.shape[1:]), device=b.device, dtype=b.dtype))
        if isinstance(module, nn.PReLU):
            nn.init.constant_(module.weight, 0.25 if module.init is None else module.init)
        else:
            module.reset_parameters()
        return None
    for pn in sliced:  # an owner of bare per-channel parameters (ConvNeXt's layer_scale)
        p = getattr(module, pn)
        new = _fresh((p.shape[0] + od, *p.shape[1:]), p)
        new.fill_(float(p.float().mean()))
        setattr(module, pn, new)
    return None


def _example(graph_input, model: nn.Module) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    x = graph_input[:1]
    if p is not None and x.is_floating_point():
        x = x.to(device=p.device, dtype=p.dtype)
    return x


def widen(model: nn.Module, example_input: torch.Tensor, groups: Mapping[str, int], *, graph=None) -> nn.Module:
    """A NEW model: ``model`` (untouched) with each named channel group grown to ``groups[name]``
    units, every reshaped module freshly initialised (module docstring). ``graph``: the
    :class:`raykfe.channels.ChannelGraph` of ``model`` on ``example_input`` when the caller has it.

    Raises ConfigError naming every group that cannot widen, or when the widened model does not run.
    """
    from .channels import ChannelGraph

    if graph is None:
        graph = ChannelGraph(model, example_input)
    grown = _check_groups(model, graph, groups)
    new = copy.deepcopy(model)
    if not grown:
        return new
    out_d, in_d = _deltas(graph, grown)
    owner: dict[str, list[str]] = {}
    for name in grown:
        for mem in graph.group(name).members:
            owner.setdefault(mem.module, []).append(name)
    bad = []
    for mod in dict.fromkeys([*out_d, *in_d]):
        why = _grow(new.get_submodule(mod), mod, out_d.get(mod, 0), in_d.get(mod, 0), graph._sliced.get(mod, ()))
        if why:
            bad.append(f"{', '.join(map(repr, owner[mod]))} ({why})")
    if bad:
        raise ConfigError(f"cannot widen {'; '.join(bad)}: choose sizes the layers can take")
    try:
        with torch.no_grad():
            was = new.training
            new.eval()
            new(_example(example_input, new))
            new.train(was)
    except Exception as exc:  # a width hard-coded outside the modules (a view, an attribute)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"the model widened at {', '.join(map(repr, grown))} does not run ({first}): "
                          "this architecture fixes those widths outside its layers; widen other groups") from None
    return new


# --------------------------------------------------------------------------------------------
# specs, builds and costs
# --------------------------------------------------------------------------------------------


def widths_for(model: nn.Module, input_shape: Sequence[int], groups: Mapping[str, int], *, graph=None) -> Widths:
    """The :class:`Widths` of ``model`` (built by :func:`raykfe.models.build_model`, so it has a
    spec) with ``groups`` widened, checked (every refused group named in one ConfigError)."""
    from .channels import ChannelGraph

    spec = getattr(model, "raykfe_spec", None)
    if not isinstance(spec, dict) or "widths" in spec:
        raise ConfigError("widening needs a base model built by raykfe.build_model (it has raykfe_spec, no widths yet)")
    shape = tuple(int(s) for s in input_shape)
    if graph is None:
        graph = ChannelGraph(model, torch.zeros(1, *shape))
    grown = _check_groups(model, graph, groups)
    return Widths(dict(spec), shape, {g.name: g.size for g in graph.groups}, grown)


def build_widened(spec: dict, widths: Mapping) -> nn.Module:
    """``build_model(**spec)`` for a spec with a ``widths`` entry: the base, then :func:`widen`.
    The base's group sizes must be those recorded (a registry that changed is reported)."""
    from .channels import ChannelGraph
    from .models import build_model

    base_spec = {k: v for k, v in spec.items() if k != "widths"}
    w = Widths.from_dict({"model": base_spec, **dict(widths)})
    model = build_model(**base_spec)
    x = torch.zeros(1, *w.input_shape)
    graph = ChannelGraph(model, x)
    now = {g.name: g.size for g in graph.groups}
    if w.base and now != w.base:
        diff = sorted(set(now.items()) ^ set(w.base.items()))[:2]
        raise ConfigError(f"the widths spec was made for another {base_spec['name']} (group sizes differ: {diff}): "
                          "make the widths spec again with this raykfe")
    new = widen(model, x, w.groups, graph=graph)
    new.raykfe_spec = Widths(dict(model.raykfe_spec), w.input_shape, now, w.groups).spec()
    return new


def widened_macs(graph, groups: Mapping[str, int]) -> tuple[int, int]:
    """(params, MACs per example) of the model of ``graph`` widened to ``groups``: the channel
    cost model (exact, a sum of products of per-group counts) at negative removals."""
    counts = np.zeros(len(graph.groups), dtype=np.int64)
    for name, n in groups.items():
        gi = graph._index[name]
        counts[gi] = graph.groups[gi].size - int(n)
    return graph.cost_of_counts(counts)


def scaled_widths(base: Mapping[str, int], names: Sequence[str], factor: float) -> dict[str, int]:
    """``{group: max(size, round(size * factor))}`` for ``names``."""
    return {n: max(base[n], int(round(base[n] * factor))) for n in names}


def uniform_widths(graph, widenable: Mapping[str, int], macs: int, *, hi: float = 8.0,
                   iters: int = 60) -> tuple[float, dict[str, int], int]:
    """The factor ``f`` (every widenable group ``round(size * f)``) whose MACs come closest to
    ``macs``, found by bisection (MACs are non-decreasing in ``f``), with its widths and MACs."""
    names = list(widenable)

    def cost(f: float) -> int:
        return widened_macs(graph, scaled_widths(widenable, names, f))[1]

    if cost(hi) < macs:
        raise ConfigError(f"no uniform widening up to x{hi} reaches {macs} MACs: widen less")
    lo, up = 1.0, hi
    for _ in range(iters):  # invariant: cost(lo) < macs <= cost(up), or lo == 1 with cost(1) >= macs
        if cost(lo) >= macs:
            up = lo
            break
        mid = 0.5 * (lo + up)
        if cost(mid) >= macs:
            up = mid
        else:
            lo = mid
    best = min((lo, up), key=lambda f: (abs(cost(f) - macs), f))
    w = scaled_widths(widenable, names, best)
    return best, w, cost(best)


def plan_bottlenecks(plan) -> list[str]:
    """The layers :func:`raykfe.report.flag_bottlenecks` flags in ``plan``'s report (the rule every
    report applies: the least-pruned tenth, ties included)."""
    from .report import plan_report

    return [r["layer"] for r in plan_report(plan) if "bottleneck" in str(r.get("note", ""))]


def bottleneck_groups(graph, widenable: Mapping[str, int], layers: Sequence[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``({group: flagged layers whose outputs it holds}, flagged layers in no widenable group)``:
    a flagged layer widens the group of its output channels (the classifier's are the classes)."""
    of: dict[str, str] = {}
    for g in graph.groups:
        for m in g.members:
            if m.kind == "out":
                of.setdefault(m.module, g.name)
    groups: dict[str, list[str]] = {}
    lost: list[str] = []
    for layer in layers:
        g = of.get(layer)
        if g is None or g not in widenable:
            lost.append(layer)
        else:
            groups.setdefault(g, []).append(layer)
    order = list(widenable)
    return {g: groups[g] for g in order if g in groups}, lost


# --------------------------------------------------------------------------------------------
# a job's model
# --------------------------------------------------------------------------------------------


def read_widths(uri: str) -> Widths:
    """The widths spec at a local path or URI (``model.widths``); a one-line ConfigError if absent."""
    from .errors import StorageError
    from .storage import open_uri

    base, sep, query = uri.partition("?")  # keep an s3:// URI's ?endpoint_override=... with its folder
    head, _, tail = base.rpartition("/")
    try:
        text = open_uri((head or ".") + sep + query).read_bytes(tail).decode(errors="replace")
    except StorageError:
        raise ConfigError(f"model.widths='{uri}' cannot be read: give the path of a widths JSON (raykfe widen writes them)") from None
    try:
        return Widths.from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"model.widths='{uri}': {exc}") from None


def job_model(cfg, num_classes: int) -> nn.Module:
    """The model of a job (:class:`raykfe.config.JobConfig`): ``model.name`` / ``width``, widened by
    ``model.widths`` when given (whose base must be that model)."""
    from .models import build_model

    m = cfg.model
    if not m.widths:
        return build_model(m.name, num_classes, width=m.width, image_size=cfg.data.image_size)
    w = read_widths(m.widths)
    made = (w.model.get("name"), float(w.model.get("width", 1.0)), w.model.get("num_classes"))
    if made != (m.name, float(m.width), num_classes):
        raise ConfigError(
            f"model.widths='{m.widths}' widens {made[0]} (width {made[1]:g}, {made[2]} classes), not this job's "
            f"{m.name} (width {float(m.width):g}, {num_classes} classes): set model.name / model.width to match"
        )
    return build_model(**w.spec())
