"""torch-pruning as a peer, shared by the benchmarks (``methods_compare.py``, ``quality.py``).

What is here:

* :func:`importance`: the three criteria users pick in torch-pruning 1.6 (``GroupMagnitudeImportance``
  with p=2, i.e. the group L2 norm; ``GroupTaylorImportance``; ``GroupHessianImportance``), each with
  its default group reduction and normaliser (mean, mean);
* :func:`mean_gradient` / :func:`mean_squared_gradient`: what Taylor and Hessian read from
  ``param.grad``, computed once on the base model in eval mode (BatchNorm statistics untouched, like
  raykfe's statistics passes), keyed by parameter name;
* :func:`tp_prune`: one ``tp.pruner.BasePruner`` step with GLOBAL ranking on a copy of the base,
  the classifier ignored;
* :func:`reach_target`: bisection on the global channel ratio until the MACs removed (counted by
  :func:`raykfe.count` on the example input) lie in ``[frac, frac + tolerance]``, with a scan of
  ratios when the bisection finds none (the reduction is not monotonic in the ratio).

Why the Hessian diagonal is accumulated here: ``GroupHessianImportance.accumulate_grad`` in
torch-pruning 1.6 tests ``name not in self._accu_grad`` on a dict keyed by the parameter, so every
call overwrites the sum and only the LAST example counts. ``GroupHessianImportance.__call__`` with an
empty accumulator reads ``param.grad`` as the squared-gradient mean, which is what it would use after
a working accumulation, so the mean is put in ``param.grad``.

Batches are ``(x, y)`` with ``x`` float32 ``[B, C, H, W]`` and ``y`` int64 ``[B]``.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from raykfe.counting import count

__all__ = [
    "CRITERIA", "MAGNITUDE_P", "TOLERANCE", "importance", "mean_gradient", "mean_squared_gradient", "criterion_grads",
    "tp_prune", "reach_target", "classifier_of",
]

#: criterion -> a readable name
CRITERIA = {
    "magnitude": "tp Magnitude (group L2)",
    "taylor": "tp Taylor",
    "hessian": "tp GroupHessian",
}
MAGNITUDE_P = 2  # GroupMagnitudeImportance's norm: tp's default, the "group L2" of its benchmarks
TOLERANCE = 0.01  # bisection: accept an achieved MACs reduction in [target, target + TOLERANCE]


def importance(criterion: str):
    if criterion == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=MAGNITUDE_P)
    if criterion == "taylor":
        return tp.importance.GroupTaylorImportance()
    if criterion == "hessian":
        return tp.importance.GroupHessianImportance()
    raise ValueError(f"unknown torch-pruning criterion {criterion!r}: choose from {', '.join(CRITERIA)}")


def classifier_of(model: nn.Module) -> nn.Module:
    """The last Linear of ``model`` (the classifier every raykfe model ends with)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no Linear classifier to leave out of the pruning")
    return linears[-1]


def mean_gradient(base: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Mean cross-entropy gradient (dataset labels) over every example of ``batches``, eval mode."""
    model = copy.deepcopy(base).eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad
        seen += len(y)
    return {n: s / seen for n, s in sums.items()}


def mean_squared_gradient(base: nn.Module, batches: Iterable, max_examples: int | None = None) -> dict[str, torch.Tensor]:
    """Mean of SQUARED per-example cross-entropy gradients (dataset labels, eval mode) over the first
    ``max_examples`` examples (all when None): the diagonal (empirical Fisher) that
    ``GroupHessianImportance`` is documented to accumulate, one example per backward."""
    model = copy.deepcopy(base).eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for x, y in batches:
        for i in range(len(y)):
            if max_examples is not None and seen >= max_examples:
                break
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.pow(2)
            seen += 1
    return {n: s / seen for n, s in sums.items()}


def criterion_grads(base: nn.Module, criterion: str, batches: Iterable, max_examples: int | None = None):
    """What ``criterion`` reads from ``param.grad`` (None for magnitude)."""
    if criterion == "magnitude":
        return None
    if criterion == "taylor":
        return mean_gradient(base, batches)
    if criterion == "hessian":
        return mean_squared_gradient(base, batches, max_examples)
    raise ValueError(f"unknown torch-pruning criterion {criterion!r}")


def tp_prune(base: nn.Module, criterion: str, grads: Mapping[str, torch.Tensor] | None, ratio: float,
             example: torch.Tensor) -> nn.Module:
    """A pruned copy of ``base``: one global ``BasePruner`` step at channel ratio ``ratio``."""
    model = copy.deepcopy(base).eval()
    if grads is not None:
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
    pruner = tp.pruner.BasePruner(
        model, example, importance=importance(criterion), global_pruning=True, pruning_ratio=ratio,
        ignored_layers=[classifier_of(model)],
    )
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model


def reach_target(base: nn.Module, criterion: str, grads, frac: float, example: torch.Tensor, *,
                 tolerance: float = TOLERANCE, max_trials: int = 30):
    """Bisection on the global channel ratio until the MACs reduction is in ``[frac, frac + tolerance]``;
    else the trial closest above the target. -> ``(model, ratio, achieved, trials)``.

    The reduction is not monotonic in the ratio near the top: torch-pruning skips a group whose
    channels would all go, so a higher ratio can remove LESS (resnet32 on digits: ratio 0.85 removes
    98.9% of the MACs, 0.875 only 93.3%) and the bisection can walk past the window. When no trial
    reached ``frac``, ratios 0.01, 0.02, ..., 0.99 are tried in turn (first one in the window, else
    the smallest reduction above ``frac``). Raises RuntimeError when none reaches ``frac``."""
    base_macs = count(base, example).macs

    def trial(ratio: float):
        model = tp_prune(base, criterion, grads, ratio, example)
        return model, ratio, 1 - count(model, example).macs / base_macs

    lo, hi, best, trials = 0.0, 1.0, None, 0
    for trials in range(1, max_trials + 1):
        model, ratio, achieved = trial((lo + hi) / 2)
        if achieved >= frac and (best is None or achieved < best[2]):
            best = (model, ratio, achieved)
        if frac <= achieved <= frac + tolerance:
            break
        lo, hi = (ratio, hi) if achieved < frac else (lo, ratio)
    if best is None:
        for step in range(1, 100):
            trials += 1
            model, ratio, achieved = trial(step / 100)
            if achieved >= frac and (best is None or achieved < best[2]):
                best = (model, ratio, achieved)
            if frac <= achieved <= frac + tolerance:
                break
    if best is None:
        raise RuntimeError(f"no channel ratio reached {100 * frac:g}% fewer MACs")
    return (*best, trials)
