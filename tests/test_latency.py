"""Latency figures of the job report: every model, batch and device present, models interleaved
and left where they were."""

from __future__ import annotations

import torch
from torch import nn

from raykfe.config import load_config
from raykfe.errors import ConfigError
from raykfe.latency import latency_profile


def test_profile_covers_every_model_and_batch_and_leaves_models_untouched():
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).train()
    big = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 5))
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in small.state_dict().items()}
    prof = latency_profile({"small": small, "big": big}, x, batches=(1, 4), repeats=3, threads=1)
    assert set(prof) == {"small", "big"}
    for per_dev in prof.values():
        assert set(per_dev) == {"cpu"}  # no GPU asked for
        assert set(per_dev["cpu"]) == {"1", "4"} and all(v > 0 for v in per_dev["cpu"].values())
    assert small.training, "the caller's model keeps its mode"
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    # a GPU is only timed when one exists
    gpu = latency_profile({"m": small}, x, batches=(1,), repeats=1, threads=1, gpu="cuda:0")
    assert set(gpu["m"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})


def test_latency_config_is_validated():
    cfg = load_config("jobs/digits.yaml", ["latency.batches=[1,8]", "latency.repeats=0"])
    assert cfg.latency.batches == (1, 8) and cfg.latency.repeats == 0
    for bad, needle in (("latency.batches=[0]", "latency.batches"), ("latency.repeats=-1", "latency.repeats")):
        try:
            load_config("jobs/digits.yaml", [bad])
        except ConfigError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
