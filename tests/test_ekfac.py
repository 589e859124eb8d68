"""EKFAC's diagonal (ALGORITHMS.md section 10): ``sum_n (Q_S^T G_n Q_A)^2`` equals a per-example
brute force in float64, for Linear, patch-mode and full-mode convs (padding, stride, dilation,
folded biases, borders); the rescored EigenDamage scores are in the units of ``l_S l_A``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import raykfe
from raykfe.capture import fisher_labels
from raykfe.ekfac import ekfac_sums, rescored
from raykfe.layers import conv_pad, make_adapter
from raykfe.methods.eigendamage import score_in_basis
from raykfe.eigen import eigenbasis

DT = torch.float64


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(),           # folded bias, stride, border
        nn.Conv2d(5, 4, 2, padding="same", dilation=2, bias=False),   # even kernel, asymmetric 'same'
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
    ).to(DT).eval()


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))[0]


def _brute(model: nn.Sequential, name: str, mode: str, x: torch.Tensor, labels: torch.Tensor, QA, QS) -> torch.Tensor:
    """Per example: replace the layer by a function of an explicit ``W~`` parameter (the layout of
    raykfe.layers), take that example's loss gradient by autograd, project, square, add."""
    mod = model.get_submodule(name)
    adapter = make_adapter(name, mod, mode)
    wt = adapter.weight_matrix().clone().requires_grad_(True)

    def forward(inp):
        if isinstance(mod, nn.Linear):
            w = wt[:, :mod.in_features]
            return inp @ w.T + (wt[:, -1] if adapter.fold_bias else 0)
        k = mod.kernel_size
        if mode == "full":
            w = wt[:, :mod.in_channels * k[0] * k[1]].reshape(mod.weight.shape)
            b = wt[:, -1] if adapter.fold_bias else None
            return F.conv2d(F.pad(inp, conv_pad(mod)), w, b, mod.stride, 0, mod.dilation)
        aug = torch.cat([inp, torch.ones_like(inp[:, :1])], 1) if adapter.fold_bias else inp
        w = wt.reshape(wt.shape[0], wt.shape[1], *k)
        return F.conv2d(F.pad(aug, conv_pad(mod)), w, None, mod.stride, 0, mod.dilation)

    mod.forward = forward
    try:
        total = 0
        for n in range(x.shape[0]):
            loss = F.cross_entropy(model(x[n:n + 1]), labels[n:n + 1], reduction="sum")
            (G,) = torch.autograd.grad(loss, wt)
            G3 = G if G.dim() == 3 else G[:, :, None]
            total = total + torch.einsum("oa,oik,ib->abk", QS, G3, QA).square()
        return total
    finally:
        del mod.forward


@pytest.mark.parametrize("mode", ["patch", "full"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_ekfac_diagonal_equals_the_per_example_brute_force(mode, fisher):
    model = _net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 8, 8, dtype=DT, generator=g)
    y = torch.randint(0, 6, (7,), generator=g)
    idx = torch.arange(7)
    with torch.no_grad():
        labels = fisher_labels(model(x), y, idx, fisher, 3)
    layers = {}
    for name in ("0", "2", "5"):
        a = make_adapter(name, model.get_submodule(name), mode)
        layers[name] = {"QA": _orthogonal(a.d_in, g), "QS": _orthogonal(a.d_out, g)}
    batches = [(x[:4], y[:4], idx[:4]), (x[4:], y[4:], idx[4:])]
    got = ekfac_sums(model, batches, {"conv_mode": mode, "layers": layers}, fisher=fisher, seed=3)
    assert int(got["count"]) == 7
    for name, b in layers.items():
        want = _brute(model, name, mode, x, labels, b["QA"], b["QS"])
        torch.testing.assert_close(got[f"{name}::s_sum"], want, rtol=1e-10, atol=1e-16)


def test_rescored_scores_have_the_units_of_kfac():
    """With K-FAC's own eigenbasis the EKFAC second moments sum, over an axis, to what K-FAC's
    eigenvalue products sum to up to the Kronecker approximation; on a Linear layer seeing ONE
    example with one position the Fisher IS S (x) A, so the two score sets agree exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    x, y = torch.randn(1, 5, dtype=DT), torch.tensor([1])
    stats = raykfe.collect_factors(model, [(x, y)], layers=["0"])
    adapter = make_adapter("0", model[0], "patch")
    sc = {"0": score_in_basis("0", adapter.weight_matrix(), eigenbasis("0", stats["0"]))}
    sums = ekfac_sums(model, [(x, y)], {"conv_mode": "patch", "layers": {"0": {"QA": sc["0"].basis.QA, "QS": sc["0"].basis.QS}}})
    torch.testing.assert_close(rescored(sc, sums)["0"].entries, sc["0"].entries, rtol=1e-8, atol=1e-14)


def test_ekfac_prunes_end_to_end(tmp_path):
    torch.manual_seed(0)
    from raykfe.models import build_model

    model = build_model("vgg_tiny", 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    a = raykfe.prune(model, batches, target="flops:0.5", ekfac=True)
    b = raykfe.prune(model, batches, target="flops:0.5")
    x = batches[0][0][:1]
    assert 1 - raykfe.count(a.model, x).macs / raykfe.count(model, x).macs >= 0.5
    assert a.plan.settings["ekfac"] and any(
        (la.keep_in, la.keep_out) != (lb.keep_in, lb.keep_out) for la, lb in zip(a.plan.layers.values(), b.plan.layers.values())
    ), "EKFAC's scores changed no choice"
