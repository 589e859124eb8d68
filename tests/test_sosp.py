"""SOSP-H / SOSP-I against brute force in float64.

The reference builds the DENSE Jacobian of the logits w.r.t. ALL parameters flattened
(``torch.func.jacrev``), the dense Gauss-Newton matrix ``G = (1/N) sum_n J_n^T H_n J_n`` with
``H_n = diag(p_n) - p_n p_n^T`` and the dense mean gradient, and every ``theta_s`` as a masked
copy of the flat parameter vector.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from raykfe.errors import ConfigError
from raykfe.methods import sosp
from raykfe.methods.sosp import (
    MAX_SOSP_I_STRUCTURES,
    SospIStats,
    SospStats,
    sosp_h_scores,
    sosp_h_stats,
    sosp_i_scores,
    sosp_i_stats,
)

DT = torch.float64


# ------------------------------------------------------------------------------------ toy models


def _mlp(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], int, tuple]:
    """5 -> 8 -> 6 -> 4 tanh MLP with biases; hidden neurons are structures, one of them unowned."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    second = 8 + torch.arange(6)
    second[3] = -1  # a slice owned by no structure
    owner = {"0.weight": torch.arange(8), "0.bias": torch.arange(8), "2.weight": second, "2.bias": second.clone()}
    x = torch.randn(12, 5, dtype=DT)
    y = torch.randint(0, 4, (12,))
    return model, owner, 14, (x, y)


