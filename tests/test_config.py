"""Job configs: YAML + key=value overrides, typed, validated, with errors that name the field."""

from __future__ import annotations

import pytest
import yaml

from raykfe import ConfigError
from raykfe.config import JobConfig, apply_overrides, config_from_dict, config_to_dict, load_config
from raykfe.plan import Target, parse_target


def test_defaults_and_digits_job_load(tmp_path):
    cfg = load_config("jobs/digits.yaml")
    assert cfg.data.name == "digits" and cfg.prune.target == "flops:0.7"
    # the resolved config round-trips through YAML
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("jobs/digits.yaml", ["prune.target=params:0.4", "finetune.epochs=3", "prune.exclude=[conv1, fc]",
                                            "model.weights=null", "finetune.milestones=[0.3]", "prune.include_classifier=true"])
    assert cfg.prune.target == "params:0.4"
    assert cfg.finetune.epochs == 3 and cfg.finetune.lr == load_config("jobs/digits.yaml").finetune.lr
    assert cfg.prune.exclude == ("conv1", "fc")
    assert cfg.finetune.milestones == (0.3,)
    assert cfg.prune.include_classifier is True


def test_section_defaults_are_the_job_defaults():
    # setting one base key keeps the other job-level base defaults
    cfg = config_from_dict({"base": {"epochs": 2}})
    assert cfg.base.epochs == 2 and cfg.base.lr == JobConfig().base.lr


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["prune.targt=flops:0.5"], "did you mean 'prune.target'"),
        (["modle.name=x"], "did you mean 'model'"),
        (["seed=1.5"], "seed"),
        (["base.epochs=-1"], "base.epochs"),
        (["finetune.lr=0"], "finetune.lr"),
        (["prune.max_layer_ratio=1.5"], "prune.max_layer_ratio"),
        (["stats.fisher=exact"], "stats.fisher"),
        (["stats.conv_mode=big"], "stats.conv_mode"),
        (["prune.include_classifier=maybe"], "prune.include_classifier"),
        (["prune.target=flops:0"], "outside (0, 1)"),
        (["novalue"], "key=value"),
        (["model=3"], "model"),
    ],
)
def test_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config("jobs/digits.yaml", overrides)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_targets():
    assert parse_target("flops:0.5") == Target("flops", 0.5)
    assert parse_target(" PARAMS:0.25") == Target("params", 0.25)
    assert str(parse_target("directions:0.3")) == "directions:0.3"
    for bad in ["flops", "flops:abc", "flops:1", "flops:-0.1", "flops:nan", "x:0.5", "flops:0.5:1", 0.5]:
        with pytest.raises(ConfigError):
            parse_target(bad)


def test_apply_overrides_does_not_mutate_input():
    raw = {"prune": {"target": "flops:0.5"}}
    out = apply_overrides(raw, ["prune.target=flops:0.6"])
    assert raw["prune"]["target"] == "flops:0.5" and out["prune"]["target"] == "flops:0.6"


def test_job_identity_ignores_run_only_fields_and_fills_newer_defaults():
    """A result stored before a field existed, or run with other data workers, is the same job;
    a change in what is computed is not."""
    from raykfe.config import config_to_dict
    from raykfe.stages import job_identity as _job_identity

    full = config_to_dict(load_config("jobs/digits.yaml"))
    old = {k: v for k, v in full.items() if k != "latency"}
    old["data"] = {k: v for k, v in full["data"].items() if k not in ("access", "workers")}
    assert _job_identity(old) == _job_identity(full)
    faster = {**full, "data": {**full["data"], "workers": 7}}
    assert _job_identity(faster) == _job_identity(full)
    other = {**full, "prune": {**full["prune"], "target": "flops:0.3"}}
    assert _job_identity(other) != _job_identity(full)
