"""Forms of a pruned KFE layer (ALGORITHMS.md section 11): every folded form computes what the
three-layer module computes (float64, with stride, padding, dilation, biases and borders), costs
what :func:`raykfe.plan.kfe_cost` says, is what the selection chose as the cheapest, and survives
save / load and fine-tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import raykfe
from raykfe.capture import layer_metas, prunable_layers
from raykfe.counting import count, layer_counts
from raykfe.layers import make_adapter
from raykfe.models import build_model
from raykfe.plan import FORMS, LayerPlan, allowed_forms, kfe_cost
from raykfe.surgery import fill_kfe, make_kfe_shell, rotations, to_form

DT = torch.float64

CONVS = [
    # (in, out, kernel, stride, padding, dilation, bias, mode)
    (5, 7, 3, 1, 1, 1, False, "patch"),
    (5, 7, 3, 2, 1, 1, True, "patch"),  # bias folded at the centre tap: no fold_in
    (6, 4, 3, 1, 2, 2, False, "patch"),
    (4, 6, 2, 2, 0, 1, True, "patch"),
    (5, 7, 3, 2, 1, 1, True, "full"),
    (5, 7, 3, 1, 2, 2, False, "full"),
    (5, 6, 1, 1, 0, 1, True, "patch"),
    (5, 6, 1, 2, 0, 1, True, "full"),
]


def _random_kfe(module: nn.Module, mode: str, seed: int):
    """An adapter's geometry, random orthonormal bases, a random KFE weight and random kept sets."""
    g = torch.Generator().manual_seed(seed)
    ad = make_adapter("layer", module, mode)
    qa, _ = torch.linalg.qr(torch.randn(ad.d_in, ad.d_in, dtype=DT, generator=g))
    qs, _ = torch.linalg.qr(torch.randn(ad.d_out, ad.d_out, dtype=DT, generator=g))
    shape = (ad.d_out, ad.d_in) if isinstance(module, nn.Linear) or mode == "full" else \
        (ad.d_out, ad.d_in, module.kernel_size[0] * module.kernel_size[1])
    w = torch.randn(*shape, dtype=DT, generator=g)
    keep_in = sorted(torch.randperm(ad.d_in, generator=g)[: max(1, ad.d_in // 2)].tolist())
    keep_out = sorted(torch.randperm(ad.d_out, generator=g)[: max(1, ad.d_out - 2)].tolist())
    lp = LayerPlan(name="layer", action="kfe", kind="linear" if isinstance(module, nn.Linear) else "conv", mode=mode,
                   fold_bias=ad.fold_bias, has_bias=ad.has_bias, d_in=ad.d_in, d_out=ad.d_out, keep_in=keep_in,
                   keep_out=keep_out)
    shell = make_kfe_shell(module, lp)
    fill_kfe(shell, module, lp, qa, qs, w)
    if lp.has_bias and not lp.fold_bias:
        with torch.no_grad():
            shell.rot_out.bias.normal_(generator=g)
    return lp, shell


def _meta(lp: LayerPlan, module: nn.Module, x: torch.Tensor) -> dict:
    """The selection's meta of the layer (what kfe_cost reads), from its input and output."""
    y = module(x)
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "mode": lp.mode, "c_in": module.in_features, "d_out": module.out_features, "k2": 1,
                "positions": 1, "fold_bias": lp.fold_bias, "has_bias": lp.has_bias}
    k = module.kernel_size
    return {"kind": "conv", "mode": lp.mode, "c_in": module.in_channels, "d_out": module.out_channels, "k2": k[0] * k[1],
            "positions": y.shape[2] * y.shape[3], "in_shape": list(x.shape[1:]), "fold_bias": lp.fold_bias,
            "has_bias": lp.has_bias}


@pytest.mark.parametrize("spec", CONVS, ids=[f"{c[7]}-k{c[2]}s{c[3]}p{c[4]}d{c[5]}{'-bias' if c[6] else ''}" for c in CONVS])
def test_every_allowed_conv_form_equals_the_three_layers_and_costs_what_the_plan_counts(spec):
    c_in, c_out, k, stride, pad, dil, bias, mode = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, bias=bias).to(DT)
    lp, shell = _random_kfe(conv, mode, seed=k + stride + pad)
    x = torch.randn(3, c_in, 9, 8, dtype=DT) * 2 + 1  # non-zero mean: borders matter
    meta = _meta(lp, conv, x[:1])
    forms = allowed_forms(meta)
    assert ("fold_in" in forms) == (mode == "full" or not lp.fold_bias)
    with torch.no_grad():
        want = shell(x)
        for form in forms:
            m = to_form(shell, form)
            torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10, msg=f"form {form}")
            r_in = lp.r_in if form != "fold_in" else meta["c_in"]
            r_out = lp.r_out if form != "fold_out" else c_out
            assert len(m) == (3 if form == "three" else 2)
            got = layer_counts(m, x[:1])
            params = sum(p.numel() for p in m.parameters())
            assert (params, sum(c.macs for c in got.values())) == kfe_cost(meta, lp.r_in, lp.r_out, form), \
                f"{form}: r_in {r_in} r_out {r_out}"


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forms_equal_the_three_layers(bias):
    torch.manual_seed(1)
    lin = nn.Linear(9, 6, bias=bias).to(DT)
    lp, shell = _random_kfe(lin, "patch", seed=3)
    x = torch.randn(5, 9, dtype=DT)
    meta = _meta(lp, lin, x[:1])
    assert allowed_forms(meta) == FORMS
    with torch.no_grad():
        for form in FORMS:
            m = to_form(shell, form)
            torch.testing.assert_close(m(x), shell(x), rtol=1e-10, atol=1e-10)
            assert sum(p.numel() for p in m.parameters()) == kfe_cost(meta, lp.r_in, lp.r_out, form)[0]


