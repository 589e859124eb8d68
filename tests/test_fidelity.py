"""Fidelity checks of ALGORITHMS.md section 9, in float64, against brute-force computations.

1. toy MLP: hook-built A and S == per-example brute force; one example: F_layer == S (x) A exactly;
   the true Fisher (labels sampled) against the exact label-enumerated expectation;
2. conv: unfolded patches x W~ reproduce F.conv2d; full- and patch-mode factors == explicit loops;
3. KFE identities: vec(W') = (Q_S (x) Q_A)^T vec(W~), sum dL == 1/2 vec(W~)^T (S (x) A) vec(W~);
4. rebuilding with nothing pruned reproduces the outputs; pruning zero-eigenvalue directions too;
5. predicted vs actual loss increase on a converged model (Spearman), EigenDamage vs random/magnitude;
6. sharded statistics merged == single-process statistics.

Conventions (raykfe.layers): ``W~ = [W | b]`` ``[d_out, d_in+1]``, vec is ROW-major (``W~.flatten()``),
so the per-example gradient of vec(W~) is ``kron(Ds, a~)`` and its outer product ``kron(S, A)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import raykfe
from raykfe.eigen import eigenbasis
from raykfe.factors import LayerStats
from raykfe.layers import make_adapter
from raykfe.methods.eigendamage import entry_scores, kfe_weight, unit_scores
from raykfe.plan import LayerPlan, Plan, dense_cost, kfe_cost
from raykfe.capture import prunable_layers
from raykfe.methods.eigendamage import layer_scores
from raykfe.surgery import apply_plan

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def assert_close(actual, expected, *, atol=1e-12, rtol=0.0, what="") -> None:
    """Elementwise |a - e| <= atol + rtol |e|; on failure list the worst mismatching entries."""
    a = torch.as_tensor(actual, dtype=DT)
    e = torch.as_tensor(expected, dtype=DT)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        idx = bad.nonzero()
        order = torch.argsort(err[bad], descending=True)[:12]
        lines = [
            f"  {tuple(int(i) for i in idx[k])}: got {a[tuple(idx[k])].item():.17g} "
            f"expected {e[tuple(idx[k])].item():.17g} (|diff| {err[tuple(idx[k])].item():.3g})"
            for k in order
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} entries differ (atol={atol:g}, rtol={rtol:g}), "
            f"max |diff| {err.max().item():.3g}; worst:\n" + "\n".join(lines)
        )


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_one(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


@torch.no_grad()
def make_confident(model: nn.Module, head: nn.Linear, x: torch.Tensor, margin: float = 60.0) -> None:
    """Scale the logits so that the smallest top-1/top-2 gap is ``margin`` nats: softmax gives
    p(argmax) == 1.0 exactly in float64 while some other probabilities stay > 0 (so S != 0)."""
    top2 = model(x).topk(2, dim=1).values
    c = margin / (top2[:, 0] - top2[:, 1]).min().item()
    head.weight.mul_(c)
    if head.bias is not None:
        head.bias.mul_(c)
    probs = torch.softmax(model(x), dim=1)
    assert (probs.max(dim=1).values == 1.0).all() and (probs < 1.0).sum() > 0


def mlp(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).to(DT).eval()


# ------------------------------------------------------------------------------------------------
# 1. toy MLP
# ------------------------------------------------------------------------------------------------


def mlp_per_example(model: nn.Sequential, x: torch.Tensor, y: int):
    """Explicit forward for ONE example -> (a~ of both layers, Ds of both layers, loss)."""
    l1, l2 = model[0], model[2]
    s1 = (x @ l1.weight.T + l1.bias).requires_grad_(True)
    h = torch.tanh(s1)
    s2 = h @ l2.weight.T + l2.bias
    loss = -torch.log_softmax(s2, dim=0)[y]
    d1, d2 = torch.autograd.grad(loss, [s1, s2])
    return (with_one(x), with_one(h.detach())), (d1, d2), loss


def mlp_data(n: int = 7, seed: int = 1):
    g = gen(seed)
    return torch.randn(n, 5, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_mlp_factors_equal_per_example_brute_force() -> None:
    model = mlp()
    x, y = mlp_data()
    A = [torch.zeros(6, 6, dtype=DT), torch.zeros(5, 5, dtype=DT)]
    S = [torch.zeros(4, 4, dtype=DT), torch.zeros(3, 3, dtype=DT)]
    for n in range(len(x)):
        a, d, _ = mlp_per_example(model, x[n], int(y[n]))
        for k in range(2):
            A[k] += torch.outer(a[k], a[k]) / len(x)
            S[k] += torch.outer(d[k], d[k]) / len(x)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # two uneven batches
    stats = raykfe.collect_factors(model, batches, fisher="empirical")
    assert list(stats) == ["0", "2"]
    for k, name in enumerate(["0", "2"]):
        assert stats[name].count == len(x)
        assert_close(stats[name].A, A[k], what=f"A of layer {name}")
        assert_close(stats[name].S, S[k], what=f"S of layer {name}")
        assert_close(stats[name].A_sum, A[k] * len(x), atol=1e-11, what=f"A_sum of layer {name}")


def _vec_grad(model: nn.Sequential, x: torch.Tensor, y: int, layer: int) -> torch.Tensor:
    """Per-example gradient of -log p(y|x) w.r.t. vec([W | b]) of model[layer] (row-major)."""
    model.zero_grad()
    loss = F.cross_entropy(model(x[None]), torch.tensor([y]), reduction="sum")
    m = model[layer]
    gw, gb = torch.autograd.grad(loss, [m.weight, m.bias])
    return torch.cat([gw, gb[:, None]], dim=1).flatten()


@pytest.mark.parametrize("layer", [0, 2])
def test_one_example_fisher_block_is_kronecker(layer: int) -> None:
    model = mlp(seed=3)
    x, _ = mlp_data(n=1, seed=4)
    name = str(layer)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)[0]
    F_true = 0.0
    S_true = 0.0
    for c in range(3):  # one label: the per-example Fisher block is exactly S (x) A
        g = _vec_grad(model, x[0], c, layer)
        st = raykfe.collect_factors(model, [(x, torch.tensor([c]))], fisher="empirical")[name]
        assert_close(torch.outer(g, g), torch.kron(st.S, st.A), what=f"label {c}: g g^T vs S (x) A")
        F_true = F_true + p[c] * torch.outer(g, g)
        S_true = S_true + p[c] * st.S
        A = st.A
    # true Fisher of one example, labels enumerated: a~ does not depend on y, so it is still exact
    assert_close(F_true, torch.kron(S_true, A), what="label-enumerated Fisher vs S_true (x) A")
    if layer == 2:  # logits layer: E_y[(p - e_y)(p - e_y)^T] = diag(p) - p p^T
        assert_close(S_true, torch.diag(p) - torch.outer(p, p), what="S of the logits layer")


def _exact_true_S(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """E_n sum_y p(y|x_n) Ds Ds^T for both layers, by enumerating the labels."""
    S = [torch.zeros(4, 4, dtype=DT), torch.zeros(3, 3, dtype=DT)]
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    for n in range(len(x)):
        for c in range(3):
            _, d, _ = mlp_per_example(model, x[n], c)
            for k in range(2):
                S[k] += probs[n, c] * torch.outer(d[k], d[k]) / len(x)
    return S


def test_true_fisher_sampling() -> None:
    model = mlp(seed=5)
    x, y = mlp_data(n=6, seed=6)
    batches = [(x, y)]
    s0 = raykfe.collect_factors(model, batches, fisher="true", seed=0)
    s0b = raykfe.collect_factors(model, batches, fisher="true", seed=0)
    s1 = raykfe.collect_factors(model, batches, fisher="true", seed=1)
    for name in s0:
        assert torch.equal(s0[name].S_sum, s0b[name].S_sum), f"layer {name}: same seed, different S"
        assert torch.equal(s0[name].A_sum, s1[name].A_sum), f"layer {name}: A must not depend on labels"
    assert any(not torch.allclose(s0[n].S_sum, s1[n].S_sum) for n in s0), "seeds 0 and 1 gave the same labels"

    # the sampled-label average converges to the label-enumerated expectation
    exact = _exact_true_S(model, x)
    reps = 3000
    big = [(x.repeat(reps, 1), y.repeat(reps))]  # one label sample per copy of each example
    avg = raykfe.collect_factors(model, big, fisher="true", seed=7)
    for k, name in enumerate(["0", "2"]):
        err = rel_err(avg[name].S, exact[k])
        assert err < 0.05, f"layer {name}: sampled true-Fisher S is {err:.3f} (relative) from the exact one"
    # and a wrong expectation (the empirical Fisher with these labels) is clearly farther away
    emp = raykfe.collect_factors(model, batches, fisher="empirical")
    assert rel_err(emp["2"].S, exact[1]) > 0.1


def test_true_fisher_confident_model_samples_argmax() -> None:
    model = mlp(seed=8)
    x, _ = mlp_data(n=9, seed=9)
    make_confident(model, model[2], x)
    with torch.no_grad():
        top = model(x).argmax(dim=1)
    true = raykfe.collect_factors(model, [(x, torch.zeros_like(top))], fisher="true", seed=123)
    emp = raykfe.collect_factors(model, [(x, top)], fisher="empirical")
    for name in true:
        assert (true[name].S_sum.diagonal() > 0).any()
        assert torch.equal(true[name].S_sum, emp[name].S_sum), f"layer {name}: sampled labels != argmax"


# ------------------------------------------------------------------------------------------------
# 2. conv factors
# ------------------------------------------------------------------------------------------------

C_IN, C_OUT, H, W = 3, 4, 7, 6


def conv_model(k, stride, padding, dilation, bias, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(C_IN, C_OUT, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    with torch.no_grad():
        if bias:
            conv.bias.normal_()  # clearly non-zero biases
        ho, wo = conv(torch.zeros(1, C_IN, H, W)).shape[-2:]
    head = nn.Linear(C_OUT * ho * wo, 3)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), head).to(DT).eval(), (ho, wo)


def _two(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pad_before(padding, k, dilation) -> tuple[int, int]:
    """(top, left) padding as PyTorch applies it, written out here independently of raykfe:
    int / tuple p pads p on both sides, 'valid' nothing, 'same' a total of d*(k-1) per dim with
    floor(total/2) before (the extra pixel of an odd total goes after). The W~ x patches == conv2d
    assertion below checks this against PyTorch's own convolution."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        return tuple((d * (kk - 1)) // 2 for d, kk in zip(_two(dilation), _two(k)))
    return _two(padding)


