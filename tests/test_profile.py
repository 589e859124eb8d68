"""Measured latency as a cost (issue 14, item 2): the primitives a form runs are the layers surgery
builds, the table interpolates exactly what it should, is kept and reused in storage (local and
S3), and ``forms="latency"`` builds every layer in the form the table says is fastest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import raykfe
from raykfe.capture import layer_metas, prunable_layers
from raykfe.models import build_model
from raykfe.plan import FORMS, allowed_forms
from raykfe.profile import (Geometry, LatencyTable, _sig_key, device_key, form_ops, geometries, grid_points,
                            needed_signatures, table_for)
from raykfe.surgery import to_form

from test_cli import run_cli
from test_forms import CONVS, DT, _random_kfe


@pytest.fixture(autouse=True)
def _fresh_memory():
    """Each test starts with no table in the process's memory (tables saved without a URI)."""
    import raykfe.profile as prof

    prof._MEMORY.clear()
    yield
    prof._MEMORY.clear()


def _recorded(module: nn.Module, x: torch.Tensor) -> list[tuple]:
    """(signature, c_in, c_out) of every Conv2d / Linear the module runs, in order, from hooks."""
    seen = []

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
            sig = ("conv", *m.kernel_size, *m.stride, *((pad,) if isinstance(pad, str) else pad), *m.dilation,
                   *inp[0].shape[2:])
            seen.append((sig, m.in_channels, m.out_channels))
        elif isinstance(m, nn.Linear):
            seen.append((("linear", int(np.prod(inp[0].shape[1:-1])) if inp[0].dim() > 2 else 1), m.in_features, m.out_features))

    hs = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module(x)
    for h in hs:
        h.remove()
    return seen


@pytest.mark.parametrize("spec", CONVS, ids=[f"{c[7]}-k{c[2]}s{c[3]}p{c[4]}d{c[5]}" for c in CONVS])
def test_form_ops_are_the_layers_surgery_builds(spec):
    c_in, c_out, k, stride, pad, dil, bias, mode = spec
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, bias=bias).to(DT)
    lp, shell = _random_kfe(conv, mode, seed=k + stride)
    x = torch.randn(2, c_in, 9, 8, dtype=DT)
    out_hw = tuple(conv(x).shape[2:])
    g = Geometry("conv", mode, c_in, c_out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, (9, 8), out_hw)
    meta = {"kind": "conv", "mode": mode, "fold_bias": lp.fold_bias}
    assert _recorded(conv, x) == form_ops(g, lp.r_in, lp.r_out, "dense")
    for form in allowed_forms(meta):
        assert _recorded(to_form(shell, form), x) == form_ops(g, lp.r_in, lp.r_out, form), form


def test_form_ops_of_a_linear_over_tokens():
    lin = nn.Linear(9, 6).to(DT)
    lp, shell = _random_kfe(lin, "patch", seed=2)
    x = torch.randn(2, 5, 9, dtype=DT)  # [batch, tokens, features]
    g = Geometry("linear", "patch", 9, 6, tokens=5)
    for form in FORMS:
        assert _recorded(to_form(shell, form), x) == form_ops(g, lp.r_in, lp.r_out, form)


def test_grid_points():
    for n in (1, 2, 5, 6, 7, 64, 2048):
        pts = grid_points(n)
        assert pts[0] == 1 and pts[-1] == n and pts == sorted(set(pts)) and len(pts) <= 6


def _bilinear_table(need: dict, f) -> LatencyTable:
    t = LatencyTable("cpu", 1, 4)
    for sig, (a, b) in need.items():
        xs, ys = grid_points(a), grid_points(b)
        t.grids[_sig_key(sig)] = {"c_in": xs, "c_out": ys, "ms": [[f(sig, x, y) for y in ys] for x in xs]}
    return t