def _batches(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("arch,steps,target", [("vgg_small", 1, "flops:0.7"), ("resnet8", 1, "flops:0.7"),
                                               ("resnet8", 2, "params:0.5")])
def test_the_selection_builds_each_layer_in_its_cheapest_form_and_counts_it(arch, steps, target):
    """Every pruned layer is in the cheapest allowed form for its kept directions (the target's
    metric), a folded side keeps every direction, the rebuilt model's counts are the plan's, and
    the target is met; with ``forms="three"`` nothing is folded and the result is no cheaper."""
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    batches = _batches()
    x = batches[0][0][:1]
    res = raykfe.prune(model, batches, target=target, rank="score", steps=steps, forms="cheapest")
    three = raykfe.prune(model, batches, target=target, rank="score", steps=steps, forms="three")
    assert all(lp.form == "three" for lp in three.plan.layers.values())
    pruned = [lp for lp in res.plan.layers.values() if lp.action == "kfe"]
    assert any(lp.form != "three" for lp in pruned), "no layer was folded: the test shows nothing"
    c, base = count(res.model, x), count(model, x)
    assert (c.params, c.macs) == (res.plan.params, res.plan.macs)
    metric = "macs" if target.startswith("flops") else "params"
    assert res.plan.summary.achieved >= 0.7 * (metric == "macs") + 0.5 * (metric == "params")
    assert abs(1 - getattr(c, metric) / getattr(base, metric) - res.plan.summary.achieved) < 1e-9
    metas = layer_metas(model, x, prunable_layers(model, x)[0])
    rows = layer_counts(res.model, x)
    meta_free = {n: r for n, r in rows.items() if any(n.startswith(lp.name + ".") for lp in pruned)}
    for lp in pruned:
        assert lp.form in FORMS and len(res.model.get_submodule(lp.name)) == (3 if lp.form == "three" else 2)
        own = sum(r.params for n, r in meta_free.items() if n.startswith(lp.name + "."))
        assert own == lp.params
        if steps == 1:  # the cheapest allowed form (a later step keeps the core's directions: not checked)
            m = metas[lp.name]
            cheapest = min(kfe_cost(m, lp.r_in, lp.r_out, f)[metric == "macs"] for f in allowed_forms(m))
            assert (lp.macs if metric == "macs" else lp.params) == cheapest
            assert lp.form != "fold_out" or lp.r_out == lp.d_out
            assert lp.form != "fold_in" or lp.r_in == lp.d_in
    with torch.no_grad():
        assert torch.isfinite(res.model(batches[1][0])).all()


def test_folded_layers_save_load_and_train(tmp_path):
    """A result with folded layers loads into the same shapes (the plan's forms) and gives the same
    outputs; the folded core trains, frozen rotations stay frozen."""
    torch.manual_seed(0)
    model = build_model("vgg_small", 10).eval()
    batches = _batches()
    res = raykfe.prune(model, batches, target="flops:0.8", rank="score", freeze_rotations=True)
    folded = [lp.name for lp in res.plan.layers.values() if lp.action == "kfe" and lp.form != "three"]
    assert folded
    back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=model)
    assert [lp.form for lp in back.plan.layers.values()] == [lp.form for lp in res.plan.layers.values()]
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(batches[1][0]), res.model.eval()(batches[1][0]), rtol=1e-5, atol=1e-5)
    for name in folded:
        layer = back.model.get_submodule(name)
        assert layer.core.weight.requires_grad
        assert all(not p.requires_grad for sub in rotations(layer) for p in sub.parameters())
