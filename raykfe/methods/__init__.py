"""Importance methods, registered by name (as timm registers models): each module of this package
registers its methods and the statistics they need, and the engine (:mod:`raykfe.engine`) asks
the registry, never a chain of ``if name == ...``.

A method removes structures in one of two spaces:

* ``kfe``: eigen-directions of the Kronecker-factored eigenbasis; a pruned layer becomes
  rotation -> core -> rotation (:mod:`raykfe.surgery`), nothing else in the model changes;
* ``channels``: whole output channels / neurons in parameter coordinates, removed with every
  coupled layer (BatchNorm, residual additions, concatenations) by :mod:`raykfe.channels`.

``statistics`` names what a method needs from the data (one pass, all-reduced across Ray Train
workers when distributed):

* ``kfac``: K-FAC factors in the job's ``stats.conv_mode`` (:func:`raykfe.collect_factors`);
* ``kfac-full``: K-FAC factors in full conv mode (the parameter-coordinate Fisher of a conv row);
* a name in :data:`STATISTICS` (``diag-fisher``, ``sosp-h``, ``sosp-i``): a function that turns
  ``(model, batches, spec)`` into a flat dict of SUMS over examples (plus ``count``), so that
  shards all-reduce by plain summation; :func:`collect_statistic` runs it anywhere;
* ``bn-sparsity``: no pass; a sparsity-training stage (L1 on BatchNorm scales) instead;
* ``none``: the weights alone.

A channel method implements :meth:`Method.channel_scores` (and :meth:`Method.compensate` when it
updates the kept weights); the KFE methods are scored in the eigenbasis by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..channels import ChannelGraph
    from ..settings import PruneSettings

__all__ = ["Method", "MethodInfo", "METHODS", "STATISTICS", "register", "register_statistic", "method_info",
           "get_method", "collect_statistic", "ChannelScores"]


@dataclass(frozen=True)
class ChannelScores:
    """A channel method's scores: ``{group root: [group size] scores}`` and what its compensating
    update needs (``aux``, e.g. the K-FAC statistics of the coupled layers)."""

    scores: dict[str, np.ndarray]
    aux: Any = None


@dataclass(frozen=True)
class Method:
    """One registered method: its name, space, statistics and how it scores (see the module doc).

    ``loss_units``: the scores are predicted loss increases (reported as such); ``needs_job``:
    the method has a stage the API cannot run (sparsity training), so the API refuses it with a
    one-line error naming the job command; ``shown``: the settings that say how it pruned (a
    job report prints them beside the per-layer cap); ``defaults``: what the method chooses for the
    settings left ``None`` (``rank``, ``normalize``; chosen with bench/quality.py, BENCHMARKS.md).
    """

    name: str
    space: str  # "kfe" | "channels"
    statistics: str
    summary: str
    compensates: bool = False
    rounds: int = 1
    loss_units: bool = True
    needs_job: str = ""
    shown: tuple[str, ...] = ("fisher", "normalize")
    defaults: dict = field(default_factory=dict, hash=False, compare=False)  # what it decides when settings are None

    def channel_scores(self, model: nn.Module, graph: "ChannelGraph", source, settings: "PruneSettings") -> ChannelScores:
        raise NotImplementedError(f"{self.name} is not a channel method")

    def compensate(self, model: nn.Module, graph: "ChannelGraph", removed: Mapping[str, list[int]], aux: Any,
                   settings: "PruneSettings") -> nn.Module:
        """The model with the kept weights updated for ``removed`` (default: unchanged)."""
        return model


#: alias kept for code written against the earlier name
MethodInfo = Method

#: every method by name, in the order reports list them
METHODS: dict[str, Method] = {}

#: statistic name -> ``fn(model, batches, spec, *, fisher, seed, max_batches, progress) -> {name: sum tensor}``
STATISTICS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def register_statistic(name: str):
    """Decorator: ``fn`` computes the statistic ``name`` (sums over the batches, see the module doc)."""

    def deco(fn):
        STATISTICS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"prune.method={name!r} is not known: choose one of {', '.join(METHODS)}")
    return METHODS[name]


method_info = get_method


def collect_statistic(kind: str, model: nn.Module, batches: Iterable, spec: dict, *, fisher: str = "true",
                      seed: int = 0, max_batches: int | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """The registered statistic ``kind`` of ``model`` over ``batches``: a flat dict of sums."""
    if kind not in STATISTICS:
        raise ConfigError(f"statistics kind {kind!r} is not known: use one of {', '.join(STATISTICS)}")
    return STATISTICS[kind](model, batches, spec, fisher=fisher, seed=seed, max_batches=max_batches, progress=progress)


# registration: importing the modules fills METHODS (in this order: the order of reports) and STATISTICS
from . import eigendamage as _eigendamage  # noqa: E402,F401
from . import obs as _obs  # noqa: E402,F401
from . import sosp as _sosp  # noqa: E402,F401
from . import magnitude as _magnitude  # noqa: E402,F401
from .eigendamage import entry_scores, kfe_weight, unit_scores  # noqa: E402,F401
from .. import recalibrate as _recalibrate  # noqa: E402,F401  (registers the "bn" statistic)
from .. import ekfac as _ekfac  # noqa: E402,F401  (registers the "ekfac" statistic)