def test_interpolation_is_exact_for_a_bilinear_cost_and_clamped_outside():
    sig = ("conv", 3, 3, 1, 1, 1, 1, 1, 1, 8, 8)
    f = lambda s, x, y: 0.3 + 0.02 * x + 0.05 * y + 0.001 * x * y  # noqa: E731
    t = _bilinear_table({sig: (100, 37)}, f)
    rng = np.random.default_rng(0)
    for x, y in zip(rng.integers(1, 101, 50), rng.integers(1, 38, 50)):
        assert t.ms(sig, int(x), int(y)) == pytest.approx(f(sig, x, y), rel=1e-12)
    assert t.ms(sig, 500, 37) == pytest.approx(f(sig, 100, 37))  # clamped at the grid's end
    assert t.covers(sig, 100, 37) and not t.covers(sig, 101, 37)


def test_table_is_stored_reused_and_completed(tmp_path):
    """Kept under the URI, keyed by device / threads / batch; a second job times nothing; a model
    needing more signatures or widths times only those."""
    torch.manual_seed(0)
    small, wide = build_model("vgg_tiny", 10).eval(), build_model("vgg_small", 10).eval()
    x = torch.zeros(1, 3, 16, 16)
    metas = lambda m: layer_metas(m, x, prunable_layers(m, x)[0])  # noqa: E731
    uri = str(tmp_path / "tables")
    t1, geos = table_for(small, metas(small), uri=uri, threads=1, batch=2, repeats=1)
    assert t1.measured > 0 and set(geos) == set(metas(small))
    doc = json.loads((tmp_path / "tables" / device_key("cpu", 1, 2)).read_text())
    assert doc["batch"] == 2 and doc["threads"] == 1 and set(doc["grids"]) == set(t1.grids)
    t2, _ = table_for(small, metas(small), uri=uri, threads=1, batch=2, repeats=1)
    assert t2.measured == 0 and t2.grids == t1.grids
    t3, geos3 = table_for(wide, metas(wide), uri=uri, threads=1, batch=2, repeats=1)
    missing = {s: w for s, w in needed_signatures(geos3).items() if not t1.covers(s, *w)}
    assert missing and t3.measured == sum(len(grid_points(a)) * len(grid_points(b)) for a, b in missing.values())
    assert table_for(small, metas(small), uri=uri, threads=1, batch=4, repeats=1)[0].measured > 0  # another batch
    assert all(p.name.startswith("latency-cpu-") for p in (tmp_path / "tables").iterdir())


def test_table_round_trips_through_s3(s3_server):
    t = LatencyTable("cpu", 2, 8)
    t.grids["conv,1,1,1,1,0,0,1,1,4,4"] = {"c_in": [1, 3], "c_out": [1, 2], "ms": [[0.1, 0.2], [0.3, 0.4]]}
    t.measured = 4
    uri = s3_server.uri("latency-tables")
    t.save(uri)
    back = LatencyTable.load(uri, "cpu", 2, 8)
    assert back.grids == t.grids


def test_latency_forms_follow_the_table():
    """With a table in which the 1x1 rotations are costly, every pruned layer is built in the form
    (or left dense) the table says is fastest, and the target is still met exactly."""
    torch.manual_seed(0)
    model = build_model("vgg_small", 10).eval()
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(2)]
    x = batches[0][0][:1]
    metas = layer_metas(model, x, prunable_layers(model, x)[0])
    geos = geometries(model, metas)

    def cost(sig, ci, co):  # per primitive: a launch, plus MACs; 1x1 convs pay a large fixed cost
        hw = sig[-1] * sig[-2]
        return (5.0 if sig[1] == 1 else 0.1) + 1e-5 * ci * co * sig[1] * sig[2] * hw

    table = _bilinear_table(needed_signatures(geos), cost)
    table.save(None)  # the process's memory: what forms=latency reads when no URI is set
    res = raykfe.prune(model, batches, target="flops:0.6", forms="latency", latency_batch=4, latency_threads=1,
                       rank="score")
    assert res.plan.summary.achieved >= 0.6
    cheapest = raykfe.prune(model, batches, target="flops:0.6", forms="cheapest", rank="score")
    chosen = {}
    for name, lp in res.plan.layers.items():
        if name not in geos or lp.action != "kfe":
            continue
        g = geos[name]
        chosen[name] = lp.form
        dense = table.layer_ms(g, g.c_in, g.c_out, "dense")
        if lp.form == "three":  # both sides' kept counts are the ones the choice was made at
            times = {f: table.layer_ms(g, lp.r_in, lp.r_out, f) for f in ("dense", *allowed_forms(metas[name]))}
            assert times["three"] <= min(times.values()), (name, times)
        else:  # a folded side keeps all of its directions: the form beat the dense layer
            assert table.layer_ms(g, lp.r_in, lp.r_out, lp.form) < dense, (name, lp.form)
    assert chosen and any(f != "three" for f in chosen.values())
    assert chosen != {n: lp.form for n, lp in cheapest.plan.layers.items() if n in chosen}  # the table decided


