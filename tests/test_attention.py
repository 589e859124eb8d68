"""Attention in the KFE methods: raykfe's :class:`Attention` against ``nn.MultiheadAttention`` and its
:class:`WindowAttention` against torchvision's Swin ``ShiftedWindowAttention``.

* the same function in float64, every calling convention (batched / unbatched, ``batch_first``
  both ways, ``kdim`` / ``vdim``, bias or not, boolean and float masks, per-head masks, the causal
  hint, weights averaged or per head, none asked);
* an ``nn.MultiheadAttention`` state_dict loads into it (pretrained torchvision weights);
* a torchvision VisionTransformer: EigenDamage now rebuilds its q / k / v / out projections,
  the rebuilt model loads back into an UNconverted ViT through the plan (the checkpoint path),
  and it exports (ExportedProgram, TorchScript, ONNX) with outputs checked against it.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import raykfe
from raykfe.attention import Attention, attention_names, convert_attention, from_mha
from raykfe.export import export_bytes
from raykfe.models import build_model
from raykfe.surgery import rebuild

E, H = 12, 3


def _inputs(batched: bool, batch_first: bool, kdim: int, vdim: int, L: int = 5, S: int = 6, B: int = 4):
    g = torch.Generator().manual_seed(1)

    def t(n, d):
        shape = (n, d) if not batched else ((B, n, d) if batch_first else (n, B, d))
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    kpm = torch.rand(*((B, S) if batched else (S,)), generator=g) < 0.3
    kpm[..., 0] = False  # every query attends to something (a fully masked row is NaN in both)
    per_head = torch.rand(B * H if batched else H, L, S, generator=g) < 0.3
    per_head[..., 0] = False
    calls = [
        {},
        {"key_padding_mask": kpm},
        {"key_padding_mask": torch.randn(kpm.shape, generator=g, dtype=torch.float64)},
        {"attn_mask": torch.randn(L, S, generator=g, dtype=torch.float64)},
        {"attn_mask": per_head, "key_padding_mask": kpm},
        {"need_weights": False},
        {"average_attn_weights": False, "key_padding_mask": kpm},
        {"attn_mask": torch.ones(L, S, dtype=torch.bool).triu(1), "is_causal": True, "need_weights": False},
    ]
    return t(L, E), t(S, kdim), t(S, vdim), calls


@pytest.mark.parametrize("batch_first,kv,bias,batched", list(itertools.product([True, False], [None, (5, 7)], [True, False], [True, False])))
def test_attention_computes_what_multihead_attention_computes(batch_first, kv, bias, batched):
    torch.manual_seed(0)
    kdim, vdim = kv or (E, E)
    mha = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float64).eval()
    att = from_mha(mha)
    assert all(type(getattr(att, p)) is nn.Linear for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    q, k, v, calls = _inputs(batched, batch_first, kdim, vdim)
    for kw in calls:
        want, want_w = mha(q, k, v, **kw)
        got, got_w = att(q, k, v, **kw)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=str(kw))
        assert (got_w is None) == (want_w is None)
        if want_w is not None:
            assert got_w.shape == want_w.shape
            torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-12)


def test_dropout_training_mode_and_the_causal_hint():
    mha = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True, dtype=torch.float64)
    att = from_mha(mha)
    assert att.training and att.dropout == 0.5
    x = torch.randn(2, 4, E, dtype=torch.float64)
    torch.manual_seed(3)
    a = att(x, x, x)[0]
    torch.manual_seed(4)
    assert not torch.allclose(a, att(x, x, x)[0])  # dropout on the weights in training
    att.eval(), mha.eval()
    torch.testing.assert_close(att(x, x, x)[0], mha(x, x, x)[0], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="attn_mask"):
        att(x, x, x, is_causal=True)


def test_multihead_attention_state_dicts_load_and_odd_modules_are_left_alone():
    torch.manual_seed(0)
    for kdim in (None, 5):
        mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, dtype=torch.float64).eval()
        att = Attention(E, H, kdim=kdim, vdim=kdim, dtype=torch.float64).eval()
        att.load_state_dict(mha.state_dict())  # strict: every key is mapped
        x, kv = torch.randn(3, 2, E, dtype=torch.float64), torch.randn(4, 2, kdim or E, dtype=torch.float64)
        torch.testing.assert_close(att(x, kv, kv)[0], mha(x, kv, kv)[0], rtol=0, atol=1e-12)
    odd = nn.Sequential(nn.MultiheadAttention(E, H, add_bias_kv=True), nn.MultiheadAttention(E, H, add_zero_attn=True))
    assert attention_names(odd) == [] and convert_attention(odd) == []
    assert all(type(m) is nn.MultiheadAttention for m in odd)


def _vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                             num_classes=10).eval()


def test_build_model_converts_torchvision_attention_and_pretrained_weights_still_load():
    ref = _vit()
    model = build_model("vit_b_16", 10)  # the registry's torchvision ViT
    assert attention_names(model) == [] and any(isinstance(m, Attention) for m in model.modules())
    converted = _vit()
    assert convert_attention(converted) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    converted.load_state_dict(ref.state_dict())  # a torchvision checkpoint of the unconverted model
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(converted(x), ref(x), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pruned_vit():
    model = _vit()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, raykfe.prune(model, batches, method="eigendamage", target="params:0.5")


def test_eigendamage_prunes_the_attention_projections_of_a_vit(pruned_vit):
    model, res = pruned_vit
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())  # the caller's model is unchanged
    assert res.plan.summary.within_tolerance and res.plan.params_reduction >= 0.5
    projections = [n for n in res.plan.layers if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert len(projections) == 8
    assert sum(res.plan.layers[n].action == "kfe" for n in projections) >= 4  # the attention is pruned, not dense
    assert raykfe.count(res.model, torch.zeros(1, 3, 32, 32)).params == res.plan.params
    # the checkpoint path: the plan rebuilds an UNconverted ViT into the pruned structure
    again = rebuild(_vit(), res.plan)
    again.load_state_dict(res.model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x), res.model.eval()(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
def test_pruned_vit_exports(pruned_vit, fmt):
    _, res = pruned_vit
    data, worst, out_shape = export_bytes(res.model, fmt, [3, 32, 32])
    assert data and out_shape == [10] and worst < 1e-4


# --------------------------------------------------------------------------- Swin's windowed attention


@pytest.mark.parametrize("shift,hw,bias", list(itertools.product([[0, 0], [2, 2]], [(8, 8), (7, 9), (3, 5)], [True, False])))
def test_window_attention_computes_what_torchvision_computes(shift, hw, bias):
    """Shifted and plain windows, maps that need padding (7x9, 3x5) and maps smaller than a window."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    from raykfe.attention import WindowAttention, from_window_attention

    torch.manual_seed(0)
    ref = ShiftedWindowAttention(12, [4, 4], shift, 3, qkv_bias=bias, proj_bias=bias).double().eval()
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
    att = from_window_attention(ref)
    assert type(att) is WindowAttention and att.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, *hw, 12, dtype=torch.float64)
    torch.testing.assert_close(att(x), ref(x), rtol=0, atol=1e-12)