def brute_patches(x, k, stride, padding, dilation, out_hw):
    """P [N, T, C, kh*kw] (the pixel read by offset kappa at output position t) and validity [T, kh*kw].

    ``k``/``dilation`` int or (h, w) pairs, ``padding`` int, pair, 'valid' or 'same'."""
    n, c, h, w = x.shape
    ho, wo = out_hw
    (kh, kw), (dh, dw) = _two(k), _two(dilation)
    top, left = pad_before(padding, k, dilation)
    P = torch.zeros(n, ho * wo, c, kh * kw, dtype=x.dtype)
    V = torch.zeros(ho * wo, kh * kw, dtype=x.dtype)
    for oh in range(ho):
        for ow in range(wo):
            t = oh * wo + ow
            for i in range(kh):
                for j in range(kw):
                    r = oh * stride - top + i * dh
                    q = ow * stride - left + j * dw
                    if 0 <= r < h and 0 <= q < w:
                        P[:, t, :, i * kw + j] = x[:, :, r, q]
                        V[t, i * kw + j] = 1.0
    return P, V


CONV_CASES = [
    (k, s, p, d, b)
    for k in (3, 1)
    for s in (1, 2)
    for p in (0, 1, 2)
    for d in (1, 2)
    for b in (True, False)
]
# every other padding form PyTorch accepts (k, stride, padding, dilation): 'same' (stride 1 only)
# with odd and even kernels, odd and even totals d*(k-1) (an odd total pads one more pixel after),
# 'valid', per-dim tuples, even kernels with integer padding, non-square kernels and dilations
PADDING_CASES = [
    (3, 1, "same", 1), (3, 1, "same", 2), (5, 1, "same", 1),
    (2, 1, "same", 1), (2, 1, "same", 2), (2, 1, "same", 3), (4, 1, "same", 1), (4, 1, "same", 2),
    ((2, 3), 1, "same", (1, 2)), ((4, 1), 1, "same", (3, 1)), ((3, 2), 1, "same", 1),
    (3, 1, "valid", 1), (2, 2, "valid", 1), (2, 1, "valid", 2), ((2, 3), 2, "valid", (2, 1)),
    (3, 1, (1, 2), 1), (3, 2, (0, 1), (2, 1)), ((2, 3), 2, (1, 0), 1), (2, 1, (1, 1), 1),
    (2, 2, 1, 1), (4, 1, 2, 2), (4, 2, 1, 1),
]
CONV_CASES += [(k, s, p, d, b) for k, s, p, d in PADDING_CASES for b in (True, False)]


