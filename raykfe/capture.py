"""Record layer inputs ``a`` and per-example output gradients ``Ds``, and turn them into K-FAC sums.

One statistics pass over ``batches`` (an iterable of ``(x, y)`` with ``x [N, ...]``, ``y [N]``):

1. the model is put in eval mode (BatchNorm uses its running statistics, ALGORITHMS.md section 0);
2. a forward hook on every prunable layer adds ``a_sum`` of its input to the layer's ``A_sum`` and
   registers a tensor hook on its output (tensor hooks survive in-place activations such as
   torchvision's ``ReLU(inplace=True)``, which break full backward module hooks);
3. labels are sampled from the model's predictive distribution (``fisher="true"``) or taken from
   the data (``fisher="empirical"``). The sample for example ``i`` (its index in the dataset: the
   third element of a batch when present, else ``first_index`` + its position in the stream) uses
   the uniform ``splitmix64(seed, i)``, so the labels -- and the statistics -- do not depend on how
   the data is batched or sharded across workers, nor on a worker being restarted. Shards must
   therefore carry global indices: with implicit ones, true-Fisher statistics record the range
   they cover in ``meta["index_ranges"]`` and :func:`raykfe.merge_stats` refuses overlapping shards
   (two shards both starting at index 0 would reuse the same label draws);
4. the loss is the SUM over the batch of ``-log p(y|x)``, so the gradient reaching each layer output
   is already the per-example ``Ds`` (no batch-size rescaling); the tensor hook adds ``s_sum``.

Parameters are switched to ``requires_grad=False`` for the pass (and restored afterwards) and the
input is made to require grad instead, so backward computes activation gradients only, no weight
gradients: the pass costs less than a plain training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .counting import eval_forward_with_hooks
from .errors import ConfigError, NumericalError
from .factors import INDEX_RANGES, LayerStats
from .layers import Adapter, make_adapter, positions, unsupported_reason

__all__ = ["collect_factors", "find_layers", "trace_layers", "prunable_layers", "layer_metas", "LayerGeometry", "FISHER_TYPES",
           "StatisticsPass", "fisher_labels"]

FISHER_TYPES = ("true", "empirical")


@dataclass(frozen=True)
class LayerGeometry:
    """Shapes seen by a layer for ONE example (batch dim dropped), and calls per forward."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int = 1


#: a factor side above this is not formed (8192^2 float64 = 512 MiB); the layer stays dense
from .settings import MAX_FACTOR_DIM  # noqa: E402  (re-exported: a factor side above it is not formed)


_M64 = (1 << 64) - 1


