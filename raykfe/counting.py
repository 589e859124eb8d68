"""Parameters and multiply-accumulates (MACs) of any model for an example input.

* ``params``: every parameter of the model (BatchNorm affine and biases included), each shared
  tensor once.
* ``macs``: the multiply-accumulates of every Conv1d/2d/3d, ConvTranspose and Linear call in one
  forward on the example input, for the WHOLE input as given (pass a batch of one to get per-example
  MACs): conv ``out_elements * in_channels/groups * prod(kernel)``, transposed conv
  ``in_elements * out_channels/groups * prod(kernel)``, linear ``out_elements * in_features``. Biases,
  norms, activations and pooling are not counted (the usual convention of pruning papers).

The KFE forms (three layers or folded) are ordinary Conv2d/Linear modules, so they are counted like any other;
:func:`raykfe.plan.kfe_cost` predicts the same numbers analytically (a test checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Counts", "count", "layer_counts", "eval_forward_with_hooks"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONV = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Counts:
    params: int
    macs: int

    def __getitem__(self, key: str) -> int:  # count(...)["params"] works too
        return getattr(self, key)


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, _CONV):
        k = 1
        for s in module.kernel_size:
            k *= s
        return out.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, _TCONV):
        k = 1
        for s in module.kernel_size:
            k *= s
        return inp.numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    return 0


@torch.no_grad()
def eval_forward_with_hooks(model: nn.Module, example_input: torch.Tensor, hooks: dict) -> None:
    """One eval-mode forward with ``{module: forward hook}`` attached; mode and hooks restored."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def count(model: nn.Module, example_input: torch.Tensor) -> Counts:
    """``Counts(params, macs)`` of ``model`` for one forward on ``example_input`` (eval mode)."""
    total = [0]

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            total[0] += _layer_macs(module, inputs[0], output)

    eval_forward_with_hooks(model, example_input, {m: hook for m in model.modules() if isinstance(m, (*_CONV, *_TCONV, nn.Linear))})
    params = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    return Counts(int(params), int(total[0]))


@torch.no_grad()
def layer_counts(model: nn.Module, example_input: torch.Tensor) -> dict[str, Counts]:
    """``{name: Counts}`` of every Conv/Linear module: its own parameters and its MACs for one
    forward on ``example_input`` (the per-layer figures of a report)."""
    names = {m: n for n, m in model.named_modules()}
    macs: dict[str, int] = {}

    def hook(module, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            n = names[module]
            macs[n] = macs.get(n, 0) + _layer_macs(module, inputs[0], output)

    layers = [m for m in model.modules() if isinstance(m, (*_CONV, *_TCONV, nn.Linear))]
    eval_forward_with_hooks(model, example_input, {m: hook for m in layers})
    return {names[m]: Counts(sum(p.numel() for p in m.parameters(recurse=False)), macs.get(names[m], 0)) for m in layers}
