"""raykfe sweep on the session's local Ray cluster: three targets on a tiny digits job, statistics
computed once and shared by every trial, the table / fronts / plot written, `raykfe report` on a
sweep and on a single job, a re-run reusing the finished trials."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from raykfe.config import expand_target, load_config
from raykfe.errors import ConfigError
from raykfe.pareto import pareto_front
from raykfe.stages import StageStore
from raykfe.storage import open_uri
from raykfe.sweep import family_of, run_sweep, trial_grid, trial_id

TINY = [
    "model.name=resnet8", "data.image_size=16", "base.epochs=1", "finetune.epochs=2", "stats.max_batches=2",
    "stats.batch_size=32", "progress=false", "runtime=local", "sweep.lr=[0.01]", "sweep.latency_repeats=3",
]


def test_targets_expand_and_grid_covers_every_combination():
    assert expand_target("flops:0.3..0.9/4") == ["flops:0.3", "flops:0.5", "flops:0.7", "flops:0.9"]
    assert expand_target("params:0.5") == ["params:0.5"]
    with pytest.raises(ConfigError, match="kind:A..B/N"):
        expand_target("flops:0.3..x/2")
    cfg = load_config("jobs/digits-sweep.yaml", ["sweep.methods=[eigendamage,kron-obd]", "sweep.lr=[0.01,0.003]"])
    grid = trial_grid(cfg)
    assert len(grid) == 2 * 4 * 2
    assert len({trial_id(t) for t in grid}) == len(grid)
    assert family_of("eigendamage", "patch") == family_of("eigendamage-iterative", "patch") == "kfac-patch"
    assert family_of("kron-obd", "patch") == family_of("c-obs", "patch") == "kfac-full"
    with pytest.raises(ConfigError, match="sweep.methods"):
        load_config("jobs/digits-sweep.yaml", ["sweep.methods=[magic]"])


def test_latency_targets_in_a_sweep_only_with_one_shot_kfe_methods(tmp_path):
    """A latency:F target is accepted for eigendamage; with a channel method the sweep is refused
    before anything starts or is written."""
    out = tmp_path / "never"
    ok = load_config("jobs/digits-sweep.yaml", ["sweep.methods=[eigendamage]", "sweep.targets=[latency:0.2..0.4/2]"])
    assert {t["target"] for t in trial_grid(ok)} == {"latency:0.2", "latency:0.4"}
    bad = load_config("jobs/digits-sweep.yaml", ["sweep.methods=[eigendamage,c-obd]", "sweep.targets=[latency:0.3]",
                                                 f"output.uri={out}"])
    with pytest.raises(ConfigError, match="latency:F target, which c-obd cannot use"):
        run_sweep(bad, log=lambda m: None)
    assert not out.exists()


def test_sweep_of_three_targets_shares_statistics_and_writes_front(ray_cluster, tmp_path, monkeypatch):
    job_file = Path("jobs/digits-sweep.yaml").resolve()
    monkeypatch.chdir(tmp_path)  # a RELATIVE output URI: trials run in other working directories
    out = tmp_path / "sweep"
    cfg = load_config(job_file, [*TINY, "sweep.targets=[flops:0.3..0.7/3]", "output.uri=sweep"])
    summary = run_sweep(cfg, log=lambda m: None)
    assert summary["trials"] == 3 and summary["errors"] == 0
    assert summary["done"] + summary["stopped"] == 3

    # statistics once: the family store holds them; no trial computed its own
    fam = StageStore(open_uri(str(out / "shared" / "kfac-patch")))
    assert fam.has_own("stats") and fam.has_own("eigen")
    assert StageStore(open_uri(str(out / "shared" / "base"))).has_own("base")
    trial_dirs = sorted((out / "trials").iterdir())
    assert len(trial_dirs) == 3
    for d in trial_dirs:
        st = StageStore(open_uri(str(d)))
        assert not st.has_own("stats") and not st.has_own("eigen") and not st.has_own("base")

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial"] for r in rows][0] == "base" and len(rows) == 4
    done = [r for r in rows if r["status"] == "done"]
    assert done, "at least the best trial runs to the end"
    for r in done:
        assert {"statistics", "eigen", "base"} <= set(r["reused_stages"].split(","))
        assert float(r["macs"]) > 0 and float(r["latency_ms"]) > 0
    # every finished trial met its target's MACs on the shared base
    base_macs = float(rows[0]["macs"])
    for r in done:
        assert abs(1 - float(r["macs"]) / base_macs - float(r["target"].split(":")[1])) <= 0.02
    front_md = (out / "front.md").read_text()
    assert "validation accuracy vs MACs" in front_md and "vs latency" in front_md
    front = pareto_front([{"trial": r["trial"], "val_acc": float(r["val_acc"]), "macs": float(r["macs"])} for r in rows
                          if r["macs"]], cost="macs")
    for f in front:
        assert f["trial"] in front_md
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    best = json.loads((out / "best.json").read_text())
    assert set(best) <= {"flops:0.3", "flops:0.5", "flops:0.7"} and best
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["kind"] == "raykfe.sweep"

    # raykfe report prints the sweep's table and fronts again; and a single job's report
    rep = subprocess.run([sys.executable, "-m", "raykfe.cli", "report", str(out)], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert "Pareto front" in rep.stdout and "flops:0.5" in rep.stdout
    one = done[0]["uri"]
    rep = subprocess.run([sys.executable, "-m", "raykfe.cli", "report", one], capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and "MACs" in rep.stdout and "bottleneck" in rep.stdout

    # a re-run reuses every finished trial (no statistics, no fine-tuning)
    again = run_sweep(cfg, log=lambda m: None)
    assert again["done"] >= summary["done"]
    rows2 = {r["trial"]: r for r in csv.DictReader((out / "trials.csv").open())}
    for r in done:
        assert rows2[r["trial"]]["val_acc"] == r["val_acc"]