def _case_id(case) -> str:
    k, s, p, d, b = case
    txt = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    return f"k{txt(k)}-s{s}-p{txt(p)}-d{txt(d)}-{'bias' if b else 'nobias'}"


@pytest.mark.parametrize("k,stride,padding,dilation,bias", CONV_CASES, ids=[_case_id(c) for c in CONV_CASES])
def test_conv_patches_and_factors(k, stride, padding, dilation, bias) -> None:
    model, (ho, wo) = conv_model(k, stride, padding, dilation, bias)
    conv = model[0]
    T = ho * wo
    g = gen(11)
    N = 3
    x = torch.randn(N, C_IN, H, W, dtype=DT, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    P, V = brute_patches(x, k, stride, padding, dilation, (ho, wo))
    out = conv(x).reshape(N, C_OUT, T)
    kh, kw = _two(k)
    kk = kh * kw
    centre = ((kh - 1) // 2) * kw + (kw - 1) // 2

    # per-example Ds by autograd, one example at a time
    Ds = []
    for n in range(N):
        s = conv(x[n : n + 1]).detach().requires_grad_(True)
        loss = F.cross_entropy(model[1:](s), y[n : n + 1], reduction="sum")
        Ds.append(torch.autograd.grad(loss, s)[0].reshape(C_OUT, T).T)  # [T, out]
    S = sum(d.T @ d for d in Ds) / N

    for mode in ("full", "patch"):
        ad = make_adapter("0", conv, mode)
        assert ad.out_hw((H, W)) == (ho, wo), f"{mode}: out_hw {ad.out_hw((H, W))} != conv2d's {(ho, wo)}"
        expect_fold = bias and (mode == "full" or bool(V[:, centre].all()))
        assert ad.fold_bias == expect_fold, f"{mode}: fold_bias {ad.fold_bias}, centre tap always valid: {bool(V[:, centre].all())}"
        Wt = ad.weight_matrix()
        if mode == "full":
            a = P.reshape(N, T, C_IN * kk)  # unfold order: channel, then kh, then kw
            assert_close(ad.unfold(x), a.transpose(1, 2), what="F.unfold patches vs explicit loops")
            if expect_fold:
                a = with_one(a)
            assert_close(torch.einsum("od,ntd->not", Wt, a), out, what="W~ x unfolded patches vs conv2d")
            A = torch.einsum("ntd,nte->de", a, a) / (N * T)
        else:
            a = P.permute(0, 1, 3, 2)  # [N, T, kappa, C]
            if expect_fold:
                a = torch.cat([a, V[None, :, :, None].expand(N, T, kk, 1)], dim=-1)
            rec = torch.einsum("odk,ntkd->not", Wt, a)
            if bias and not expect_fold:
                rec = rec + conv.bias[None, :, None]
            assert_close(rec, out, what=f"patch-mode W~ per offset vs conv2d (fold_bias={expect_fold})")
            A = torch.einsum("ntkd,ntke->de", a, a) / (N * T * kk)
        st = raykfe.collect_factors(model, [(x[:1], y[:1]), (x[1:], y[1:])], fisher="empirical", conv_mode=mode, layers=["0"])["0"]
        assert st.count == N and st.meta["positions"] == T
        assert_close(st.A, A, what=f"{mode} A")
        assert_close(st.S, S, what=f"{mode} S")
        if mode == "full":  # patches unfolded one example at a time (the memory bound) give the same A
            from raykfe import layers as layers_mod

            old, layers_mod.UNFOLD_CHUNK_BYTES = layers_mod.UNFOLD_CHUNK_BYTES, 1
            try:
                chunked = raykfe.collect_factors(model, [(x, y)], fisher="empirical", conv_mode=mode, layers=["0"])["0"]
            finally:
                layers_mod.UNFOLD_CHUNK_BYTES = old
            assert_close(chunked.A, A, what="full A, unfolded one example at a time")


def test_fold_bias_cases() -> None:
    """The patch-mode bias convention: folded only when the centre tap always reads a real pixel."""
    def fold(k, p, d):
        return make_adapter("c", nn.Conv2d(2, 2, k, padding=p, dilation=d), "patch").fold_bias

    assert fold(3, 1, 1) and fold(3, 0, 1) and fold(3, 2, 2) and fold(1, 0, 1)
    assert not fold(3, 2, 1) and not fold(1, 1, 1) and not fold(5, 3, 1)
    # 'same' pads total//2 before: even kernels with dilation 1 read a real pixel at the centre tap
    # (c = k/2 - 1) everywhere, with dilation 2 or 3 they do not
    assert fold(3, "same", 1) and fold(3, "same", 2) and fold(2, "same", 1) and fold(4, "same", 1)
    assert not fold(2, "same", 2) and not fold(2, "same", 3) and not fold(4, "same", 3)
    assert fold(3, "valid", 1) and fold(2, "valid", 3)
    assert make_adapter("c", nn.Conv2d(2, 2, 3, padding=2), "full").fold_bias
    assert not make_adapter("c", nn.Conv2d(2, 2, 3, padding=1, bias=False), "patch").fold_bias


# ------------------------------------------------------------------------------------------------
# 3. KFE identities
# ------------------------------------------------------------------------------------------------


def random_basis(d_in: int, d_out: int, seed: int):
    g = gen(seed)
    a = torch.randn(d_in, 3 * d_in, dtype=DT, generator=g)
    s = torch.randn(d_out, 3 * d_out, dtype=DT, generator=g)
    st = LayerStats(a @ a.T, s @ s.T, count=5)
    return st, eigenbasis("rand", st)


@pytest.mark.parametrize("k2", [None, 1, 9])  # None: Linear / full-mode conv; else patch mode
def test_kfe_identities(k2) -> None:
    d_out, d_in = 5, 7
    st, b = random_basis(d_in, d_out, seed=20 + (k2 or 0))
    assert (b.lA > 0).all() and (b.lS > 0).all()
    assert_close(b.QA @ torch.diag(b.lA) @ b.QA.T, st.A, atol=1e-11, what="A reconstruction")
    g = gen(30)
    Wt = torch.randn(d_out, d_in, dtype=DT, generator=g) if k2 is None else torch.randn(d_out, d_in, k2, dtype=DT, generator=g)
    Wk = kfe_weight(Wt, b)
    assert Wk.shape == Wt.shape
    K = torch.kron(b.QS, b.QA)
    SA = torch.kron(st.S, st.A)
    offsets = [Wt] if k2 is None else [Wt[..., i] for i in range(k2)]
    kfe_offsets = [Wk] if k2 is None else [Wk[..., i] for i in range(k2)]
    quad = 0.0
    for i, (w, wk) in enumerate(zip(offsets, kfe_offsets)):
        assert_close(wk.flatten(), K.T @ w.flatten(), atol=1e-12, what=f"vec(W') offset {i}")
        quad = quad + 0.5 * w.flatten() @ SA @ w.flatten()
    dl = entry_scores(Wk, b)
    assert dl.shape == (d_out, d_in) and (dl >= 0).all()
    assert math.isclose(dl.sum().item(), float(quad), rel_tol=1e-11), (dl.sum().item(), float(quad))
    rows, cols = unit_scores(Wk, b)
    assert_close(rows, dl.sum(1), what="row scores")
    assert_close(cols, dl.sum(0), what="column scores")
    # the Fisher is diagonal in the KFE: (Q_S (x) Q_A)^T (S (x) A) (Q_S (x) Q_A) = diag(l_S (x) l_A)
    assert_close(K.T @ SA @ K, torch.diag(torch.kron(b.lS, b.lA)), atol=1e-10, what="KFE Fisher diagonal")


@pytest.mark.parametrize("mode", ["patch", "full"])
def test_kfe_identities_real_conv_layer(mode: str) -> None:
    """Same identities with a real layer's W~ and collected statistics (bias folded)."""
    model, _ = conv_model(3, 1, 1, 1, True, seed=2)
    g = gen(3)
    x, y = torch.randn(4, C_IN, H, W, dtype=DT, generator=g), torch.randint(0, 3, (4,), generator=g)
    st = raykfe.collect_factors(model, [(x, y)], fisher="empirical", conv_mode=mode)["0"]
    ad = make_adapter("0", model[0], mode)
    b = eigenbasis("0", st)
    Wt = ad.weight_matrix()
    Wk = kfe_weight(Wt, b)
    SA = torch.kron(st.S, st.A)
    mats = [Wt] if Wt.dim() == 2 else [Wt[..., i] for i in range(Wt.shape[2])]
    quad = sum(0.5 * w.flatten() @ SA @ w.flatten() for w in mats)
    assert math.isclose(entry_scores(Wk, b).sum().item(), float(quad), rel_tol=1e-9)
    back = torch.einsum("oi,ijk,cj->ock", b.QS, Wk if Wk.dim() == 3 else Wk[..., None], b.QA)
    assert_close(back.reshape(Wt.shape), Wt, atol=1e-12, what="Q_S W' Q_A^T == W~")


# ------------------------------------------------------------------------------------------------
# 4. rebuild
# ------------------------------------------------------------------------------------------------


def _full_plan(model, x, y, conv_mode, keep=None):
    """A plan putting EVERY prunable layer (classifier included) in three-layer form."""
    adapters, skipped = prunable_layers(model, x[:1], conv_mode=conv_mode, include_classifier=True)
    stats = raykfe.collect_factors(model, [(x, y)], fisher="empirical", conv_mode=conv_mode)
    layers, weights, scored = {}, {}, {}
    for name, ad in adapters.items():
        sc = layer_scores(name, ad, stats[name])
        m = stats[name].meta
        keep_in, keep_out = (keep or {}).get(name, (list(range(m["d_in"])), list(range(m["d_out"]))))
        p, macs = kfe_cost(m, len(keep_in), len(keep_out))
        dp, dm = dense_cost(m)
        layers[name] = LayerPlan(
            name=name, action="kfe", kind=m["kind"], mode=m["mode"], fold_bias=m["fold_bias"],
            has_bias=m["has_bias"], d_in=m["d_in"], d_out=m["d_out"], keep_in=keep_in, keep_out=keep_out,
            params=p, macs=macs, dense_params=dp, dense_macs=dm,
        )
        weights[name] = (sc.basis.QA, sc.basis.QS, sc.w_kfe)
        scored[name] = sc
    plan = Plan(method="eigendamage", target="directions:0.5", layers=layers, skipped=skipped)
    return plan, weights, scored, stats


REBUILD_CASES = [
    ("linear", None, True), ("linear", None, False),
    *[
        (mode, geo, bias)
        for mode in ("patch", "full")
        for geo in ((3, 1, 1, 1), (3, 2, 0, 1), (3, 1, 2, 2), (3, 2, 2, 1), (3, 1, 1, 2), (1, 2, 1, 1),
                    (2, 1, "same", 1), (2, 1, "same", 3), ((2, 3), 1, "same", (1, 2)), (2, 2, "valid", 1))
        for bias in (True, False)
    ],
]


def _rebuild_model(kind, geo, bias):
    if kind == "linear":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias)).to(DT).eval()
        g = gen(1)
        return model, torch.randn(8, 6, dtype=DT, generator=g), torch.randint(0, 3, (8,), generator=g)
    k, s, p, d = geo
    model, _ = conv_model(k, s, p, d, bias)
    g = gen(1)
    return model, torch.randn(4, C_IN, H, W, dtype=DT, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("kind,geo,bias", REBUILD_CASES)
def test_rebuild_nothing_pruned_is_exact(kind, geo, bias) -> None:
    model, x, y = _rebuild_model(kind, geo, bias)
    mode = "patch" if kind == "linear" else kind
    plan, weights, _, _ = _full_plan(model, x, y, mode)
    new = apply_plan(model, plan, weights)
    assert isinstance(new.get_submodule("0"), nn.Sequential)
    with torch.no_grad():
        assert_close(new(x), model(x), atol=1e-10, what="rebuilt (all directions) vs original outputs")
        assert_close(new[0](x), model[0](x), atol=1e-10, what="rebuilt first layer vs original")
    # the analytic cost model equals what count() measures on the rebuilt model
    before, after = raykfe.count(model, x[:1]), raykfe.count(new, x[:1])
    d_params = sum(lp.params - lp.dense_params for lp in plan.layers.values())
    d_macs = sum(lp.macs - lp.dense_macs for lp in plan.layers.values())
    assert (after.params - before.params, after.macs - before.macs) == (d_params, d_macs)


def _deficient_case(kind, bias):
    """Model + data whose first layer has zero-eigenvalue directions in A and in S."""
    model, x, y = _rebuild_model(kind, (3, 1, 1, 1), bias)
    with torch.no_grad():
        if kind == "linear":
            x[:, 4] = x[:, 1]  # a copied input feature
            x[:, 5] = 0.0  # a constant-zero input feature
            model[2].weight[:, 3] = 0.0  # hidden unit 3 does not reach the loss: Ds_3 == 0
        else:
            x[:, 2] = x[:, 0]  # a copied input channel
            hw = model[3].weight.shape[1] // C_OUT
            model[3].weight.view(3, C_OUT, hw)[:, 1] = 0.0  # output channel 1 does not reach the loss
    return model, x, y


@pytest.mark.parametrize("kind", ["linear", "patch", "full"])
@pytest.mark.parametrize("bias", [True, False])
def test_pruning_zero_eigen_directions_changes_nothing(kind, bias) -> None:
    model, x, y = _deficient_case(kind, bias)
    mode = "patch" if kind == "linear" else kind
    _, _, scored, _ = _full_plan(model, x, y, mode)
    b = scored["0"].basis
    zero_in = [j for j in range(len(b.lA)) if b.lA[j] <= 1e-10 * b.lA.max()]
    zero_out = [i for i in range(len(b.lS)) if b.lS[i] <= 1e-10 * b.lS.max()]
    n_zero_in = {"linear": 2, "patch": 1, "full": 9}[kind]
    assert (len(zero_in), len(zero_out)) == (n_zero_in, 1), (b.lA, b.lS)
    # EigenDamage predicts no loss increase for them
    e = scored["0"].entries
    assert e[zero_out].abs().max() < 1e-12 and e[:, zero_in].abs().max() < 1e-12
    keep = {"0": ([j for j in range(len(b.lA)) if j not in zero_in], [i for i in range(len(b.lS)) if i not in zero_out])}
    plan, weights, _, _ = _full_plan(model, x, y, mode, keep=keep)
    new = apply_plan(model, plan, weights)
    assert new.get_submodule("0.core").weight.shape[:2] == (len(b.lS) - 1, len(b.lA) - n_zero_in)
    with torch.no_grad():
        assert_close(new(x), model(x), atol=1e-10, what="outputs after pruning zero-eigenvalue directions")


# ------------------------------------------------------------------------------------------------
# 5. predicted vs actual loss increase
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converged():
    """A small MLP trained to convergence on data drawn from a teacher of the same architecture."""
    torch.manual_seed(1)
    make = lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(DT)  # noqa: E731
    teacher = make()
    g = gen(0)
    n = 2000
    x = torch.randn(n, 8, dtype=DT, generator=g)
    with torch.no_grad():
        y = torch.multinomial(torch.softmax(teacher(x), 1), 1, generator=g).squeeze(1)
    torch.manual_seed(2)
    model = make()
    wd = 1e-3  # a little weight decay keeps the tanh units out of saturation
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, tolerance_grad=1e-9,
                            tolerance_change=1e-13, history_size=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * wd * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    model.eval()
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, n, 500)] * 2  # 2 label samples each
    stats = raykfe.collect_factors(model, batches, fisher="true", seed=0)
    info = {}
    for name, st in stats.items():
        b = eigenbasis(name, st)
        wk = kfe_weight(make_adapter(name, model.get_submodule(name)).weight_matrix(), b)
        info[name] = (b, wk, entry_scores(wk, b))
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
    return model, x, y, info, base