def _convnet(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], int, tuple]:
    """conv (no bias) -> BN (eval, random running stats and affine) -> relu -> pool -> linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    ).to(DT)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    c = torch.arange(4)
    # a filter with its BN scale and shift is one structure; two logit rows are structures too
    owner = {"0.weight": c, "1.weight": c.clone(), "1.bias": c.clone(), "5.weight": torch.tensor([4, -1, 5])}
    x = torch.randn(10, 2, 5, 5, dtype=DT)
    y = torch.randint(0, 3, (10,))
    return model, owner, 6, (x, y)


MODELS = {"mlp": _mlp, "conv": _convnet}


# ------------------------------------------------------------------------------- brute force


def _dense(model: nn.Module, owner: dict, n_structures: int, x: torch.Tensor, y: torch.Tensor):
    """(g [P], G [P, P], thetas [S, P]) from dense Jacobians."""
    was = model.training
    model.eval()
    named = list(model.named_parameters())
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b for n, b in model.named_buffers()}

    def logits_of(vec: torch.Tensor) -> torch.Tensor:
        parts = {n: c.view(s) for (n, _), c, s in zip(named, vec.split(sizes), shapes)}
        return functional_call(model, {**parts, **buffers}, (x,))

    J = jacrev(logits_of)(flat)  # [N, C, P]
    z = logits_of(flat).detach()
    p = torch.softmax(z, dim=1)
    N, C = z.shape
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    G = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / N
    r = p - F.one_hot(y, C).to(DT)
    g = torch.einsum("ncp,nc->p", J, r) / N
    # the dense gradient really is the gradient of the batch-mean cross-entropy
    flat_req = flat.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(F.cross_entropy(logits_of(flat_req), y), flat_req)
    torch.testing.assert_close(g, g_auto, rtol=1e-12, atol=1e-14)

    ids = torch.cat([
        owner[n].repeat_interleave(p.numel() // p.shape[0]) if n in owner else torch.full((p.numel(),), -1)
        for n, p in named
    ])  # [P]: the structure owning each flat entry
    thetas = torch.stack([flat * (ids == s).to(DT) for s in range(n_structures)])  # [S, P]
    model.train(was)
    return g, G, thetas


def _assert_rel(actual, expected, tol: float, what: str) -> None:
    actual = torch.as_tensor(actual, dtype=DT)
    expected = torch.as_tensor(expected, dtype=DT)
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs() / scale
    bad = (err > tol).nonzero()
    assert bad.numel() == 0, (
        f"{what}: max rel err {err.max().item():.3e} > {tol:g} at {bad[:5].tolist()}; "
        f"got {actual.flatten()[:6].tolist()} expected {expected.flatten()[:6].tolist()}"
    )


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_sosp_h_matches_dense(name):
    model, owner, S, (x, y) = MODELS[name]()
    g, G, thetas = _dense(model, owner, S, x, y)
    theta = thetas.sum(0)
    expected = (-(thetas @ g) + 0.5 * thetas @ (G @ theta)).abs()
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    stats = sosp_h_stats(model, batches, owner)
    assert stats.count == x.shape[0]
    assert set(stats.grad_sum) == set(owner) and all(t.dtype == DT for t in stats.gv_sum.values())
    _assert_rel(sosp_h_scores(model, owner, stats, S), expected, 1e-10, "SOSP-H scores")
    # the raw sums too: the gradient and G theta restricted to the owned parameters
    params = dict(model.named_parameters())
    offsets = np.cumsum([0] + [p.numel() for p in params.values()])
    for i, (n, p) in enumerate(params.items()):
        if n in owner:
            sl = slice(offsets[i], offsets[i + 1])
            _assert_rel(stats.grad_sum[n].reshape(-1) / stats.count, g[sl], 1e-10, f"grad {n}")
            _assert_rel(stats.gv_sum[n].reshape(-1) / stats.count, (G @ theta)[sl], 1e-10, f"G theta {n}")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode,chunk", [("forward", 1), ("forward", 4), ("forward", 32), ("reverse", 32)])
def test_sosp_i_matches_dense(name, mode, chunk):
    model, owner, S, (x, y) = MODELS[name]()
    g, G, thetas = _dense(model, owner, S, x, y)
    Q = thetas @ G @ thetas.T  # [S, S]
    gdot = thetas @ g
    stats = sosp_i_stats(model, [(x[:5], y[:5]), (x[5:], y[5:])], owner, S, chunk=chunk, mode=mode)
    assert stats.q_sum.shape == (S, S) and stats.count == x.shape[0]
    assert stats.v.shape[1] <= S  # the factor is compressed to at most S columns
    assert stats.share() == pytest.approx(1.0, abs=1e-12)  # every class kept
    _assert_rel(stats.q_sum / stats.count, Q, 1e-10, "Q")
    _assert_rel(stats.g_sum / stats.count, gdot, 1e-10, "g^T theta_s")
    off = Q.abs().sum(1) - Q.diagonal().abs()
    expected = (0.5 * Q.diagonal() - gdot).abs() + 0.5 * off
    _assert_rel(sosp_i_scores(stats), expected, 1e-10, "SOSP-I scores")
    for block in (1, 2, 5):  # Q in blocks: the same scores, whatever the block
        _assert_rel(sosp_i_scores(stats, block=block), expected, 1e-10, f"SOSP-I scores in blocks of {block}")
    # SOSP-H is SOSP-I's row sums: theta_s^T G theta = sum_s' Q_ss'
    h = sosp_h_scores(model, owner, sosp_h_stats(model, [(x, y)], owner), S)
    _assert_rel(h, (0.5 * Q.sum(1) - gdot).abs(), 1e-10, "SOSP-H vs SOSP-I row sums")


def test_sosp_i_micro_batches(monkeypatch):
    """A budget of one example per micro-batch gives the same sums as whole batches."""
    model, owner, S, (x, y) = _convnet()
    whole = sosp_i_stats(model, [(x, y)], owner, S)
    monkeypatch.setattr(sosp, "_U_BUDGET", 1)
    split = sosp_i_stats(model, [(x, y)], owner, S, chunk=3, mode="forward")
    _assert_rel(split.q_sum, whole.q_sum, 1e-12, "q_sum")
    _assert_rel(split.g_sum, whole.g_sum, 1e-12, "g_sum")


@pytest.mark.parametrize("name", list(MODELS))
def test_shards_merge_and_round_trip(name):
    model, owner, S, (x, y) = MODELS[name]()
    a, b = (x[:7], y[:7]), (x[7:], y[7:])

    full = sosp_h_stats(model, [(x, y)], owner)
    merged = sosp_h_stats(model, [a], owner).merge(sosp_h_stats(model, [b], owner))
    assert merged.count == full.count == x.shape[0]
    for n in owner:
        _assert_rel(merged.grad_sum[n], full.grad_sum[n], 1e-12, f"grad_sum {n}")
        _assert_rel(merged.gv_sum[n], full.gv_sum[n], 1e-12, f"gv_sum {n}")
    flat = merged.to_tensors()
    assert flat["count"].item() == x.shape[0] and all(isinstance(t, torch.Tensor) for t in flat.values())
    back = SospStats.from_tensors(flat)
    assert back.count == merged.count
    for n in owner:
        assert torch.equal(back.grad_sum[n], merged.grad_sum[n]) and torch.equal(back.gv_sum[n], merged.gv_sum[n])

    full_i = sosp_i_stats(model, [(x, y)], owner, S)
    merged_i = sosp_i_stats(model, [a], owner, S).merge(sosp_i_stats(model, [b], owner, S))
    assert merged_i.count == full_i.count
    _assert_rel(merged_i.q_sum, full_i.q_sum, 1e-12, "q_sum")
    _assert_rel(merged_i.g_sum, full_i.g_sum, 1e-12, "g_sum")
    back_i = SospIStats.from_tensors(merged_i.to_tensors())
    assert back_i.count == merged_i.count
    assert torch.equal(back_i.q_sum, merged_i.q_sum) and torch.equal(back_i.g_sum, merged_i.g_sum)
    # shards merge by concatenating the factor's columns: a gather, named so for the all-reduce
    ti, tj = sosp_i_stats(model, [a], owner, S).to_tensors(), sosp_i_stats(model, [b], owner, S).to_tensors()
    gathered = SospIStats.from_tensors({k: torch.cat([ti[k], tj[k]], 1) if k.startswith("cat::") else ti[k] + tj[k] for k in ti})
    _assert_rel(gathered.q_sum, full_i.q_sum, 1e-12, "gathered q_sum")
    # an all-reduce sums the flat tensors: summing two shards' tensors is a merge too
    ta, tb = sosp_h_stats(model, [a], owner).to_tensors(), sosp_h_stats(model, [b], owner).to_tensors()
    summed = SospStats.from_tensors({k: ta[k] + tb[k] for k in ta})
    assert summed.count == full.count
    for n in owner:
        _assert_rel(summed.gv_sum[n], full.gv_sum[n], 1e-12, f"all-reduced gv_sum {n}")


def test_model_state_untouched_and_idx_batches():
    model, owner, S, (x, y) = _convnet()
    model.train()
    model[0].weight.requires_grad_(False)
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.25)
            grads[n] = p.grad
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    idx = torch.arange(x.shape[0])

    h_plain = sosp_h_stats(model, [(x, y)], owner)
    h_idx = sosp_h_stats(model, [(x, y, idx)], owner)
    i_plain = sosp_i_stats(model, [(x, y)], owner, S)
    i_idx = sosp_i_stats(model, [(x[:6], y[:6], idx[:6]), (x[6:], y[6:], idx[6:])], owner, S)

    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        if n in grads:
            assert p.grad is grads[n] and torch.all(p.grad == 0.25)
        else:
            assert p.grad is None
    for n, b in model.named_buffers():  # BatchNorm running statistics were used, not updated
        assert torch.equal(b, buffers[n]), n
    for n in owner:
        assert torch.equal(h_plain.gv_sum[n], h_idx.gv_sum[n]) and torch.equal(h_plain.grad_sum[n], h_idx.grad_sum[n])
    _assert_rel(i_idx.q_sum, i_plain.q_sum, 1e-12, "q_sum with idx batches")
    # a frozen parameter is still a structure's parameter: its curvature is not skipped
    assert h_plain.gv_sum["0.weight"].abs().sum() > 0


def _smooth_mlp() -> tuple[nn.Module, dict, int, torch.Tensor, torch.Tensor]:
    """5 -> 24 -> 16 -> 4 tanh MLP fitted (with weight decay) to noisy teacher labels."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT)
    x = 0.3 * torch.randn(64, 5, dtype=DT)
    with torch.no_grad():
        y = teacher(x / 0.3).argmax(1)
    flip = torch.rand(64) < 0.2
    y[flip] = torch.randint(0, 4, (int(flip.sum()),))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 4)).to(DT)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    owner = {
        "0.weight": torch.arange(24), "0.bias": torch.arange(24),
        "2.weight": 24 + torch.arange(16), "2.bias": 24 + torch.arange(16),
        "4.weight": 40 + torch.arange(4), "4.bias": 40 + torch.arange(4),  # the logit units
    }
    return model, owner, 44, x, y


