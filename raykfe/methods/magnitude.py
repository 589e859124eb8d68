"""First-order baselines every user compares against, in the channel space.

* ``l1`` (Li et al. 2017): a group channel scores the sum of ``|w|`` of the coupled Conv/Linear
  output rows, divided by the group's mean score: a global ranking of raw L1 norms would just
  empty the layers with the smallest weights; Li et al. prune per layer, and the per-group
  normalisation is the usual global variant. Not in loss units.
* ``slimming`` (network slimming, Liu et al. 2017): a group channel scores the sum of ``|gamma|``
  of the coupled BatchNorms after a sparsity-training stage (L1 on the BatchNorm scales, run by a
  job before pruning; the API refuses it, since it would silently skip that stage). Raw scores:
  that the scales are comparable across layers is the point of the L1 penalty. Groups without a
  BatchNorm are not scored, so they are never pruned.
"""

from __future__ import annotations

import torch
from torch import nn

from ..channels import aggregate, out_layers
from ..errors import ConfigError
from . import ChannelScores, Method, register
from .obs import l1_scores

__all__ = ["L1", "Slimming"]


class L1(Method):
    def channel_scores(self, model, graph, source, settings) -> ChannelScores:
        per = {n: l1_scores(model.get_submodule(n).weight.detach()).numpy() for n in out_layers(model, graph)}
        scores = aggregate(graph, per)
        return ChannelScores({g: s / s.mean() if s.mean() > 0 else s for g, s in scores.items()})


class Slimming(Method):
    def channel_scores(self, model, graph, source, settings) -> ChannelScores:
        per = {}
        for g in graph.groups:
            for m in g.members:
                mod = model.get_submodule(m.module)
                if m.kind == "out" and isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                    per[m.module] = mod.weight.detach().abs().to(torch.float64).numpy()
        scores = aggregate(graph, per)
        if not scores:
            raise ConfigError("prune.method=slimming needs BatchNorm layers and the model has none to prune: choose another method")
        return ChannelScores(scores)


register(L1("l1", "channels", "none", "L1 norm of each filter (Li et al. 2017), normalised per layer", loss_units=False,
            shown=()))
register(Slimming(
    "slimming", "channels", "bn-sparsity", "network slimming: |BatchNorm scale| after L1 sparsity training (Liu et al. 2017)",
    loss_units=False, shown=(),
    needs_job="network slimming trains the base model with an L1 penalty on the BatchNorm scales first (sparsity.*)",
))