def _swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10).eval()


def test_eigendamage_prunes_swin_attention_and_the_plan_rebuilds_it():
    model = _swin()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    converted = _swin()
    assert len(convert_attention(converted)) == 4
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted(x), model(x), rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(model, batches, method="eigendamage", target="params:0.4")
    attn = [n for n in res.plan.layers if n.rsplit(".", 1)[-1] in ("qkv", "proj")]
    assert len(attn) == 8 and sum(res.plan.layers[n].action == "kfe" for n in attn) >= 2
    again = rebuild(_swin(), res.plan)
    again.load_state_dict(res.model.state_dict())
    torch.testing.assert_close(again.eval()(x), res.model.eval()(x), rtol=0, atol=0)
    data, worst, _ = export_bytes(res.model, "pt2", [3, 32, 32])
    assert data and worst < 1e-4


# --------------------------------------------------------------------------- rebuilt attention, factors


def test_rebuilt_attention_with_nothing_pruned_equals_the_original_in_float64():
    """Every projection of a converted ViT and a converted Swin in three-layer form with all
    directions kept: the same function as the unconverted torchvision model to 1e-10."""
    from test_surgery import nothing_pruned_plan

    from raykfe.surgery import KFELinear, apply_plan

    for build, names in ((_vit, ("q_proj", "k_proj", "v_proj", "out_proj")), (_swin, ("qkv", "proj"))):
        ref = build().double()
        model = build().double()
        convert_attention(model)
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
        plan, weights = nothing_pruned_plan(model, x, y)
        rebuilt = [n for n in plan.layers if n.rsplit(".", 1)[-1] in names]
        assert len(rebuilt) == 8  # ViT: 2 blocks x 4 projections; Swin: 4 blocks x 2
        new = apply_plan(model, plan, weights).eval()
        assert all(isinstance(new.get_submodule(n), KFELinear) for n in rebuilt)
        with torch.no_grad():
            torch.testing.assert_close(new(x), ref(x), rtol=0, atol=1e-10)


