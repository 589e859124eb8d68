"""Deploy-time BatchNorm folding (:mod:`raykfe.fold`): exact in eval mode (float64), only where a
BatchNorm directly follows a conv that nothing else reads, never touching the input model."""

from __future__ import annotations

import torch
from torch import nn

import raykfe
from raykfe.fold import fold_batchnorms
from raykfe.models import build_model

DT = torch.float64


def _stale_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=DT) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
                    m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=DT))
    return model.eval()


class _Shapes(nn.Module):
    """Convs with stride, padding, dilation, groups and a bias before BatchNorms; one conv is read
    twice (its BatchNorm must stay) and one BatchNorm follows a pooling (stays)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4, bias=False)
        self.bn_b = nn.BatchNorm2d(8, affine=False)
        self.c = nn.Conv2d(8, 8, 1, bias=False)
        self.bn_c = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.bn_p = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        y = self.c(x)
        x = self.bn_c(y) + y  # the conv's output is read twice: no fold
        return self.bn_p(self.pool(x))


def test_folding_is_exact_and_only_where_a_batchnorm_follows_a_conv_alone():
    torch.manual_seed(0)
    model = _stale_stats(_Shapes().to(DT))
    x = torch.randn(4, 3, 17, 15, dtype=DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, n, reason = fold_batchnorms(model)
    assert (n, reason) == (2, "")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    kept = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(kept) == ["bn_c", "bn_p"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the input is untouched


def test_pruned_models_fold_exactly_and_lose_their_batchnorms():
    """A residual net pruned with EigenDamage (its last layer per block is a rotation or a folded
    core, then BatchNorm) and a channel-pruned one: every BatchNorm folds, outputs unchanged."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    for method in ("eigendamage", "l1"):
        torch.manual_seed(0)
        base = _stale_stats(build_model("resnet8", 10))
        model = raykfe.prune(base, batches, method=method, target="flops:0.5").model.to(DT).eval()
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        folded, n, _ = fold_batchnorms(model)
        assert n == bns > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()), method
        x = torch.randn(3, 3, 16, 16, dtype=DT)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)


def test_an_untraceable_model_is_returned_as_it_is():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return self.bn(self.conv(x))

    model = Branchy().eval()
    folded, n, reason = fold_batchnorms(model)
    assert n == 0 and "cannot trace" in reason and isinstance(folded.bn, nn.BatchNorm2d)
