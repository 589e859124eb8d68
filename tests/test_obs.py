"""Parameter-coordinate baselines (raykfe.methods.obs) against brute force, in float64.

* collect_diag_fisher == a per-example autograd loop (Linear, strided+padded+dilated conv,
  depthwise conv, grouped 'same' reflect-padded conv, biases, in-place ReLUs, BatchNorm);
* Kron-OBD == the dense quadratic form; Kron-OBS == the dense constrained (KKT) OBS solution, for
  one row and for a set of rows; C-OBS == dense single-weight OBS, and its sum-of-singles update
  is no better than the joint optimum;
* damping -> 0 recovers the undamped formulas; L1 / C-OBD on hand-made numbers;
* write_weight_matrix inverts adapter.weight_matrix().

vec is row-major (``W~.flatten()``), so ``F = kron(S, A)`` (patch: ``kron(kron(S, A), I_k2)``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raykfe.capture import sample_labels
from raykfe.errors import ConfigError, NumericalError
from raykfe.layers import make_adapter
from raykfe.methods.obs import (
    DiagFisher,
    _per_example_grads,
    cobd_scores,
    cobs_entry_scores,
    cobs_scores,
    cobs_update,
    collect_diag_fisher,
    damped,
    kron_obd_scores,
    kron_obs_joint_loss,
    kron_obs_scores,
    kron_obs_update,
    l1_scores,
    write_weight_matrix,
)

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# exact Fisher diagonal
# ------------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)  # 9x9 -> 4x4
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise
        self.r2 = nn.ReLU(inplace=True)  # in-place right on a hooked output
        self.gc = nn.Conv2d(4, 6, (2, 3), padding="same", groups=2, padding_mode="reflect")  # odd 'same'
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x):
        x = torch.tanh(self.bn(self.c1(x)))
        x = self.r2(self.dw(x))
        x = F.relu(self.gc(x))
        return self.fc(x.flatten(1))


LAYERS = ["c1", "dw", "gc", "fc"]


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    m = Toy().to(DT)
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        m.bn.running_mean.uniform_(-0.3, 0.3)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def data(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 9, 9, generator=g, dtype=DT), torch.randint(0, 5, (n,), generator=g)


def brute_diag(model, x, y, idx, fisher, seed=0, layers=LAYERS):
    """sum_n g_n^2 from one autograd.grad per example (eval mode)."""
    model.eval()
    mods = dict(model.named_modules())
    params = [(n, k, getattr(mods[n], k)) for n in layers for k in ("weight", "bias")]
    out = {n: {} for n in layers}
    for _, _, p in params:
        p.requires_grad_(True)
    for i in range(x.shape[0]):
        logits = model(x[i : i + 1])
        lab = sample_labels(logits.detach(), idx[i : i + 1], seed) if fisher == "true" else y[i : i + 1]
        loss = F.cross_entropy(logits, lab, reduction="sum")
        grads = torch.autograd.grad(loss, [p for _, _, p in params])
        for (n, k, _), g in zip(params, grads):
            out[n][k] = out[n].get(k, 0) + g.double().square()
    return out


def assert_diag_equal(got: DiagFisher, want: dict, count: int, tol: float = 1e-12) -> None:
    assert got.count == count
    assert set(got.sums) == set(want)
    for n in want:
        assert set(got.sums[n]) == set(want[n])
        for k in want[n]:
            a, e = got.sums[n][k], want[n][k]
            assert a.dtype == DT and a.shape == e.shape, (n, k)
            scale = e.abs().max().item()
            assert scale > 0, (n, k)
            err = (a - e).abs().max().item()
            assert err <= tol * scale, f"{n}.{k}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_diag_fisher_matches_per_example_loop(fisher):
    model = toy()
    x, y = data()
    want = brute_diag(model, x, y, torch.arange(10), fisher, seed=3)
    # model state that must survive the pass
    model.train()
    model.fc.bias.requires_grad_(False)
    model.c1.weight.grad = torch.full_like(model.c1.weight, 7.0)
    bn_mean = model.bn.running_mean.clone()
    batches = [(x[:4], y[:4]), (x[4:7], y[4:7]), (x[7:], y[7:])]
    got = collect_diag_fisher(model, batches, layers=LAYERS, fisher=fisher, seed=3)
    assert_diag_equal(got, want, 10)
    assert model.training and not model.fc.bias.requires_grad and model.fc.weight.requires_grad
    assert torch.equal(model.c1.weight.grad, torch.full_like(model.c1.weight, 7.0))
    assert model.fc.weight.grad is None and model.dw.weight.grad is None
    assert torch.equal(model.bn.running_mean, bn_mean)  # eval mode: BatchNorm statistics untouched
    # chunking (one example per chunk) changes nothing
    tiny = collect_diag_fisher(model, batches, layers=LAYERS, fisher=fisher, seed=3, max_chunk_elems=1)
    assert_diag_equal(tiny, want, 10)
    # mean diagonal
    assert torch.allclose(got.diag("gc")["weight"], want["gc"]["weight"] / 10, rtol=1e-12, atol=0)


def test_diag_fisher_shards_and_indices():
    model = toy(2)
    x, y = data(12, seed=5)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:12]
    want = brute_diag(model, x, y, perm, "true", seed=11)
    s1 = collect_diag_fisher(model, [(x[:5], y[:5], perm[:5])], layers=LAYERS, seed=11)
    s2 = collect_diag_fisher(model, [(x[5:9], y[5:9], perm[5:9]), (x[9:], y[9:], perm[9:])], layers=LAYERS, seed=11)
    both = s1.merge(s2)
    assert_diag_equal(both, want, 12)
    # the flat tensors all-reduce by summing and round-trip
    t1, t2 = s1.to_tensors(), s2.to_tensors()
    assert set(t1) == {f"{n}::{k}" for n in LAYERS for k in ("weight", "bias")} | {"count"}
    summed = DiagFisher.from_tensors({k: t1[k] + t2[k] for k in t1})
    assert_diag_equal(summed, want, 12)
    # without idx the running position is the index
    whole = collect_diag_fisher(model, [(x[:7], y[:7]), (x[7:], y[7:])], layers=LAYERS, seed=11)
    assert_diag_equal(whole, brute_diag(model, x, y, torch.arange(12), "true", seed=11), 12)
    # max_batches
    first = collect_diag_fisher(model, [(x[:7], y[:7]), (x[7:], y[7:])], layers=["fc"], seed=11, max_batches=1)
    assert first.count == 7


# every padding form a Conv2d accepts (k, stride, padding, dilation, padding_mode): 'same' with
# odd and even kernels and odd totals d*(k-1) (one more pixel after), 'valid', tuples, strides
PADDINGS = [
    (3, 1, "same", 1, "zeros"), (2, 1, "same", 1, "zeros"), (2, 1, "same", 3, "zeros"),
    (4, 1, "same", 2, "zeros"), ((2, 3), 1, "same", (3, 1), "zeros"), (2, 1, "same", 1, "reflect"),
    ((4, 3), 1, "same", 1, "circular"), (3, 1, "valid", 2, "zeros"), (2, 2, "valid", 1, "zeros"),
    (3, 2, (1, 2), (2, 1), "zeros"), ((2, 3), 2, (1, 0), 1, "replicate"), (2, 1, 1, 1, "zeros"),
]


class OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, n_out: int) -> None:
        super().__init__()
        self.c, self.fc = conv, nn.Linear(n_out, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).flatten(1))


@pytest.mark.parametrize("k,stride,padding,dilation,mode", PADDINGS, ids=[str(p) for p in PADDINGS])
def test_diag_fisher_every_padding_form(k, stride, padding, dilation, mode):
    """Per-example conv gradients == autograd one example at a time, and the diagonal == brute force."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 7, 6, generator=g, dtype=DT)
    out = conv(x)
    dy = torch.randn(out.shape, generator=g, dtype=DT)
    gw, gb = _per_example_grads(conv, x, dy)
    for n in range(x.shape[0]):
        ew, eb = torch.autograd.grad((conv(x[n : n + 1]) * dy[n : n + 1]).sum(), [conv.weight, conv.bias])
        assert (gw[n] - ew).abs().max().item() <= 1e-12 * ew.abs().max().item(), f"example {n}: weight gradient"
        assert (gb[n] - eb).abs().max().item() <= 1e-12 * eb.abs().max().item(), f"example {n}: bias gradient"
    model = OneConv(conv, out[0].numel()).to(DT)
    y = torch.randint(0, 5, (4,), generator=g)
    want = brute_diag(model, x, y, torch.arange(4), "true", seed=2, layers=["c", "fc"])
    got = collect_diag_fisher(model, [(x[:3], y[:3]), (x[3:], y[3:])], layers=["c", "fc"], seed=2)
    assert_diag_equal(got, want, 4)