def _loss_scaled(model: nn.Module, owner: dict, M: torch.Tensor, t: float, x, y) -> float:
    """Batch-mean CE with the slices of the structures in M multiplied by (1 - t)."""
    params = {}
    for n, p in model.named_parameters():
        p = p.detach()
        if n in owner:
            hit = torch.isin(owner[n], M).to(DT).reshape(-1, *([1] * (p.dim() - 1)))
            p = p * (1 - t * hit)
        params[n] = p
    with torch.no_grad():
        return F.cross_entropy(functional_call(model, params, (x,)), y).item()


@pytest.mark.slow
def test_predicted_vs_actual_loss_change():
    """Zeroing random small sets M of hidden neurons: the quadratic prediction
    ``-sum gdot_s + 1/2 sum Q_ss'`` against the actual change of the batch-mean loss.

    Not exact, for two reasons: (1) removing a whole structure is a finite step, so the Taylor
    series' third and higher terms remain; (2) G drops the Hessian's residual term
    ``(1/N) sum_n r_n^T d^2 z_n``, which is nonzero along hidden structures (with ReLU too:
    a ReLU net is piecewise linear in the input but not in its weights -- products across layers
    -- and its kinks make the loss along the removal path non-smooth). The toy keeps both small:
    tanh with small pre-activations is almost linear (tanh''(0) = 0, unlike GELU), the layers are
    wide enough that one neuron moves the logits a little, and the model is fitted (with weight
    decay and noisy labels, so the loss stays away from zero and H does not vanish). Measured
    here: aggregate relative error 0.14 for the quadratic vs 0.33 for the first-order term alone,
    Spearman 0.997 (median |dL| 0.01 at L = 0.45).
    """
    model, owner, S, x, y = _smooth_mlp()
    stats = sosp_i_stats(model, [(x, y)], owner, S, chunk=16)
    Q = stats.q_sum / stats.count
    gdot = stats.g_sum / stats.count
    L0 = _loss_scaled(model, owner, torch.tensor([], dtype=torch.long), 0.0, x, y)

    gen = torch.Generator().manual_seed(3)
    actual, second, first = [], [], []
    for t in range(30):
        M = torch.randperm(40, generator=gen)[: 1 + t % 3]  # hidden neurons only
        actual.append(_loss_scaled(model, owner, M, 1.0, x, y) - L0)
        first.append(-gdot[M].sum().item())
        second.append(first[-1] + 0.5 * Q[M][:, M].sum().item())
    actual, second, first = map(np.array, (actual, second, first))
    err2 = np.abs(second - actual).sum() / np.abs(actual).sum()
    err1 = np.abs(first - actual).sum() / np.abs(actual).sum()
    assert err2 < 0.25, f"quadratic prediction off by {err2:.3f} (aggregate relative)"
    assert err2 < 0.6 * err1, f"the second-order term does not help: {err2:.3f} vs first-order {err1:.3f}"
    rank = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(rank(second), rank(actual))[0, 1] > 0.9


