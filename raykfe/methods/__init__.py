"""Importance methods, registered by name. Each one turns a model's statistics into scores of
structures, and the structures are removed in one of two spaces:

* ``kfe``: eigen-directions of the Kronecker-factored eigenbasis; a pruned layer becomes
  rotation -> core -> rotation (:mod:`raykfe.surgery`), nothing else in the model changes;
* ``channels``: whole output channels / neurons in parameter coordinates, removed with every
  coupled layer (BatchNorm, residual additions, concatenations) by :mod:`raykfe.channels`.

``statistics`` names what a method needs from the data (one pass, all-reduced across Ray Train
workers when distributed):

* ``kfac``: K-FAC factors in the job's ``stats.conv_mode`` (:func:`raykfe.collect_factors`);
* ``kfac-full``: K-FAC factors in full conv mode (the parameter-coordinate Fisher of a conv row);
* ``diag-fisher``: the exact diagonal Fisher from per-example gradients;
* ``sosp-h``: the mean gradient and ONE Gauss-Newton-vector product per batch;
* ``sosp-i``: the pairwise Gauss-Newton products of all structures;
* ``bn-sparsity``: no pass; a sparsity-training stage (L1 on BatchNorm scales) instead;
* ``none``: the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from .eigendamage import entry_scores, kfe_weight, unit_scores

__all__ = ["kfe_weight", "entry_scores", "unit_scores", "METHODS", "MethodInfo", "method_info"]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    space: str  # "kfe" | "channels"
    statistics: str
    summary: str
    compensates: bool = False  # applies an OBS compensating update to the kept weights
    rounds: int = 1  # default number of prune / fine-tune rounds


_ALL = [
    MethodInfo("eigendamage", "kfe", "kfac", "EigenDamage: KFE directions scored by the K-FAC Fisher (one pass)"),
    MethodInfo("eigendamage-iterative", "kfe", "kfac",
               "EigenDamage in rounds of prune, fine-tune, re-collect and merge bases (prune.rounds)", rounds=3),
    MethodInfo("c-obd", "channels", "diag-fisher", "channel OBD with the exact diagonal Fisher"),
    MethodInfo("c-obs", "channels", "kfac-full",
               "channel OBS, element-wise with the damped K-FAC inverse, sum-of-singles update", compensates=True),
    MethodInfo("kron-obd", "channels", "kfac-full", "channel OBD with the K-FAC Fisher: 1/2 S_ii w_i^T A w_i"),
    MethodInfo("kron-obs", "channels", "kfac-full",
               "channel OBS with the damped K-FAC Fisher and its joint compensating update", compensates=True),
    MethodInfo("sosp-h", "channels", "sosp-h", "SOSP-H: one Gauss-Newton-vector product scores every channel"),
    MethodInfo("sosp-i", "channels", "sosp-i", "SOSP-I: pairwise Gauss-Newton interactions of all channels"),
    MethodInfo("l1", "channels", "none", "L1 norm of each filter (Li et al. 2017), normalised per layer"),
    MethodInfo("slimming", "channels", "bn-sparsity",
               "network slimming: |BatchNorm scale| after L1 sparsity training (Liu et al. 2017)"),
]

#: every method by name, in the order reports list them
METHODS: dict[str, MethodInfo] = {m.name: m for m in _ALL}


def method_info(name: str) -> MethodInfo:
    from ..errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"prune.method={name!r} is not known: choose one of {', '.join(METHODS)}")
    return METHODS[name]