def test_attention_factors_equal_a_per_example_brute_force():
    """K-FAC factors of a ViT's q / k / v / out projections (empirical Fisher, float64): A is the
    per-example mean over tokens of the projection's input (with a 1 appended for the bias), S
    the per-example sum over tokens of the gradient of the example's loss w.r.t. the projection's
    output, both averaged over the examples; brute force by one autograd call per example."""
    model = _vit().double()
    convert_attention(model)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (3,), generator=g)
    names = [f"encoder.layers.encoder_layer_0.self_attention.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    stats = raykfe.collect_factors(model, [(x, y)], fisher="empirical", layers=names)
    for name in names:
        mod = model.get_submodule(name)
        A = torch.zeros(mod.in_features + 1, mod.in_features + 1, dtype=torch.float64)
        S = torch.zeros(mod.out_features, mod.out_features, dtype=torch.float64)
        for n in range(3):
            seen = {}
            h = mod.register_forward_hook(lambda m, i, o: seen.update(a=i[0].detach(), s=o))
            loss = torch.nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1], reduction="sum")
            h.remove()
            (gs,) = torch.autograd.grad(loss, seen["s"])
            a = torch.cat([seen["a"][0], torch.ones(seen["a"].shape[1], 1, dtype=torch.float64)], dim=1)  # [T, d_in + 1]
            A += a.T @ a / a.shape[0]
            S += gs[0].T @ gs[0]
        torch.testing.assert_close(stats[name].A, A / 3, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(stats[name].S, S / 3, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- heads in the channel methods


def test_a_head_group_removes_heads_exactly():
    """A ViT's attention heads are one channel group per block (units: heads): removing heads 1
    and 3 equals zeroing their v rows (the head's output is then exactly zero), the module runs
    with 2 heads of the same width, and the exact cost model matches the counted model."""
    from raykfe.channels import ChannelGraph, apply_channels

    model = _vit().double()
    convert_attention(model)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    graph = ChannelGraph(model, x[:1])
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    heads = graph.group(f"{prefix}.q_proj")
    assert heads.size == 4 and {(m.module.rsplit(".", 1)[-1], m.kind) for m in heads.members} == {
        ("q_proj", "out"), ("k_proj", "out"), ("v_proj", "out"), ("out_proj", "in")}
    new = apply_channels(model, x[:1], {heads.name: [1, 3]})
    att = new.get_submodule(prefix)
    assert att.num_heads == 2 and att.q_proj.out_features == att.v_proj.out_features == att.out_proj.in_features == 16
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        v = zeroed.get_submodule(f"{prefix}.v_proj")
        for h in (1, 3):
            v.weight[h * 8:(h + 1) * 8] = 0
            v.bias[h * 8:(h + 1) * 8] = 0
        torch.testing.assert_close(new.eval()(x), zeroed(x), rtol=0, atol=1e-12)
    c = raykfe.count(new, x[:1])
    assert graph.cost({heads.name: 2}) == (c.params, c.macs)


@pytest.mark.parametrize("method", ["c-obd", "kron-obs", "l1", "sosp-h"])
def test_channel_methods_prune_a_vit_with_its_heads(method, tmp_path):
    model = _vit()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(model, batches, method=method, target="params:0.5")
    assert res.plan.space == "channels" and res.plan.params_reduction >= 0.5  # was refused: at most 0.384 (MLPs only)
    x = torch.randn(2, 3, 32, 32)
    back = raykfe.load(raykfe.save(res, str(tmp_path / "r")), model=_vit()).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), res.model.eval()(x), rtol=0, atol=0)
    assert export_bytes(res.model, "pt2", [3, 32, 32])[1] < 1e-4


def test_channel_methods_prune_swin_whose_patch_merging_repeats_channels():
    """Swin's patch merging concatenates four strided slices of one map: its stream groups are
    skipped with that reason (torch-pruning's slicing through it broke the LayerNorm after it),
    and a channel method prunes the MLP widths and the heads of the windowed attention."""
    from raykfe.channels import ChannelGraph

    model = _swin()
    convert_attention(model)
    x = torch.randn(1, 3, 32, 32)
    graph = ChannelGraph(model, x)
    assert any("concatenation of the same channels" in why for why in graph.skipped.values())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    res = raykfe.prune(_swin(), batches, method="l1", target="params:0.3")
    with torch.no_grad():
        assert res.model.eval()(x).shape == (1, 10)
    assert raykfe.count(res.model, x).params == res.plan.params
