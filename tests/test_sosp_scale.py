"""SOSP-I at scale: the reverse-mode factor on real architectures, Q's row sums in blocks, sampled
block pairs, and the softmax directions kept per example.

References: forward mode (one JVP per structure, the formula as written) on real torchvision and
raykfe architectures in float64, and dense ``|V V^T|`` row sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import raykfe
from raykfe.attention import convert_attention
from raykfe.channels import ChannelGraph
from raykfe.errors import ConfigError
from raykfe.methods.gram import block_pairs, gram_abs_rows
from raykfe.methods.sosp import SospIStats, sosp_i_cost, sosp_i_rows, sosp_i_stats, structure_owner
from raykfe.models import build_model

DT = torch.float64


def _vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5)
    convert_attention(m)
    nn.init.normal_(m.heads.head.weight)  # torchvision zero-initialises the head: every curvature would be 0
    return m


def _convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5, layer_scale=0.5)


def _swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2], num_classes=5)
    convert_attention(m)
    return m


ARCHS = {
    "resnet32": (lambda: build_model("resnet32", 5, width=0.25), 8),
    "mobilenet_small": (lambda: build_model("mobilenet_small", 5, width=0.25), 8),
    "vit": (_vit, 16),
    "convnext": (_convnext, 16),  # layer scale, LayerNorm2d and channels-last LayerNorm / Linear
    "swin": (_swin, 16),  # window attention, patch merging
}


def _setup(name: str):
    build, size = ARCHS[name]
    model = build().to(DT).eval()
    with torch.no_grad():  # BatchNorm running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    owner, _, S = structure_owner(model, ChannelGraph(model, torch.randn(1, 3, size, size, dtype=DT)))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, size, size, dtype=DT, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    return model, owner, S, x, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", list(ARCHS))
def test_reverse_mode_equals_forward_mode_on_real_architectures(name):
    """One backward pass per softmax direction gives the same Q and g as one JVP per structure."""
    model, owner, S, x, y = _setup(name)
    rev = sosp_i_stats(model, [(x[:3], y[:3]), (x[3:], y[3:])], owner, S, mode="reverse")
    fwd = sosp_i_stats(model, [(x, y)], owner, S, mode="forward")
    assert fwd.q_sum.abs().max() > 0 and fwd.g_sum.abs().max() > 0
    assert _rel(rev.q_sum, fwd.q_sum) < 1e-10, name
    assert _rel(rev.g_sum, fwd.g_sum) < 1e-10, name
    assert rev.count == fwd.count == 6


def _brute_u(model: nn.Module, owner: dict, S: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U [N, C, S]`` (``J_n theta_s`` from the dense Jacobian) and the softmax ``p [N, C]``."""
    named = list(model.named_parameters())
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]
    buffers = dict(model.named_buffers())

    def logits_of(vec):
        return functional_call(model, {**{n: c.view(s) for (n, _), c, s in zip(named, vec.split(sizes), shapes)}, **buffers}, (x,))

    J = jacrev(logits_of)(flat)  # [N, C, P]
    ids = torch.cat([owner[n].repeat_interleave(p.numel() // p.shape[0]) if n in owner else torch.full((p.numel(),), -1)
                     for n, p in named])
    thetas = torch.stack([flat * (ids == s).to(DT) for s in range(S)], dim=1)  # [P, S]
    return J @ thetas, torch.softmax(logits_of(flat).detach(), dim=1)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_kept_softmax_directions(k):
    """``classes=k`` keeps each example's k most probable classes' directions ``sqrt(p_c)(e_c - p)``
    of ``H = diag(p) - p p^T``: Q equals the brute force over those directions, all k = C is exact,
    and the reported share is their part of trace(H)."""
    model, owner, S, x, y = _setup("mobilenet_small")
    U, p = _brute_u(model, owner, S, x)
    top = p.topk(k, dim=1).indices
    Q = torch.zeros(S, S, dtype=DT)
    kept = 0.0
    for n in range(x.shape[0]):
        for c in top[n].tolist():
            a = p[n, c].sqrt() * (torch.eye(5, dtype=DT)[c] - p[n])
            v = a @ U[n]  # [S]
            Q += torch.outer(v, v)
            kept += (a @ a).item()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    total = H.diagonal(dim1=1, dim2=2).sum().item()
    stats = sosp_i_stats(model, [(x, y)], owner, S, classes=k)
    assert _rel(stats.q_sum, Q) < 1e-10
    assert stats.share() == pytest.approx(kept / total, rel=1e-10)
    assert (stats.share() < 1) == (k < 5)
    if k == 5:
        assert _rel(stats.q_sum, torch.einsum("nas,nab,nbt->st", U, H, U)) < 1e-10


def _random_factor(S: int = 37, D: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, D, dtype=DT, generator=g) * torch.rand(S, 1, dtype=DT, generator=g)


@pytest.mark.parametrize("block", [1, 4, 10, 37, 100])
def test_block_row_sums_equal_dense(block):
    v = _random_factor()
    Q = v @ v.T
    rows = gram_abs_rows(v, block=block, workers=1)
    assert rows.exact and rows.blocks == -(-37 // block) and rows.relative_error() == 0.0
    np.testing.assert_allclose(rows.rows, Q.abs().sum(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(rows.diag, Q.diagonal().numpy(), rtol=1e-12)
    assert np.all(rows.stderr == 0)


def test_sampled_pairs_are_unbiased_and_their_error_is_calibrated():
    """Poisson-sampled off-diagonal block pairs: the mean of the estimate over many draws is the
    exact row sum (within 4 standard errors of that mean), and the reported standard error matches
    the spread of the estimates across draws."""
    v = _random_factor(S=60, D=5, seed=3)
    exact = (v @ v.T).abs().sum(1).numpy()
    draws, errs = [], []
    for seed in range(400):
        rows = gram_abs_rows(v, block=6, max_pairs=25, seed=seed, workers=1)  # 10 diagonal + ~15 of 45 others
        assert not rows.exact and rows.total_pairs == 55
        draws.append(rows.rows)
        errs.append(rows.stderr)
    draws = np.array(draws)
    mean, spread = draws.mean(0), draws.std(0)
    assert np.all(np.abs(mean - exact) <= 4 * spread / np.sqrt(len(draws)) + 1e-12)
    ratio = np.mean(errs, axis=0) / spread
    assert 0.7 < np.median(ratio) < 1.3, np.median(ratio)
    # the diagonal Q_ss is never sampled
    np.testing.assert_allclose(rows.diag, (v * v).sum(1).numpy(), rtol=1e-12)


def test_block_pair_budget_errors_and_counts():
    pairs, B, total = block_pairs(100, 10)
    assert B == 10 and total == 55 and len(pairs) == 55 and all(p == 1.0 for *_, p in pairs)
    pairs, _, _ = block_pairs(100, 10, max_pairs=10)  # the diagonal only
    assert sorted((i, j) for i, j, _ in pairs) == [(i, i) for i in range(10)]
    with pytest.raises(ConfigError, match="sosp.max_pairs=9 is below the 10 diagonal blocks"):
        block_pairs(100, 10, max_pairs=9)
    with pytest.raises(ConfigError, match="sosp.block"):
        block_pairs(100, 0)
    line = sosp_i_cost(11456, 10, 1000, 2048, None)
    assert "11456 structures" in line and "11 backward" in line and "6 blocks" in line and "every pair" in line


def test_prune_with_sosp_i_in_blocks_and_sampled():
    """The API with a small block and a pair budget: the same target met; exact blocks give the
    exact plan."""
    torch.manual_seed(0)
    model = build_model("resnet8", 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    whole = raykfe.prune(model, batches, method="sosp-i", target="flops:0.5")
    blocked = raykfe.prune(model, batches, method="sosp-i", target="flops:0.5", sosp_block=16)
    sampled = raykfe.prune(model, batches, method="sosp-i", target="flops:0.5", sosp_block=16, sosp_max_pairs=40)
    assert blocked.plan.removed == whole.plan.removed
    assert sampled.plan.summary.achieved >= 0.5 and whole.plan.summary.achieved >= 0.5


@pytest.mark.ray
def test_block_pairs_as_ray_tasks_equal_in_process(ray_cluster):
    v = _random_factor(S=50, D=7)
    here = gram_abs_rows(v, block=8, workers=1)
    there = gram_abs_rows(v, block=8, workers=2)
    np.testing.assert_allclose(there.rows, here.rows, rtol=1e-12)
    sampled_here = gram_abs_rows(v, block=8, max_pairs=12, seed=4, workers=1)
    sampled_there = gram_abs_rows(v, block=8, max_pairs=12, seed=4, workers=2)
    np.testing.assert_allclose(sampled_there.rows, sampled_here.rows, rtol=1e-12)
    np.testing.assert_allclose(sampled_there.stderr, sampled_here.stderr, rtol=1e-12)


def test_statistics_round_trip_and_scores_from_blocks():
    model, owner, S, x, y = _setup("convnext")
    stats = sosp_i_stats(model, [(x, y)], owner, S, classes=3)
    back = SospIStats.from_tensors(stats.to_tensors())
    assert back.count == stats.count and back.share() == pytest.approx(stats.share())
    a, _ = sosp_i_rows(stats)
    b, rows = sosp_i_rows(back, block=7)
    np.testing.assert_allclose(b, a, rtol=1e-10)
    assert rows.blocks == -(-S // 7)


def test_job_config_sosp_section():
    from raykfe.config import load_config
    from raykfe.settings import PruneSettings

    cfg = load_config(None, ["prune.method=sosp-i", "sosp.classes=3", "sosp.block=64", "sosp.max_pairs=10"])
    s = PruneSettings.from_job(cfg)
    assert (s.sosp_classes, s.sosp_block, s.sosp_max_pairs) == (3, 64, 10)
    assert PruneSettings.from_job(load_config(None, [])).sosp_classes is None  # every class: exact
    for bad, key in (("sosp.classes=0", "sosp.classes"), ("sosp.block=0", "sosp.block"), ("sosp.max_pairs=0", "sosp.max_pairs")):
        with pytest.raises(ConfigError, match=key) as err:
            load_config(None, [bad])
        assert "\n" not in str(err.value)