def _delete(converged, removal: dict[str, tuple[list[int], list[int]]]) -> tuple[float, float]:
    """Zero rows/columns of W' -> (actual increase of the mean loss, predicted sum of entry scores)."""
    model, x, y, info, base = converged
    saved = {n: (model.get_submodule(n).weight.clone(), model.get_submodule(n).bias.clone()) for n in removal}
    pred = 0.0
    with torch.no_grad():
        for name, (rows, cols) in removal.items():
            b, wk, e = info[name]
            mask = torch.zeros_like(e, dtype=torch.bool)
            mask[rows, :] = True
            mask[:, cols] = True
            pred += e[mask].sum().item()
            w = b.QS @ wk.masked_fill(mask, 0.0) @ b.QA.T
            mod = model.get_submodule(name)
            mod.weight.copy_(w[:, :-1])
            mod.bias.copy_(w[:, -1])
        actual = F.cross_entropy(model(x), y).item() - base
        for name, (w, bb) in saved.items():
            model.get_submodule(name).weight.copy_(w)
            model.get_submodule(name).bias.copy_(bb)
    return actual, pred


def _units(info):
    return [(n, ax, i) for n, (_, _, e) in info.items() for ax in (0, 1) for i in range(e.shape[ax])]


def _removal(units):
    out: dict[str, tuple[list[int], list[int]]] = {}
    for n, ax, i in units:
        out.setdefault(n, ([], []))[ax].append(i)
    return out