def example_uniforms(seed: int, index: torch.Tensor) -> torch.Tensor:
    """A uniform in [0, 1) per example index, from splitmix64 of (seed, index): float64 ``[N]``."""
    idx = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = idx * np.uint64(0x9E3779B97F4A7C15) + np.uint64((int(seed) * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & _M64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def sample_labels(logits: torch.Tensor, index: torch.Tensor, seed: int) -> torch.Tensor:
    """One label per example from softmax(logits), by inverse CDF of :func:`example_uniforms`."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1).cpu()
    u = example_uniforms(seed, index)[:, None]
    return (cdf <= u).sum(dim=1).clamp_max(logits.shape[1] - 1)


def find_layers(
    model: nn.Module, conv_mode: str = "patch", max_factor_dim: int | None = MAX_FACTOR_DIM
) -> tuple[dict[str, Adapter], dict[str, str]]:
    """Adapters for the prunable layers, and ``{name: reason}`` for weight layers left dense.

    Names are as in ``model.named_modules()``. A "weight layer" is any module owning a weight
    with two or more dims (convs, linears, embeddings ...); BatchNorm and friends are not listed.
    A layer whose larger factor would exceed ``max_factor_dim`` is left dense (e.g. torchvision
    VGG's ``Linear(25088, 4096)``: a 25089^2 float64 factor is 5 GB).
    """
    if conv_mode not in ("patch", "full"):
        raise ConfigError(f"conv_mode={conv_mode!r} is not known: use 'patch' (default) or 'full'")
    adapters: dict[str, Adapter] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or name == "":
            continue
        reason = unsupported_reason(module)
        if reason is None:
            adapter = make_adapter(name, module, conv_mode)
            side = max(adapter.d_in, adapter.d_out)
            if max_factor_dim is not None and side > max_factor_dim:
                skipped[name] = f"factor too large ({side} > stats.max_factor_dim={max_factor_dim})"
            else:
                adapters[name] = adapter
        else:
            skipped[name] = reason
    return adapters, skipped


@torch.no_grad()
def trace_layers(model: nn.Module, example_input: torch.Tensor, names: Iterable[str] | None = None) -> dict[str, LayerGeometry]:
    """Run one forward on ``example_input`` and record each named module's per-example shapes.

    The returned dict is in forward (call) order; modules that were never called are absent.
    """
    wanted = set(names) if names is not None else None
    seen: dict[str, list] = {}

    def hook_for(name):
        def hook(mod, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            if name in seen:
                seen[name][2] += 1
            else:
                seen[name] = [tuple(inputs[0].shape[1:]), tuple(output.shape[1:]), 1]
        return hook

    hooks = {
        module: hook_for(name)
        for name, module in model.named_modules()
        if name and (wanted is None or name in wanted) and not list(module.children())
    }
    eval_forward_with_hooks(model, example_input, hooks)
    return {n: LayerGeometry(v[0], v[1], v[2]) for n, v in seen.items()}


def _layer_meta(adapter: Adapter, geo: LayerGeometry) -> dict:
    return {
        "kind": adapter.kind,
        "mode": adapter.mode,
        "fold_bias": adapter.fold_bias,
        "has_bias": adapter.has_bias,
        "c_in": adapter.module.in_channels if adapter.kind == "conv" else adapter.module.in_features,
        "k2": adapter.k2 if adapter.kind == "conv" else 1,
        "d_in": adapter.d_in,
        "d_out": adapter.d_out,
        "in_shape": list(geo.in_shape),
        "out_shape": list(geo.out_shape),
        "positions": positions((1, *geo.out_shape), adapter.kind),
    }


class StatisticsPass:
    """What every statistics pass shares (K-FAC factors here, the diagonal Fisher in
    :mod:`raykfe.methods.obs`, SOSP's sums in :mod:`raykfe.methods.sosp`), as a context manager:

    * on entry the model goes to eval mode (BatchNorm uses its running statistics), every
      parameter's ``requires_grad`` and ``.grad`` are saved, and ``hooks`` (``{module: forward
      hook}``) are attached;
    * :meth:`batches` yields ``(x, y, idx)`` from ``(x, y)`` or ``(x, y, idx)`` batches, ``x`` on
      the model's device, stopping after ``max_batches``, with a progress bar when asked; ``idx``
      is the examples' global indices (given, or ``first_index`` + the position in the stream, in
      which case :attr:`implicit_range` says which indices were used);
    * on exit the hooks are removed and the mode, flags and grads restored, whatever happened.
    """

    def __init__(self, model: nn.Module, desc: str, *, hooks: dict | None = None, max_batches: int | None = None,
                 progress: bool = False, first_index: int = 0) -> None:
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"max_batches={max_batches} must be a positive integer (or None for all batches)")
        self.model, self.desc, self.hooks = model, desc, dict(hooks or {})
        self.max_batches, self.progress = max_batches, progress
        self.first_index = self.position = _check_first_index(first_index)
        self.implicit, self.seen = False, 0
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def __enter__(self) -> "StatisticsPass":
        self.saved = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        self.was_training = self.model.training
        self.model.eval()
        self.handles = [m.register_forward_hook(h) for m, h in self.hooks.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for p, flag, grad in self.saved:
            p.requires_grad_(flag)
            p.grad = grad
        self.model.train(self.was_training)

    def restore_flags(self) -> None:
        """Give the parameters back their own ``requires_grad`` (inside the pass)."""
        for p, flag, _ in self.saved:
            p.requires_grad_(flag)

    def batches(self, batches: Iterable):
        iterator = batches
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc=self.desc, total=self.max_batches, leave=False, disable=None)  # terminal only
        for b, batch in enumerate(iterator):
            if self.max_batches is not None and b >= self.max_batches:
                break
            x, y = batch[0], batch[1]
            n = x.shape[0]
            idx = batch[2] if len(batch) > 2 else torch.arange(self.position, self.position + n)
            self.implicit = self.implicit or len(batch) <= 2
            self.position += n
            self.seen += n
            yield x.to(self.device), y, idx

    @property
    def implicit_range(self) -> list[list[int]] | None:
        """``[[start, stop)]`` of the positional indices used, when some batch had none."""
        return [[self.first_index, self.position]] if self.implicit else None


def fisher_labels(logits: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, fisher: str, seed: int) -> torch.Tensor:
    """The labels of the Fisher's loss: sampled per example index (``"true"``) or the data's."""
    if logits.dim() != 2:
        raise ConfigError(f"the model's output has shape {tuple(logits.shape)}: raykfe expects logits [N, classes]")
    if fisher == "true":
        return sample_labels(logits.detach(), idx, seed).to(logits.device)
    return y.to(logits.device)


def _check_fisher(fisher: str) -> None:
    if fisher not in FISHER_TYPES:
        raise ConfigError(f"fisher={fisher!r} is not known: use 'true' (sampled labels) or 'empirical'")


def collect_factors(
    model: nn.Module,
    batches: Iterable,
    fisher: str = "true",
    conv_mode: str = "patch",
    *,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    max_batches: int | None = None,
    max_factor_dim: int | None = MAX_FACTOR_DIM,
    device: str | torch.device | None = None,
    progress: bool = False,
    first_index: int = 0,
) -> dict[str, LayerStats]:
    """K-FAC statistics of every prunable layer of ``model`` over ``batches``.

    Returns ``{module name: LayerStats}`` (``.A`` and ``.S`` are the mean factors, float64).
    ``layers`` restricts the pass to some layer names; otherwise layers whose factors would be
    larger than ``max_factor_dim`` are skipped. The model's parameters, mode and grads are
    left as they were. ``batches`` yields ``(x, y)`` or ``(x, y, idx)`` (idx: global example
    indices, which pick each example's label draw); without idx the index of an example is
    ``first_index`` + its position in the stream: a shard of a larger data set collected by hand
    passes its offset there (see the module docstring). ``device``: where the inputs go (default:
    the model's).
    """
    _check_fisher(fisher)
    adapters = _factor_layers(model, conv_mode, layers, max_factor_dim)
    stats: dict[str, LayerStats] = {}
    calls: dict[str, int] = {}
    hooks = {a.module: _factor_hook(n, a, stats, calls) for n, a in adapters.items()}
    with StatisticsPass(model, "statistics", hooks=hooks, max_batches=max_batches, progress=progress,
                        first_index=first_index) as run:
        if device is not None:
            run.device = torch.device(device)
        for p, _, _ in run.saved:
            p.requires_grad_(False)  # activation gradients only: the pass costs less than a training step
        for x, y, idx in run.batches(batches):
            if x.is_floating_point():
                x = x.detach().requires_grad_(True)
            else:  # integer inputs (token ids) cannot carry grad: let the parameters do it
                run.restore_flags()
            calls.clear()
            with torch.enable_grad():
                logits = model(x)
                F.cross_entropy(logits, fisher_labels(logits, y, idx, fisher, seed), reduction="sum").backward()
            for st in stats.values():
                st.count += x.shape[0]
    if not stats:
        raise ConfigError("no batch was seen: the data given for statistics is empty")
    _check_finite(stats)
    if run.implicit and fisher == "true":  # the labels were drawn by position: say which positions
        for st in stats.values():
            st.meta[INDEX_RANGES] = run.implicit_range
    # layers the forward pass never reached have no statistics and are not returned
    return {n: stats[n] for n in adapters if n in stats}


def _factor_layers(model: nn.Module, conv_mode: str, layers, max_factor_dim) -> dict[str, Adapter]:
    adapters, _ = find_layers(model, conv_mode, None if layers is not None else max_factor_dim)
    if layers is not None:
        wanted = list(layers)
        missing = [n for n in wanted if n not in adapters]
        if missing:
            raise ConfigError(f"layers {missing} are not prunable Linear/Conv2d modules of the model")
        adapters = {n: adapters[n] for n in wanted}
    if not adapters:
        raise ConfigError("the model has no prunable layer (Linear or Conv2d with groups=1): nothing to collect")
    return adapters


def _factor_hook(name: str, adapter: Adapter, stats: dict[str, LayerStats], calls: dict[str, int]):
    """The forward hook of one layer: adds the batch's ``A`` sum and registers a tensor hook on the
    output that adds its ``S`` sum (tensor hooks survive in-place activations)."""

    def hook(mod, inputs, output):
        x = inputs[0]
        if name not in stats:
            geo = LayerGeometry(tuple(x.shape[1:]), tuple(output.shape[1:]))
            stats[name] = LayerStats.zeros(adapter.d_in, adapter.d_out, _layer_meta(adapter, geo), device=x.device)
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:
            raise ConfigError(
                f"layer {name!r} is called more than once per forward (shared weights): "
                "exclude it with prune.exclude or use a model without weight sharing"
            )
        # finiteness at the cost of two scalars, not of extra passes over every activation: the
        # batch's A has the squared inputs on its diagonal, and a sum is NaN/Inf when any term is
        a = adapter.a_sum(x)
        if not bool(torch.isfinite(a.diagonal().sum())):
            raise NumericalError(
                f"layer {name!r} receives NaN/Inf inputs in the K-FAC statistics pass: the data or the layers "
                "before it are not finite (check the input data and model.weights, e.g. BatchNorm statistics)"
            )
        if not bool(torch.isfinite(output.detach().sum())):
            raise NumericalError(
                f"layer {name!r} gives NaN/Inf outputs from finite inputs in the K-FAC statistics pass: its "
                "weights are not finite or too large (check model.weights, or lower the learning rate that trained it)"
            )
        st = stats[name]
        st.A_sum += a.to(torch.float64)
        if output.requires_grad:

            def grad_hook(g: torch.Tensor) -> None:  # must return None: the grad is unchanged
                st.S_sum.add_(adapter.s_sum(g).to(torch.float64))

            output.register_hook(grad_hook)

    return hook


def _check_finite(stats: dict[str, LayerStats]) -> None:
    """Never hand on (or store) a factor that is not finite."""
    for name, st in stats.items():
        for factor, total in (("A", st.A_sum), ("S", st.S_sum)):
            if not bool(torch.isfinite(total).all()):
                raise NumericalError(
                    f"factor {factor} of layer {name!r} has {int((~torch.isfinite(total)).sum())} NaN/Inf entries "
                    "after the K-FAC statistics pass: the loss or its gradients overflowed (check model.weights "
                    "and the input data for huge values)"
                )


def prunable_layers(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    conv_mode: str = "patch",
    include_classifier: bool = False,
    exclude: Iterable[str] = (),
    max_factor_dim: int | None = MAX_FACTOR_DIM,
) -> tuple[dict[str, Adapter], dict[str, str]]:
    """Adapters of the layers the KFE methods prune, in forward order, and ``{name: reason}`` for
    the weight layers they leave dense (unsupported, too large, excluded, the classifier)."""
    adapters, skipped = find_layers(model, conv_mode, max_factor_dim)
    geo = trace_layers(model, example_input)
    exclude = list(exclude)
    for name in exclude:
        if name not in adapters and name not in skipped:
            raise ConfigError(f"prune.exclude names {name!r}, which is not a layer of the model")
    order = [n for n in geo if n in adapters]
    for name in adapters:
        if name not in geo:
            skipped[name] = "not called in the forward pass"
    for name in exclude:
        if name in adapters:
            skipped[name] = "excluded by prune.exclude"
    if order and not include_classifier:
        skipped[order[-1]] = "classifier (kept by default; prune.include_classifier=true prunes it)"
    chosen = {n: adapters[n] for n in order if n not in skipped}
    if not chosen:
        raise ConfigError(
            "the model has no prunable layer (Linear, or Conv2d with groups=1, other than the classifier): "
            "use another model or set prune.include_classifier=true"
        )
    return chosen, skipped


def layer_metas(model: nn.Module, example_input: torch.Tensor, adapters: dict[str, Adapter]) -> dict[str, dict]:
    """The geometry of every layer of ``adapters`` (as :func:`collect_factors` records it)."""
    geo = trace_layers(model, example_input, list(adapters))
    return {n: _layer_meta(a, geo[n]) for n, a in adapters.items()}


def _check_first_index(first_index) -> int:
    if isinstance(first_index, bool) or not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ConfigError(
            f"first_index={first_index!r} must be an integer >= 0: the global index of the shard's first example"
        )
    return int(first_index)