@pytest.mark.slow
def test_profile_cli_stores_and_reuses(tmp_path):
    uri = tmp_path / "tables"
    args = ["profile", "-c", "jobs/digits.yaml", "model.name=resnet8", "data.image_size=16", "latency.batch=2",
            "latency.threads=1", f"latency.table={uri}", "--quiet"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "fastest" in first.stdout and "layer1.0.conv1" in first.stdout and "stored under" in first.stdout
    assert len(list(uri.iterdir())) == 1
    again = run_cli(*args)
    assert again.returncode == 0 and "0 width pairs timed now" in again.stdout
    bad = run_cli("profile", "-c", "jobs/digits.yaml", "latency.batch=0")
    assert bad.returncode == 2 and "latency.batch" in bad.stderr and "Traceback" not in bad.stderr


def _vgg_setup():
    torch.manual_seed(0)
    model = build_model("vgg_small", 10).eval()
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))) for _ in range(2)]
    x = batches[0][0][:1]
    metas = layer_metas(model, x, prunable_layers(model, x)[0])
    return model, batches, x, metas, geometries(model, metas)


def _launch_cost(sig, ci, co):
    hw = sig[-1] * sig[-2]
    return (5.0 if sig[1] == 1 else 0.1) + 1e-5 * ci * co * sig[1] * sig[2] * hw


def test_latency_target_prediction_is_the_tables_sum():
    """The selection's predicted fraction for latency:F is 1 - (rest + sum of the chosen forms'
    table times) / (rest + sum of the dense times), rest = the base's time minus the dense sum;
    the target is met as predicted."""
    from raykfe.counting import count
    from raykfe.plan import select

    model, batches, x, metas, geos = _vgg_setup()
    table = _bilinear_table(needed_signatures(geos), _launch_cost)
    rng = np.random.default_rng(0)
    scores = {n: (rng.random(metas[n]["d_out"]), rng.random(metas[n]["d_in"])) for n in metas}
    base = count(model, x)
    dense = sum(table.layer_ms(g, g.c_in, g.c_out, "dense") for g in geos.values())
    base_ms = dense + 10.0  # the rest of the model: pooling, BatchNorm, the classifier
    layers, summary = select(scores, metas, "latency:0.3", base_params=base.params, base_macs=base.macs,
                             latency=(table, geos, base_ms))
    now = sum(table.layer_ms(geos[n], lp.r_in, lp.r_out, lp.form) if lp.action == "kfe"
              else table.layer_ms(geos[n], geos[n].c_in, geos[n].c_out, "dense") for n, lp in layers.items() if n in geos)
    rest = base_ms - dense
    assert summary["achieved"] == pytest.approx(1 - (rest + now) / (rest + dense), rel=1e-9)
    assert summary["achieved"] >= 0.3