def test_logit_structures_second_order_is_exact():
    """Along the output layer's rows the logits are linear in the weights, so there G IS the
    Hessian and the expansion is exact to second order: (L(w - eps theta_M) - L + eps gdot) / eps^2
    -> 1/2 sum Q_ss' with an O(eps) error."""
    model, owner, S, x, y = _smooth_mlp()
    stats = sosp_i_stats(model, [(x, y)], owner, S)
    Q = stats.q_sum / stats.count
    gdot = stats.g_sum / stats.count
    L0 = _loss_scaled(model, owner, torch.tensor([], dtype=torch.long), 0.0, x, y)
    eps = 1e-4
    for M in ([40], [41, 43], [40, 41, 42]):
        M = torch.tensor(M)
        curv = (_loss_scaled(model, owner, M, eps, x, y) - L0 + eps * gdot[M].sum().item()) / eps**2
        expected = 0.5 * Q[M][:, M].sum().item()
        assert abs(curv - expected) <= 1e-3 * abs(expected), (M.tolist(), curv, expected)


def test_errors():
    model, owner, S, (x, y) = _mlp()
    with pytest.raises(ConfigError, match="sosp-h"):  # forward mode: S JVPs per example, bounded
        sosp_i_stats(model, [(x, y)], owner, MAX_SOSP_I_STRUCTURES + 1, mode="forward")
    with pytest.raises(ConfigError, match="classes"):
        sosp_i_stats(model, [(x, y)], owner, S, classes=0)
    with pytest.raises(ConfigError, match="n_structures"):
        sosp_i_stats(model, [(x, y)], owner, 5)  # ids up to 13
    with pytest.raises(ConfigError, match="does not have"):
        sosp_h_stats(model, [(x, y)], {"nope.weight": torch.arange(3)})
    with pytest.raises(ConfigError, match="length"):
        sosp_h_stats(model, [(x, y)], {"0.weight": torch.arange(3)})
    with pytest.raises(ConfigError, match="empty"):
        sosp_h_stats(model, [], owner)
    stats = sosp_h_stats(model, [(x, y)], owner)
    with pytest.raises(ConfigError, match="lack"):
        sosp_h_scores(model, {**owner, "4.weight": torch.zeros(4, dtype=torch.long)}, stats, S)