def test_diag_fisher_hand_made_shards_need_global_indices():
    """Shards without idx: with first_index they merge to the single pass; overlapping ones are refused."""
    model = toy(4)
    x, y = data(12, seed=6)
    batches = [(x[:3], y[:3]), (x[3:7], y[3:7]), (x[7:], y[7:])]
    single = collect_diag_fisher(model, batches, layers=LAYERS, seed=9)
    assert single.index_ranges == [[0, 12]]
    s1 = collect_diag_fisher(model, batches[:2], layers=LAYERS, seed=9)
    s2 = collect_diag_fisher(model, batches[2:], layers=LAYERS, seed=9, first_index=7)
    assert (s1.index_ranges, s2.index_ranges) == ([[0, 7]], [[7, 12]])
    merged = s2.merge(s1)
    assert merged.index_ranges == [[0, 12]]
    assert_diag_equal(merged, {n: single.sums[n] for n in LAYERS}, 12)
    # the second shard collected from index 0 reuses the labels of examples 0..4: refused
    again = collect_diag_fisher(model, batches[2:], layers=LAYERS, seed=9)
    bad = s1.sums["fc"]["weight"] + again.sums["fc"]["weight"]
    assert (bad - single.sums["fc"]["weight"]).abs().max() > 1e-3 * single.sums["fc"]["weight"].abs().max()
    with pytest.raises(ConfigError, match=r"\[0, 5\).*first_index="):
        s1.merge(again)
    with pytest.raises(ConfigError, match="first_index"):
        collect_diag_fisher(model, batches, layers=LAYERS, first_index=-3)
    # explicit global indices and the empirical Fisher carry no range (nothing to check)
    assert collect_diag_fisher(model, [(x, y, torch.arange(12))], layers=["fc"], seed=9).index_ranges is None
    assert collect_diag_fisher(model, batches, layers=["fc"], fisher="empirical").index_ranges is None