def test_predicted_vs_actual_spearman(converged) -> None:
    info = converged[3]
    units = _units(info)
    singles = np.array([_delete(converged, _removal([u])) for u in units])
    rho1 = spearmanr(singles[:, 0], singles[:, 1]).statistic
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(60):  # small random sets of 2-3 directions, mixed layers and axes
        pick = rng.choice(len(units), size=int(rng.integers(2, 4)), replace=False)
        sets.append(_delete(converged, _removal([units[i] for i in pick])))
    sets = np.array(sets)
    rho2 = spearmanr(sets[:, 0], sets[:, 1]).statistic
    table = "\n".join(f"  pred {p:.3e} actual {a:.3e}" for a, p in singles[np.argsort(singles[:, 1])])
    assert rho1 > 0.9, f"Spearman(pred, actual) over single directions = {rho1:.3f}\n{table}"
    assert rho2 > 0.9, f"Spearman(pred, actual) over random small sets = {rho2:.3f}"


@pytest.mark.parametrize("size", [4, 8])
def test_eigendamage_set_beats_random_and_magnitude(converged, size: int) -> None:
    info = converged[3]
    units = _units(info)
    score = {u: info[u[0]][2].sum(dim=1 - u[1])[u[2]].item() for u in units}
    norm = {u: info[u[0]][1].norm(dim=1 - u[1])[u[2]].item() for u in units}
    ed = sorted(units, key=lambda u: score[u])[:size]
    mag = sorted(units, key=lambda u: norm[u])[:size]
    assert set(ed) != set(mag)
    ed_actual, _ = _delete(converged, _removal(ed))
    mag_actual, _ = _delete(converged, _removal(mag))
    rng = np.random.default_rng(size)
    rand = [
        _delete(converged, _removal([units[i] for i in rng.choice(len(units), size, replace=False)]))[0]
        for _ in range(20)
    ]
    assert ed_actual < mag_actual, (ed_actual, mag_actual)
    assert ed_actual < min(rand), (ed_actual, sorted(rand)[:5])


