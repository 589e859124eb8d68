"""Deploy-time folding: every eval-mode BatchNorm that directly follows a convolution is merged into
that convolution's weights and bias, so the exported model runs one layer where it ran two.

For a conv ``y = W * x + b`` followed by BatchNorm with running mean ``mu``, variance ``v``, ``eps``,
weight ``gamma`` and bias ``beta`` (per output channel ``o``)::

    s_o = gamma_o / sqrt(v_o + eps)
    W'_o = s_o W_o,     b'_o = s_o (b_o - mu_o) + beta_o

which is exact in eval mode (the BatchNorm is an affine map per channel). The pair is found on the
model's ``torch.fx`` graph: a ``Conv2d`` (any stride, padding, dilation, groups) whose ONLY user is a
``BatchNorm2d`` that tracks running statistics; the conv gets the folded parameters and the
BatchNorm becomes ``nn.Identity``. Everything else is left as it is, and so is a model ``torch.fx``
cannot trace (:func:`fold_batchnorms` then returns it unchanged with the reason). The result is a
NEW module; the input is not modified. Arithmetic in float64, cast back to the weights' dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorms"]


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    scale = scale / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
    shift = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(scale)
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(scale)
    dt = conv.weight.dtype
    conv.weight.copy_((conv.weight.to(torch.float64) * scale.reshape(-1, 1, 1, 1)).to(dt))
    new_bias = (bias - bn.running_mean.to(torch.float64)) * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(dt))
    else:
        conv.bias.copy_(new_bias.to(dt))


def fold_batchnorms(model: nn.Module) -> tuple[nn.Module, int, str]:
    """``(folded copy, number of BatchNorms folded, reason when none could be)`` for an eval-mode
    export (module docstring)."""
    import torch.fx

    model = copy.deepcopy(model).eval()
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure leaves the model as it is
        return model, 0, f"torch.fx cannot trace the model ({type(exc).__name__})"
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):  # the loop erases nodes: iterate over a snapshot
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        bn, src = modules[node.target], node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if type(conv) is not nn.Conv2d or not bn.track_running_stats or bn.running_mean is None:
            continue
        if conv.out_channels != bn.num_features:
            continue
        _fold_pair(conv, bn)
        parent, _, child = node.target.rpartition(".")
        setattr(graph_module.get_submodule(parent) if parent else graph_module, child, nn.Identity())
        node.replace_all_uses_with(src)
        graph_module.graph.erase_node(node)
        folded += 1
    if not folded:
        return model, 0, "no BatchNorm follows a convolution directly"
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, folded, ""
