"""collect_factors on hand-made shards: an example's label draw (true Fisher) is picked by its GLOBAL
index, so shards collected without ``(x, y, idx)`` batches must say where they start
(``first_index``); merging shards whose implicit index ranges overlap is refused instead of
silently reusing the same draws. Float64, against one pass over the concatenated data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import raykfe
from raykfe.distributed.collective import pack_triangles, unpack_triangles
from raykfe.errors import ConfigError
from raykfe.factors import LayerStats, stats_from_tensors, stats_to_tensors
from raykfe.stages import StageStore
from raykfe.storage import open_uri

DT = torch.float64
N = 24
BOUNDS = [(0, 3), (3, 5), (5, 9), (9, 16), (16, 24)]  # batches of 3, 2, 4, 7, 8 examples
SHARDS = [(0, 1), (1, 4), (4, 5)]  # batch ranges: shards of 3, 13 and 8 examples starting at 0, 3, 16

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 5, 5)).to(DT).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 3, 6, 5, dtype=DT, generator=g), torch.randint(0, 5, (N,), generator=g)
    return model, [(x[a:b], y[a:b]) for a, b in BOUNDS]


def shards(batches, with_idx=False):
    out = []
    for lo, hi in SHARDS:
        part = batches[lo:hi]
        if with_idx:
            start = BOUNDS[lo][0]
            part = [(x, y, torch.arange(start + sum(len(p[0]) for p in part[:i]), start + sum(len(p[0]) for p in part[: i + 1])))
                    for i, (x, y) in enumerate(part)]
        out.append(part)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_stats(got, want, tol=1e-12, what=""):
    assert list(got) == list(want), what
    for name in want:
        assert got[name].count == want[name].count, f"{what} {name}: count"
        for key in ("A_sum", "S_sum"):
            err = rel(getattr(got[name], key), getattr(want[name], key))
            assert err <= tol, f"{what} {name}.{key}: relative error {err:.3g}"


@pytest.mark.parametrize("mode", ["patch", "full"])
def test_shards_with_first_index_merge_to_the_single_pass(mode):
    model, batches = model_and_data()
    single = raykfe.collect_factors(model, batches, fisher="true", conv_mode=mode, seed=5)
    starts = [BOUNDS[lo][0] for lo, _ in SHARDS]
    parts = [raykfe.collect_factors(model, s, fisher="true", conv_mode=mode, seed=5, first_index=i0)
             for s, i0 in zip(shards(batches), starts)]
    assert [p["0"].meta["index_ranges"] for p in parts] == [[[0, 3]], [[3, 16]], [[16, 24]]]
    merged = raykfe.merge_stats(parts)
    assert_same_stats(merged, single, what="first_index shards")
    assert_same_stats(raykfe.merge_stats([parts[2], raykfe.merge_stats(parts[:2])]), single, what="other order")
    assert merged["0"].meta["index_ranges"] == single["0"].meta["index_ranges"] == [[0, N]]
    # (x, y, idx) batches with the global indices: the same statistics, no implicit range recorded
    explicit = [raykfe.collect_factors(model, s, fisher="true", conv_mode=mode, seed=5) for s in shards(batches, True)]
    assert all("index_ranges" not in p["0"].meta for p in explicit)
    assert_same_stats(raykfe.merge_stats(explicit), single, what="explicit-index shards")


def test_overlapping_implicit_shards_are_refused():
    model, batches = model_and_data()
    single = raykfe.collect_factors(model, batches, fisher="true", seed=5)
    parts = [raykfe.collect_factors(model, s, fisher="true", seed=5) for s in shards(batches)]  # all start at 0
    # why: every shard drew the labels of indices 0, 1, 2, ...: the summed S is not the single pass's
    naive = sum(p["3"].S_sum for p in parts)
    assert rel(naive, single["3"].S_sum) > 1e-3
    with pytest.raises(ConfigError, match="first_index=") as err:
        raykfe.merge_stats(parts)
    assert "\n" not in str(err.value) and "[0, 3)" in str(err.value)
    with pytest.raises(ConfigError, match="first_index"):
        parts[0]["0"].merge(parts[1]["0"])
    # a partial overlap is refused too; adjacent ranges merge into one
    a = raykfe.collect_factors(model, batches[:4], fisher="true", seed=5)  # [0, 16)
    b = raykfe.collect_factors(model, batches[4:], fisher="true", seed=5, first_index=10)  # [10, 18)
    with pytest.raises(ConfigError, match=r"\[10, 16\)"):
        raykfe.merge_stats([a, b])
    with pytest.raises(ConfigError, match="first_index=-1"):
        raykfe.collect_factors(model, batches, first_index=-1)
    # the empirical Fisher does not depend on indices: overlapping shards merge to the single pass
    emp = [raykfe.collect_factors(model, s, fisher="empirical") for s in shards(batches)]
    assert all("index_ranges" not in p["0"].meta for p in emp)
    assert_same_stats(raykfe.merge_stats(emp), raykfe.collect_factors(model, batches, fisher="empirical"), what="empirical")


def test_index_ranges_survive_the_stage_store_and_the_all_reduce_packing(tmp_path):
    model, batches = model_and_data()
    part = raykfe.collect_factors(model, batches[1:4], fisher="true", seed=5, first_index=3)
    store = StageStore(open_uri(str(tmp_path)))
    store.save("stats", *stats_to_tensors(part))
    back = stats_from_tensors(*store.load("stats"))
    for name in part:
        assert back[name].meta == part[name].meta and back[name].meta["index_ranges"] == [[3, 16]]
        assert torch.equal(back[name].A_sum, part[name].A_sum) and back[name].count == part[name].count
    with pytest.raises(ConfigError, match="first_index"):  # still refused after the round trip
        raykfe.merge_stats([back, raykfe.collect_factors(model, batches[:2], fisher="true", seed=5, first_index=10)])
    # the all-reduce unpacks sums and counts into the worker's own LayerStats: the meta stays
    flat, layout = pack_triangles(part)
    copy = {n: LayerStats(torch.zeros_like(st.A_sum), torch.zeros_like(st.S_sum), 0, dict(st.meta)) for n, st in part.items()}
    unpack_triangles(flat, layout, copy)
    assert all(copy[n].meta == part[n].meta and copy[n].count == part[n].count for n in part)
