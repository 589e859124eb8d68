"""Infeasible Ray requests fail fast with one line (issue 16, item 1): the packing rule on node
totals, the wait for an autoscaler, and the CLI on the real shared cluster (4 CPUs, no GPU)."""

from __future__ import annotations

import pytest

from raykfe.config import load_config
from raykfe.distributed.resources import Demand, check_job, job_demands, packs, shortfall
from raykfe.errors import ConfigError

from test_cli import TINY, run_cli


def _cfg(*extra: str):
    return load_config("jobs/digits.yaml", ["runtime=ray", *extra])


def test_packing_uses_each_nodes_totals():
    two = Demand("Train workers", 2, {"CPU": 2.0, "GPU": 1.0}, {})
    assert packs(two, [{"CPU": 4, "GPU": 2}])
    assert packs(two, [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}])
    assert not packs(two, [{"CPU": 4, "GPU": 1}, {"CPU": 8}])  # one GPU too few
    # enough CPUs in total, but no node holds a 3-CPU bundle
    three = Demand("Train workers", 2, {"CPU": 3.0, "GPU": 0.0}, {})
    assert not packs(three, [{"CPU": 2}, {"CPU": 2}, {"CPU": 2}]) and not shortfall(three, {"CPU": 6})
    assert packs(three, [{"CPU": 3}, {"CPU": 2}, {"CPU": 3}])
    assert packs(Demand("x", 1, {"CPU": 0.5, "GPU": 0.0}, {}), [{"CPU": 0.5}])


def test_demands_follow_the_config():
    d = {x.what: x for x in job_demands(_cfg("ray.workers=3", "ray.use_gpu=true", "ray.actor_gpus=0.5"), sweep=True)}
    assert d["Train workers"].count == 3 and d["Train workers"].shape == {"CPU": 1.0, "GPU": 1.0}
    assert d["eigen actor"].shape["GPU"] == 0.5 and "sweep trial" in d
    assert job_demands(_cfg("runtime=local")) == []  # a local job asks Ray for nothing


def test_fixed_cluster_fails_at_once_naming_the_key():
    cfg = _cfg("ray.use_gpu=true")
    with pytest.raises(ConfigError) as exc:
        check_job(cfg, nodes=lambda: [{"CPU": 4.0}], limits=lambda: None, sleep=pytest.fail)
    msg = str(exc.value)
    assert "2 Train workers x {CPU: 1, GPU: 1}" in msg and "GPU: 0 (no autoscaler)" in msg and "ray.use_gpu=false" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"ray.workers / ray.cpus_per_worker"):
        check_job(_cfg("ray.workers=9"), nodes=lambda: [{"CPU": 4.0}], limits=lambda: None, sleep=pytest.fail)
    with pytest.raises(ConfigError, match=r"eigen actor x \{CPU: 8, GPU: 0\}.*ray.actor_cpus"):
        check_job(_cfg("ray.actor_cpus=8"), nodes=lambda: [{"CPU": 4.0}], limits=lambda: None, sleep=pytest.fail)
    check_job(_cfg(), nodes=lambda: [{"CPU": 4.0}], limits=lambda: None, sleep=pytest.fail)  # fits: no wait


def test_autoscaler_waits_then_fails_or_proceeds():
    """With an autoscaler, a demand within its maxima waits (progress lines) for nodes to join; one
    beyond them fails at once; the wait ends with the same one-line error after resource_wait_s."""
    cfg = _cfg("ray.use_gpu=true", "ray.resource_wait_s=60")
    logs, clock = [], []
    state = {"nodes": [{"CPU": 4.0}]}

    def sleep(s):
        clock.append(s)
        if sum(clock) >= 20:  # a GPU node joins after 20 s
            state["nodes"] = [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}]

    check_job(cfg, nodes=lambda: list(state["nodes"]), limits=lambda: {"CPU": 64.0, "GPU": 8.0}, sleep=sleep, log=logs.append)
    assert sum(clock) == 20 and logs and "waiting for the autoscaler" in logs[0] and "ray.resource_wait_s" in logs[0]
    clock.clear()
    with pytest.raises(ConfigError, match="cannot add them in time"):
        check_job(cfg, nodes=lambda: [{"CPU": 4.0}], limits=lambda: {"CPU": 64.0, "GPU": 8.0},
                  sleep=clock.append, log=logs.append)
    assert sum(clock) == 60
    with pytest.raises(ConfigError, match="ray.use_gpu=false"):  # the autoscaler can never add a GPU
        check_job(cfg, nodes=lambda: [{"CPU": 4.0}], limits=lambda: {"CPU": 64.0}, sleep=pytest.fail)


@pytest.mark.parametrize("overrides,needle", [
    (["ray.use_gpu=true"], "GPU: 0 (no autoscaler): change ray.use_gpu=false"),
    (["ray.workers=9"], "asks for 9 Train workers x {CPU: 1, GPU: 0}"),
], ids=["gpu", "workers"])
def test_cli_on_the_real_cluster_fails_in_seconds(ray_cluster, tmp_path, overrides, needle):
    gcs = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "never"
    proc = run_cli("prune", "-c", "jobs/digits.yaml", *TINY, "runtime=ray", f"ray.address={gcs}",
                   f"output.uri={out}", *overrides)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("raykfe: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