def test_latency_target_is_measured_and_reported():
    """latency:F builds plans, times each against the base end to end, and keeps the measured
    figure: the plan's achieved fraction is 1 - pruned / base of its step record (no threshold on
    the timings themselves: the machine is shared)."""
    from raykfe.engine import LATENCY_PROBES

    model, batches, x, metas, geos = _vgg_setup()
    res = raykfe.prune(model, batches, target="latency:0.3", latency_batch=4, latency_threads=1, rank="score")
    rec = res.plan.steps[0]["latency"]
    assert res.plan.target == "latency:0.3" and rec["batch"] == 4 and rec["device"] == "cpu"
    assert res.plan.summary.achieved == pytest.approx(1 - rec["pruned_ms"] / rec["base_ms"])
    assert rec["measured"] == res.plan.summary.achieved and 1 <= len(rec["probes"]) <= LATENCY_PROBES
    met = [a for a, m in rec["probes"] if m >= 0.3]
    assert rec["asked"] == (min(met) if met else max(rec["probes"], key=lambda p: p[1])[0])
    assert rec["predicted"] >= rec["asked"]  # the selection met the fraction it was asked for, as predicted
    assert res.plan.summary.within_tolerance == (abs(rec["measured"] - 0.3) <= 0.02)


@pytest.mark.parametrize("kw,needle", [
    ({"method": "c-obd"}, "one-shot KFE methods"),
    ({"steps": 2}, "one step"),
])
def test_latency_target_refusals(kw, needle):
    model, batches, *_ = _vgg_setup()
    with pytest.raises(raykfe.ConfigError, match=needle):
        raykfe.prune(model, batches, target="latency:0.3", **kw)


def test_rounded():
    from raykfe.plan import rounded

    assert [rounded(k, 30, 8) for k in (0, 1, 8, 9, 23, 24, 25, 30)] == [0, 8, 8, 16, 24, 24, 30, 30]
    assert all(rounded(k, 30, 1) == k for k in range(31))


@pytest.mark.parametrize("n", [4, 8])
def test_round_to_keeps_multiples_and_meets_the_target(n):
    """Every side a pruned layer keeps (not folded) holds a multiple of n directions or all of
    them, in three layers and in the cheapest forms; the target is still met exactly."""
    model, batches, x, metas, geos = _vgg_setup()
    for forms in ("three", "cheapest"):
        res = raykfe.prune(model, batches, target="flops:0.6", round_to=n, rank="score", forms=forms)
        assert res.plan.summary.achieved >= 0.6
        for name, lp in res.plan.layers.items():
            if lp.action != "kfe":
                continue
            if lp.form != "fold_in":
                assert lp.r_in % n == 0 or lp.r_in == lp.d_in, (name, lp.r_in)
            if lp.form != "fold_out":
                assert lp.r_out % n == 0 or lp.r_out == lp.d_out, (name, lp.r_out)
        assert any(lp.action == "kfe" for lp in res.plan.layers.values())


def test_latency_target_with_grouped_convs_is_refused_in_one_line():
    """A hybrid plan (depthwise convs lose channels) has units the latency table does not time:
    the selection refuses it at once (not taken for an unreachable fraction and searched)."""
    torch.manual_seed(0)
    model = build_model("mobilenet_small", 10).eval()
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.raises(raykfe.ConfigError, match="latency targets do not cover channel units"):
        raykfe.prune(model, batches, target="latency:0.3", latency_batch=2, latency_threads=1, rank="score")


def test_a_regrid_never_loses_the_widths_the_table_covered():
    """A signature needed wider on one axis only is re-timed to the larger widths of both."""
    sig = ("conv", 1, 1, 1, 1, 0, 0, 1, 1, 4, 4)
    t = LatencyTable("cpu", 1, 1, repeats=1)
    t.ensure({sig: (3, 40)})
    t.ensure({sig: (9, 2)})
    assert t.covers(sig, 9, 40)
    assert t.measured == len(grid_points(3)) * len(grid_points(40)) + len(grid_points(9)) * len(grid_points(40))