# ------------------------------------------------------------------------------------------------
# 6. sharded statistics
# ------------------------------------------------------------------------------------------------


def _shards(x, y):
    bounds = [(0, 3), (3, 5), (5, 9), (9, 16), (16, 24)]  # batches of 3, 2, 4, 7, 8 examples
    batches = [(x[a:b], y[a:b]) for a, b in bounds]
    return [batches[:1], batches[1:4], batches[4:]], batches  # shards of 3, 13 and 8 examples


def _assert_stats_equal(merged, single, rtol=1e-12, what=""):
    assert list(merged) == list(single)
    for name in single:
        m, s = merged[name], single[name]
        assert m.count == s.count, f"{what} {name}: count {m.count} != {s.count}"
        for attr in ("A_sum", "S_sum", "A", "S"):
            ref = getattr(s, attr)
            assert_close(getattr(m, attr), ref, atol=rtol * ref.abs().max().item(), what=f"{what} {name} {attr}")


@pytest.mark.parametrize("mode", ["patch", "full"])
def test_sharded_statistics_merge(mode: str) -> None:
    model, _ = conv_model(3, 1, 2, 1, True, seed=4)  # patch mode: bias not folded (padding 2)
    g = gen(5)
    x, y = torch.randn(24, C_IN, H, W, dtype=DT, generator=g), torch.randint(0, 3, (24,), generator=g)
    shards, batches = _shards(x, y)
    single = raykfe.collect_factors(model, batches, fisher="empirical", conv_mode=mode)
    parts = [raykfe.collect_factors(model, s, fisher="empirical", conv_mode=mode) for s in shards]
    _assert_stats_equal(raykfe.merge_stats(parts), single, what="merge")
    _assert_stats_equal(raykfe.merge_stats([parts[2], raykfe.merge_stats(parts[:2])]), single, what="merge order")
    assert single["0"].count == 24 and [p["0"].count for p in parts] == [3, 13, 8]

    # true Fisher: an example's label draw is picked by its global index, so shards without
    # (x, y, idx) batches say where they start (tests/test_capture.py: overlapping ones are refused)
    single = raykfe.collect_factors(model, batches, fisher="true", conv_mode=mode, seed=0)
    parts = [raykfe.collect_factors(model, s, fisher="true", conv_mode=mode, seed=0, first_index=i0)
             for s, i0 in zip(shards, (0, 3, 16))]
    assert (single["0"].S_sum.diagonal() > 0).any()
    _assert_stats_equal(raykfe.merge_stats(parts), single, what="merge (true Fisher)")
