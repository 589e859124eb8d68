"""K-FAC factors of Linear layers applied to sequences ``[N, *, d_in]`` (tokens play the role of conv
positions, T = prod(*)) against a per-example brute force in float64 (ALGORITHMS.md sections 0-1):

    A = (1/N) sum_n (1/T) sum_t a~_nt a~_nt^T      (a~ = [a; 1] when the layer has a bias)
    S = (1/N) sum_n       sum_t g_nt  g_nt^T       (g_nt = d(-log p(y_n|x_n)) / d s_nt, ONE example's loss)

The brute force runs one forward and one ``torch.autograd.grad`` per example on the model's own
submodules, with no hook of raykfe's. Labels: the data's for ``fisher="empirical"``; for
``fisher="true"`` the draw of :func:`raykfe.capture.sample_labels` for the example's global index
(raykfe's public per-index sampler: reproducing the draw is what makes the comparison exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raykfe.capture import collect_factors, sample_labels
from raykfe.factors import INDEX_RANGES

DT = torch.float64
N, F_IN, H, F2, C, VOCAB = 6, 4, 7, 5, 3, 11
NAMES = ("fc1", "fc2", "head")
SPLIT = 4  # two batches of 4 and 2 examples (uneven: a per-batch normalisation would show)
TOL = 1e-10

# input variants: token sequences [N, 5, F], a 2-D grid of tokens [N, 2, 3, F] (T = 6), and integer
# token ids [N, 5] through an Embedding (the input cannot carry grad: raykfe's other code path)
VARIANTS = {"tokens": ((5,), False), "grid": ((2, 3), False), "ids": ((5,), True)}


class TokenNet(nn.Module):
    """x [N, *, F] -> fc1 -> GELU -> fc2 (no bias) -> tanh -> mean over tokens -> head [N, C]."""

    def __init__(self, embed: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, F_IN) if embed else None
        self.fc1 = nn.Linear(F_IN, H)
        self.fc2 = nn.Linear(H, F2, bias=False)
        self.head = nn.Linear(F2, C)

    def trace(self, x: torch.Tensor):
        """Logits and ``{layer: (input, output)}`` (the brute force differentiates the outputs)."""
        h0 = self.embed(x) if self.embed is not None else x
        s1 = self.fc1(h0)
        s2 = self.fc2(F.gelu(s1))
        pooled = torch.tanh(s2).flatten(1, -2).mean(dim=1)  # mean over every token dim
        s3 = self.head(pooled)
        return s3, {"fc1": (h0, s1), "fc2": (F.gelu(s1), s2), "head": (pooled, s3)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trace(x)[0]


def setup(variant: str, seed: int = 0):
    lead, embed = VARIANTS[variant]
    torch.manual_seed(seed)
    model = TokenNet(embed).to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    if embed:
        x = torch.randint(0, VOCAB, (N, *lead), generator=g)
    else:
        x = torch.randn(N, *lead, F_IN, dtype=DT, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return model, x, y, lead


def brute_force(model: TokenNet, x, y, idx, fisher: str, seed: int = 0):
    """``{layer: (A, S, T)}`` by a loop over examples, and the labels used."""
    layers = {n: getattr(model, n) for n in NAMES}
    d_in = {n: m.in_features + (m.bias is not None) for n, m in layers.items()}
    A = {n: torch.zeros(d_in[n], d_in[n], dtype=DT) for n in NAMES}
    S = {n: torch.zeros(m.out_features, m.out_features, dtype=DT) for n, m in layers.items()}
    T, labels = {}, []
    for i in range(len(x)):
        logits, inter = model.trace(x[i : i + 1])
        if fisher == "true":
            label = int(sample_labels(logits.detach(), idx[i : i + 1], seed)[0])
        else:
            label = int(y[i])
        labels.append(label)
        loss = -torch.log_softmax(logits[0], dim=0)[label]  # this example's -log p(y|x), no batch mean
        grads = torch.autograd.grad(loss, [inter[n][1] for n in NAMES])
        for n, g in zip(NAMES, grads):
            a = inter[n][0].detach().reshape(-1, layers[n].in_features)  # [T, d_in]
            if layers[n].bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)
            t = a.shape[0]
            assert T.setdefault(n, t) == t
            A[n] += sum(torch.outer(a[k], a[k]) for k in range(t)) / t
            g = g.reshape(-1, layers[n].out_features)  # [T, d_out]
            assert g.shape[0] == t
            S[n] += sum(torch.outer(g[k], g[k]) for k in range(t))
    return {n: (A[n] / len(x), S[n] / len(x), T[n]) for n in NAMES}, torch.tensor(labels)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_against(stats, want, what: str) -> None:
    assert set(stats) == set(NAMES), what
    for n in NAMES:
        A, S, _ = want[n]
        st = stats[n]
        assert st.A.dtype == DT and st.S.dtype == DT
        assert st.A.shape == A.shape and st.S.shape == S.shape, f"{what} {n}: shapes"
        for key, got, ref in (("A", st.A, A), ("S", st.S, S)):
            err = rel(got, ref)
            ratio = float((got * ref).sum() / (ref * ref).sum())  # the scale, when the error is one
            assert err <= TOL, f"{what} {n}.{key}: relative error {err:.3g} (got ~ {ratio:.6g} x brute force)"


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_factors_match_per_example_brute_force(variant, fisher):
    model, x, y, lead = setup(variant)
    T = 1
    for d in lead:
        T *= d
    idx = torch.arange(N)
    want, labels = brute_force(model, x, y, idx, fisher)
    if fisher == "true":  # the draw is really the model's, not the data's
        assert not torch.equal(labels, y)

    one = collect_factors(model, [(x, y)], fisher=fisher)
    two = collect_factors(model, [(x[:SPLIT], y[:SPLIT]), (x[SPLIT:], y[SPLIT:])], fisher=fisher)
    check_against(one, want, "one batch")
    check_against(two, want, "two batches")
    for n in NAMES:  # batching changes nothing (sums and counts add up)
        assert rel(two[n].A_sum, one[n].A_sum) <= 1e-12 and rel(two[n].S_sum, one[n].S_sum) <= 1e-12

    # what the stats record: N examples, T tokens for the layers that see the sequence, 1 for the head
    expect_t = {"fc1": T, "fc2": T, "head": 1}
    for n, st in one.items():
        assert want[n][2] == expect_t[n]
        assert st.count == two[n].count == N
        assert st.meta["positions"] == expect_t[n], n
        assert st.meta["kind"] == "linear"
        assert st.meta["fold_bias"] == st.meta["has_bias"] == (n != "fc2")
        assert st.meta["d_in"] == want[n][0].shape[0] and st.meta["d_out"] == want[n][1].shape[0]
    assert one["fc1"].meta["in_shape"] == [*lead, F_IN] and one["fc1"].meta["out_shape"] == [*lead, H]
    assert one["fc2"].meta["in_shape"] == [*lead, H] and one["fc2"].meta["out_shape"] == [*lead, F2]
    assert one["head"].meta["in_shape"] == [F2] and one["head"].meta["out_shape"] == [C]
    if fisher == "true":  # implicit indices: the range of the label draws is recorded
        assert one["fc1"].meta[INDEX_RANGES] == [[0, N]]
    else:
        assert INDEX_RANGES not in one["fc1"].meta

    # the model is handed back as it was: eval mode, parameters requiring grad, no grads left
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_true_fisher_global_indices_and_label_independence():
    """True Fisher with explicit global indices (shuffled, offset) and with ``first_index``: the
    draw follows the index, A does not depend on the labels at all, S is symmetric PSD."""
    model, x, y, _ = setup("tokens", seed=3)
    idx = 40 + torch.randperm(N, generator=torch.Generator().manual_seed(7))
    want, _ = brute_force(model, x, y, idx, "true", seed=5)
    got = collect_factors(model, [(x[:SPLIT], y[:SPLIT], idx[:SPLIT]), (x[SPLIT:], y[SPLIT:], idx[SPLIT:])],
                          fisher="true", seed=5)
    check_against(got, want, "explicit idx")
    assert INDEX_RANGES not in got["fc1"].meta

    ranged, _ = brute_force(model, x, y, 40 + torch.arange(N), "true", seed=5)
    first = collect_factors(model, [(x[:SPLIT], y[:SPLIT]), (x[SPLIT:], y[SPLIT:])], fisher="true", seed=5,
                            first_index=40)
    check_against(first, ranged, "first_index=40")
    assert first["fc1"].meta[INDEX_RANGES] == [[40, 40 + N]]

    emp = collect_factors(model, [(x, y)], fisher="empirical")
    other_seed = collect_factors(model, [(x, y)], fisher="true", seed=6)
    for n in NAMES:
        for st in (got[n], first[n], other_seed[n]):
            assert rel(st.A, emp[n].A) <= 1e-12  # inputs only: no label in A
            assert rel(st.S, st.S.T) <= 1e-14
            assert float(torch.linalg.eigvalsh(st.S).min()) >= -1e-12 * float(st.S.abs().max())


def test_replicated_tokens_scale():
    """T identical copies of each example's token: A is the one-token A (the 1/T), and every
    per-token gradient of fc1/fc2 is 1/T of the one-token gradient (mean pooling), so their S is
    T * (1/T)^2 = 1/T of the one-token S; the head (after pooling) does not change."""
    model, x, y, _ = setup("tokens", seed=2)
    x1 = x[:, :1]  # [N, 1, F]
    t = 4
    xt = x1.expand(N, t, F_IN).contiguous()
    s1 = collect_factors(model, [(x1, y)], fisher="empirical")
    st = collect_factors(model, [(xt, y)], fisher="empirical")
    for n in NAMES:
        assert rel(st[n].A, s1[n].A) <= 1e-12, n
        scale = 1.0 / t if n != "head" else 1.0
        assert rel(st[n].S, scale * s1[n].S) <= 1e-12, n