def test_diag_fisher_errors():
    model = toy()
    x, y = data(2)
    with pytest.raises(ConfigError, match="fisher"):
        collect_diag_fisher(model, [(x, y)], layers=LAYERS, fisher="exact")
    with pytest.raises(ConfigError, match="bn"):
        collect_diag_fisher(model, [(x, y)], layers=["fc", "bn"])
    with pytest.raises(ConfigError, match="string"):
        collect_diag_fisher(model, [(x, y)], layers="fc")
    with pytest.raises(ConfigError, match="empty"):
        collect_diag_fisher(model, [], layers=["fc"])
    a = collect_diag_fisher(model, [(x, y)], layers=["fc"])
    b = collect_diag_fisher(model, [(x, y)], layers=["gc"])
    with pytest.raises(ConfigError, match="different layers"):
        a.merge(b)


# ------------------------------------------------------------------------------------------------
# dense references
# ------------------------------------------------------------------------------------------------


def spd(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ q.T


def problem(d_out=5, d_in=4, k2=None, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    shape = (d_out, d_in) if k2 is None else (d_out, d_in, k2)
    return torch.randn(*shape, generator=g, dtype=DT), spd(d_in, 1e2, seed + 1), spd(d_out, 1e2, seed + 2)


def dense_F(w, A, S):
    Fm = torch.kron(S, A)
    return Fm if w.dim() == 2 else torch.kron(Fm, torch.eye(w.shape[2], dtype=DT))


def row_index(w, rows) -> torch.Tensor:
    per = w[0].numel()
    return torch.cat([torch.arange(r * per, (r + 1) * per) for r in rows])


def kkt_obs(Fm, v, q):
    """argmin 1/2 dw^T F dw s.t. dw_q = -v_q, by solving the KKT system: (dw, loss)."""
    n, m = Fm.shape[0], len(q)
    E = torch.zeros(n, m, dtype=DT)
    E[q, torch.arange(m)] = 1.0
    K = torch.zeros(n + m, n + m, dtype=DT)
    K[:n, :n], K[:n, n:], K[n:, :n] = Fm, E, E.T
    rhs = torch.cat([torch.zeros(n, dtype=DT), -v[q]])
    dw = torch.linalg.solve(K, rhs)[:n]
    return dw, 0.5 * float(dw @ Fm @ dw)


LAYOUTS = [None, 3]  # full [d_out, d_in] and patch [d_out, d_in, k2]


# ------------------------------------------------------------------------------------------------
# Kron-OBD / Kron-OBS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k2", LAYOUTS)
def test_kron_obd_is_the_quadratic_form(k2):
    w, A, S = problem(k2=k2)
    Fm = dense_F(w, A, S)
    got = kron_obd_scores(w, A, S)
    for i in range(w.shape[0]):
        v = torch.zeros_like(w)
        v[i] = w[i]
        v = v.flatten()
        assert abs(got[i].item() - 0.5 * float(v @ Fm @ v)) <= 1e-12 * got[i].item()


@pytest.mark.parametrize("k2", LAYOUTS)
def test_kron_obs_single_row_is_exact_obs(k2):
    w, A, S = problem(k2=k2, seed=3)
    damping = 1e-3
    Fd = dense_F(w, damped(A, damping), damped(S, damping))
    Finv = torch.linalg.inv(Fd)
    v = w.flatten()
    got = kron_obs_scores(w, A, S, damping)
    for i in range(w.shape[0]):
        q = row_index(w, [i])
        closed = 0.5 * float(v[q] @ torch.linalg.solve(Finv[q][:, q], v[q]))
        _, kkt = kkt_obs(Fd, v, q)
        assert abs(got[i].item() - closed) <= 1e-10 * closed
        assert abs(got[i].item() - kkt) <= 1e-10 * kkt
        # the single-row update is the dense optimum too
        dw, _ = kkt_obs(Fd, v, q)
        assert torch.allclose(kron_obs_update(w, A, S, [i], damping).flatten(), v + dw, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k2", LAYOUTS)
def test_kron_obs_joint_update_is_exact(k2):
    w, A, S = problem(d_out=7, d_in=5, k2=k2, seed=5)
    damping = 1e-3
    Fd = dense_F(w, damped(A, damping), damped(S, damping))
    v = w.flatten()
    for rows in ([1, 4, 5], [0, 6], list(range(7))):
        q = row_index(w, rows)
        dw, loss = kkt_obs(Fd, v, q)
        new = kron_obs_update(w, A, S, rows, damping)
        assert new.shape == w.shape
        assert (new.flatten() - (v + dw)).abs().max().item() <= 1e-10
        assert torch.all(new[rows] == 0)
        assert abs(kron_obs_joint_loss(w, A, S, rows, damping) - loss) <= 1e-10 * loss
    assert torch.equal(kron_obs_update(w, A, S, [], damping), w)
    with pytest.raises(ConfigError, match="out of range"):
        kron_obs_update(w, A, S, [7], damping)


# ------------------------------------------------------------------------------------------------
# C-OBS
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k2", LAYOUTS)
def test_cobs_entries_are_single_weight_obs(k2):
    w, A, S = problem(k2=k2, seed=7)
    damping = 1e-3
    Fd = dense_F(w, damped(A, damping), damped(S, damping))
    Finv = torch.linalg.inv(Fd)
    v = w.flatten()
    entries = cobs_entry_scores(w, A, S, damping).flatten()
    for q in range(v.numel()):
        _, kkt = kkt_obs(Fd, v, [q])
        assert abs(entries[q].item() - 0.5 * v[q].item() ** 2 / Finv[q, q].item()) <= 1e-10 * entries[q].item()
        assert abs(entries[q].item() - kkt) <= 1e-10 * kkt
    rows = cobs_scores(w, A, S, damping)
    assert torch.allclose(rows, entries.reshape(w.shape[0], -1).sum(1), rtol=1e-14, atol=0)
    # the update is the sum of the dense single-weight updates, then removed rows zeroed
    removed = [0, 3]
    q = row_index(w, removed)
    dw = -(Finv[:, q] * (v[q] / Finv.diagonal()[q])).sum(1)
    want = (v + dw).reshape(w.shape)
    want[removed] = 0.0
    assert (cobs_update(w, A, S, removed, damping) - want).abs().max().item() <= 1e-10


def _update_losses(w, A, S, removed, damping=1e-3):
    """(C-OBS loss, joint Kron-OBS loss, 1/2 e^T F_d e with e the difference of the two updates)."""
    Fd = dense_F(w, damped(A, damping), damped(S, damping))
    d_cobs = (cobs_update(w, A, S, removed, damping) - w).flatten()
    d_joint = (kron_obs_update(w, A, S, removed, damping) - w).flatten()
    e = d_cobs - d_joint
    return 0.5 * float(d_cobs @ Fd @ d_cobs), 0.5 * float(d_joint @ Fd @ d_joint), 0.5 * float(e @ Fd @ e)


def test_cobs_update_is_not_the_joint_optimum():
    """Both updates zero the removed rows (feasible); the joint one is THE minimiser of the strictly
    convex 1/2 dw^T F_d dw on that affine set, so l_cobs - l_joint = 1/2 e^T F_d e (e = difference
    of the updates: the optimum's gradient F_d dw_joint is orthogonal to feasible directions) and
    C-OBS is strictly worse exactly when its update differs. Correlated S and A (3 of 8 rows): it
    does, by a wide margin (measured 23282 vs 9016.2, 2.58x)."""
    w, A, S = problem(d_out=8, d_in=6, k2=3, seed=11)
    removed = [2, 3, 6]
    Fd = dense_F(w, damped(A, 1e-3), damped(S, 1e-3))
    _, l_kkt = kkt_obs(Fd, w.flatten(), row_index(w, removed))
    l_cobs, l_joint, half_eFe = _update_losses(w, A, S, removed)
    assert abs(l_joint - l_kkt) <= 1e-10 * l_kkt and abs(kron_obs_joint_loss(w, A, S, removed) - l_kkt) <= 1e-10 * l_kkt
    assert abs((l_cobs - l_joint) - half_eFe) <= 1e-9 * l_cobs, (l_cobs, l_joint, half_eFe)
    assert l_cobs > 2.0 * l_joint, f"C-OBS loss {l_cobs:.6g} vs joint {l_joint:.6g}: expected strictly (2x) worse"


def _diag_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.diag(torch.rand(n, generator=g, dtype=DT) * 9 + 1)


@pytest.mark.parametrize("k2", LAYOUTS)
def test_cobs_update_equals_the_joint_optimum_when_it_must(k2):
    """With S_d diagonal, C-OBS's update of kept row i is -[S_d^{-1}]_{iR} C A_d^{-1} = 0 and the
    joint update S_{d,KK}^{-1} S_{d,KR} W_R = 0 too: both only zero the removed rows, whatever A
    (diagonal S and A: every single-weight update is dw = -w_q e_q, their sum IS the joint one).
    With A diagonal and ONE removed row, C-OBS's kept-row update -S^{-1}_{K r} w_r / [S^{-1}]_rr
    is the joint one as well. Correlated S with two removed rows (A diagonal) is strictly worse:
    (S^{-1}_RR)^{-1} != diag(S^{-1}_RR)^{-1}."""
    w, A, S = problem(d_out=6, d_in=5, k2=k2, seed=21)
    Sdiag, Adiag = _diag_spd(6, 1), _diag_spd(5, 2)
    cases = {
        "diagonal S and A": (Adiag, Sdiag, [1, 4]),
        "diagonal S, correlated A": (A, Sdiag, [0, 2, 5]),
        "diagonal A, correlated S, one row": (Adiag, S, [3]),
    }
    for what, (a, s, removed) in cases.items():
        l_cobs, l_joint, half_eFe = _update_losses(w, a, s, removed)
        diff = (cobs_update(w, a, s, removed) - kron_obs_update(w, a, s, removed)).abs().max().item()
        assert diff <= 1e-12 * w.abs().max().item(), f"{what}: updates differ by {diff:.3g}"
        assert abs(l_cobs - l_joint) <= 1e-12 * l_joint, f"{what}: {l_cobs!r} vs {l_joint!r}"
    l_cobs, l_joint, half_eFe = _update_losses(w, Adiag, S, [1, 3])
    assert l_cobs > 1.01 * l_joint and abs((l_cobs - l_joint) - half_eFe) <= 1e-9 * l_cobs, (l_cobs, l_joint)


# ------------------------------------------------------------------------------------------------
# damping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k2", LAYOUTS)
def test_damping_to_zero_recovers_undamped(k2):
    w, A, S = problem(k2=k2, seed=13)
    Fm = dense_F(w, A, S)
    Finv = torch.linalg.inv(Fm)
    v = w.flatten()
    qs = [row_index(w, [i]) for i in range(w.shape[0])]
    und_obs = torch.tensor([0.5 * float(v[q] @ torch.linalg.solve(Finv[q][:, q], v[q])) for q in qs], dtype=DT)
    und_cobs = (0.5 * v.square() / Finv.diagonal()).reshape(w.shape[0], -1).sum(1)
    rows = [1, 2]
    q = row_index(w, rows)
    dw, _ = kkt_obs(Fm, v, q)
    und_upd = v + dw
    errs = []
    for d in (1e-2, 1e-4, 1e-6, 1e-9):
        e_obs = ((kron_obs_scores(w, A, S, d) - und_obs).abs() / und_obs).max().item()
        e_cobs = ((cobs_scores(w, A, S, d) - und_cobs).abs() / und_cobs).max().item()
        e_upd = (kron_obs_update(w, A, S, rows, d).flatten() - und_upd).abs().max().item()
        errs.append(max(e_obs, e_cobs, e_upd))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-7, errs
    # damping=0 is the undamped formula itself
    assert torch.allclose(kron_obs_scores(w, A, S, 0.0), und_obs, rtol=1e-10, atol=0)
    assert torch.allclose(damped(A, 1e-3), A + 1e-3 * A.diagonal().mean() * torch.eye(A.shape[0], dtype=DT))


def test_damping_errors():
    w, A, S = problem()
    S_sing = S.clone()
    S_sing[0], S_sing[:, 0] = 0.0, 0.0
    with pytest.raises(NumericalError, match="damping"):
        kron_obs_scores(w, A, S_sing, 0.0)
    assert torch.isfinite(kron_obs_scores(w, A, S_sing, 1e-3)).all()
    with pytest.raises(ConfigError, match="damping"):
        cobs_scores(w, A, S, -1.0)
    with pytest.raises(ConfigError, match="factor shapes"):
        kron_obs_scores(w, S, A)


# ------------------------------------------------------------------------------------------------
# L1 / C-OBD
# ------------------------------------------------------------------------------------------------


def test_l1_and_cobd_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    assert torch.equal(l1_scores(w), torch.tensor([3.5, 4.0], dtype=DT))
    w4 = torch.tensor([[[[1.0, -1.0]], [[2.0, 0.0]]], [[[0.0, 0.0]], [[0.0, -4.0]]]])  # [2, 2, 1, 2]
    assert torch.equal(l1_scores(w4), torch.tensor([4.0, 4.0], dtype=DT))
    f = torch.tensor([[2.0, 1.0, 4.0], [5.0, 0.5, 2.0]])
    # row 0: 1/2 (1*2 + 4*1 + 0.25*4) = 3.5; row 1: 1/2 (0 + 9*0.5 + 1*2) = 3.25
    assert torch.equal(cobd_scores(w, f), torch.tensor([3.5, 3.25], dtype=DT))
    b, fb = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 4.0])
    assert torch.equal(cobd_scores(w, f, b, fb), torch.tensor([4.5, 5.25], dtype=DT))
    with pytest.raises(ConfigError, match="both"):
        cobd_scores(w, f, b)
    with pytest.raises(ConfigError, match="fdiag_weight"):
        cobd_scores(w, f[:, :2])


# ------------------------------------------------------------------------------------------------
# writing W~ back
# ------------------------------------------------------------------------------------------------


MODULES = [
    ("linear", lambda bias: nn.Linear(5, 3, bias=bias), "full"),
    ("conv full", lambda bias: nn.Conv2d(2, 3, 3, padding=1, bias=bias), "full"),
    ("conv patch", lambda bias: nn.Conv2d(2, 3, 3, padding=1, bias=bias), "patch"),
    ("conv patch unfolded bias", lambda bias: nn.Conv2d(2, 3, 3, padding=2, bias=bias), "patch"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind,make,mode", MODULES, ids=[m[0] for m in MODULES])
def test_write_weight_matrix_round_trip(kind, make, mode, bias):
    torch.manual_seed(0)
    module = make(bias).to(DT)
    ad = make_adapter("m", module, mode)
    weight0 = module.weight.detach().clone()
    bias0 = module.bias.detach().clone() if bias else None
    w = ad.weight_matrix().clone()  # weight_matrix() may be a view of a float64 module's weight
    with torch.no_grad():
        module.weight.zero_()
        if bias:
            module.bias.fill_(123.0)
    write_weight_matrix(ad, w)
    assert torch.equal(module.weight, weight0)
    if bias and ad.fold_bias:
        assert torch.equal(module.bias, bias0)
    elif bias:  # not folded into W~: left alone
        assert torch.equal(module.bias, torch.full_like(bias0, 123.0))
    # a new W~ (in the image of weight_matrix) comes back exactly
    w2 = torch.randn_like(w)
    if w.dim() == 3 and ad.fold_bias:
        centre = ad.centre_tap[0] * ad.kernel[1] + ad.centre_tap[1]
        keep = w2[:, -1, centre].clone()
        w2[:, -1] = 0.0
        w2[:, -1, centre] = keep
    write_weight_matrix(ad, w2)
    assert torch.equal(ad.weight_matrix(), w2)
    write_weight_matrix(ad, ad.weight_matrix())  # writing a view of the module onto itself is harmless
    assert torch.equal(ad.weight_matrix(), w2)
    with pytest.raises(ConfigError, match="does not fit"):
        write_weight_matrix(ad, w2[:, :-1])


@pytest.mark.parametrize("mode", ["full", "patch"])
def test_kron_obs_update_written_back_zeroes_channels(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(DT)
    ad = make_adapter("c", conv, mode)
    w = ad.weight_matrix()
    d_in = w.shape[1]
    A, S = spd(d_in, 10.0, 1), spd(5, 10.0, 2)
    new = kron_obs_update(w, A, S, [1, 3])
    write_weight_matrix(ad, new)
    assert torch.equal(ad.weight_matrix(), new)  # Kron-OBS keeps the off-centre bias taps at 0
    out = conv(torch.randn(2, 3, 6, 6, dtype=DT))
    assert torch.all(out[:, [1, 3]] == 0)
