"""``raykfe.prune``: the engine (:mod:`raykfe.engine`) over batches the caller holds, in this process."""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import torch
from torch import nn

from .engine import BatchSource, PruneResult
from .engine import prune as _engine_prune
from .errors import ConfigError
from .factors import LayerStats
from .settings import PruneSettings

__all__ = ["prune"]


def prune(
    model: nn.Module,
    batches: Iterable,
    method: str = "eigendamage",
    target: str = "flops:0.5",
    *,
    stats: Mapping[str, LayerStats] | None = None,
    example_input: torch.Tensor | None = None,
    heldout: Iterable | None = None,
    settings: PruneSettings | None = None,
    **options,
) -> PruneResult:
    """Prune ``model`` with ``method`` to ``target`` using the statistics of ``batches``.

    ``batches`` yields ``(x, y)`` (or ``(x, y, idx)`` with global example indices); ``y`` is used
    only with ``fisher="empirical"`` and by SOSP's gradient. ``options`` are fields of
    :class:`raykfe.settings.PruneSettings` (``fisher``, ``conv_mode``, ``max_layer_ratio``,
    ``include_classifier``, ``exclude``, ``tolerance``, ``freeze_rotations``, ``seed``,
    ``max_batches``, ``max_factor_dim``, ``damping``, ``progress``), or pass ``settings`` whole.
    ``stats`` (from :func:`raykfe.collect_factors`) reuses K-FAC statistics the caller has;
    ``example_input`` is the input MACs are counted for (default: the first example of
    ``batches``); ``heldout`` batches (not used for statistics) give each step's measured loss
    increase beside the predicted one (``result.plan.steps``). ``method`` is any name of :data:`raykfe.methods.METHODS` except those that need
    a job's stages (fine-tuning between rounds, sparsity training). The input model is unchanged.
    """
    known = {f.name for f in dataclasses.fields(PruneSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"raykfe.prune got unknown option(s) {unknown}: use fields of PruneSettings ({', '.join(sorted(known))})")
    settings = dataclasses.replace(settings or PruneSettings(), **options)
    source = BatchSource(batches, settings, example=example_input, stats=stats, heldout=heldout)
    return _engine_prune(model, source, method, target, settings, api=True)
