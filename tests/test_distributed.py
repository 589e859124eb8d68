"""raykfe on Ray: the distributed run must give the same statistics and plan as the single-process
reference, survive a killed worker, resume a stopped job, and run when submitted as a Ray job."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import raykfe
from raykfe.config import load_config
from raykfe.distributed.collective import pack_triangles, unpack_triangles
from raykfe.errors import RaykfeError
from raykfe.factors import LayerStats
from raykfe.models import build_model
from raykfe.backend import JobContext, LocalBackend
from raykfe.capture import prunable_layers
from raykfe.checkpoint import ModelRecipe
from raykfe.data import job_splits
from raykfe.engine import plan_from_scores
from raykfe.finetune import state_of
from raykfe.pipeline import run_job
from raykfe.plan import Plan
from raykfe.settings import PruneSettings

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# pure parts
# ------------------------------------------------------------------------------------------------


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    """Exactly (bitwise) symmetric: (m_ij + m_ji) / 2 is the same float for (i, j) and (j, i). A BLAS
    product a @ a.T need not be: some kernels compute the two triangles in different orders."""
    return (m + m.T) / 2


def test_triangle_packing_round_trip():
    """Packing keeps the upper triangle and unpacking mirrors it: EXACT for an exactly symmetric
    factor (u_ij + 0, and u_ii + u_ii - u_ii == u_ii in floating point)."""
    g = torch.Generator().manual_seed(0)
    stats = {}
    for name, (din, dout) in {"l1": (5, 3), "l2": (1, 7)}.items():
        a, s = torch.randn(din, din, generator=g, dtype=torch.float64), torch.randn(dout, dout, generator=g, dtype=torch.float64)
        stats[name] = LayerStats(_symmetric(a @ a.T), _symmetric(s @ s.T), 11 + din)
        assert torch.equal(stats[name].A_sum, stats[name].A_sum.T) and torch.equal(stats[name].S_sum, stats[name].S_sum.T)
    flat, layout = pack_triangles(stats)
    assert flat.numel() == sum(n * (n + 1) // 2 for n in (5, 3, 1, 7)) + 2
    copy = {n: LayerStats(torch.zeros_like(st.A_sum), torch.zeros_like(st.S_sum), 0) for n, st in stats.items()}
    unpack_triangles(flat, layout, copy)
    for n in stats:
        assert torch.equal(copy[n].A_sum, stats[n].A_sum) and torch.equal(copy[n].S_sum, stats[n].S_sum)
        assert copy[n].count == stats[n].count


# ------------------------------------------------------------------------------------------------
# on the shared Ray cluster
# ------------------------------------------------------------------------------------------------


def _setup(tmp_path, *extra):
    cfg = load_config("jobs/digits.yaml", [
        "model.name=resnet8", "data.image_size=16", "stats.max_batches=3", "stats.batch_size=32", "progress=false",
        "ray.workers=2", f"output.uri={tmp_path / 'out'}", *extra,
    ])
    torch.manual_seed(0)
    model = build_model("resnet8", 10)
    example = job_splits(cfg.data, cfg.seed).test[0][0][None]
    adapters, skipped = prunable_layers(model, example)
    return cfg, model, example, adapters, skipped


def _opened(backend, cfg):
    backend.open(JobContext.of(cfg))
    return backend


def _plan(cfg, model, example, adapters, skipped, stats, scored) -> Plan:
    return plan_from_scores(
        model, example, scored, {n: stats[n].meta for n in adapters}, cfg.prune.target, skipped,
        method="eigendamage", settings=PruneSettings(max_layer_ratio=0.95, tolerance=0.02),
    )


def _assert_stats_close(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].count == want[name].count, name
        for key in ("A_sum", "S_sum"):
            g, w = getattr(got[name], key), getattr(want[name], key)
            err = (g - w).abs().max().item() / max(w.abs().max().item(), 1e-300)
            assert err < 1e-5, f"{name}.{key}: relative error {err:.2e}"
            # exact by construction: the all-reduce (2 workers) ships the upper triangle and mirrors it
            assert torch.equal(g, g.T), f"{name}.{key} is not exactly symmetric"


@pytest.mark.ray
def test_two_workers_match_single_process_statistics_and_plan(ray_cluster, tmp_path):
    from raykfe.distributed.backend import RayBackend

    cfg, model, example, adapters, skipped = _setup(tmp_path)
    recipe, state = ModelRecipe(dict(model.raykfe_spec)), state_of(model)
    backend = _opened(RayBackend(cfg), cfg)
    dist_stats = backend.kfac(recipe, state, list(adapters), "patch")
    local_stats = _opened(LocalBackend(), cfg).kfac(recipe, state, list(adapters), "patch")
    assert next(iter(local_stats.values())).count == 3 * 32
    _assert_stats_close(dist_stats, local_stats)

    weights = {n: a.weight_matrix() for n, a in adapters.items()}
    dist_scored = backend.score(dist_stats, weights)  # on eigen actors
    local_scored = LocalBackend().score(local_stats, weights)
    for n in adapters:
        got, want = dist_scored[n].entries, local_scored[n].entries
        err = (got - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-4, f"{n}: scores differ by {err:.2e} of the largest score"
    p_dist = _plan(cfg, model, example, adapters, skipped, dist_stats, dist_scored)
    p_local = _plan(cfg, model, example, adapters, skipped, local_stats, local_scored)
    for n in adapters:
        a, b = p_dist.layers[n], p_local.layers[n]
        assert (a.action, a.keep_in, a.keep_out) == (b.action, b.keep_in, b.keep_out), n
    assert (p_dist.params, p_dist.macs) == (p_local.params, p_local.macs)


@pytest.mark.ray
def test_eigen_pool_work_queue_scores_every_layer_once(ray_cluster, one_thread):
    """7 layers of different sizes on 2 actors, 2 in flight each: every layer is decomposed by
    exactly one actor, the largest are handed out first, and the scores are the in-process ones."""
    from raykfe.distributed.actors import EigenPool
    from raykfe.eigen import eigenbasis
    from raykfe.methods.eigendamage import score_in_basis

    g = torch.Generator().manual_seed(3)
    stats, weights = {}, {}
    for i, (a, s) in enumerate([(5, 4), (40, 30), (9, 7), (60, 50), (3, 3), (20, 25), (12, 8)]):
        xa, xs = torch.randn(64, a, generator=g, dtype=torch.float64), torch.randn(64, s, generator=g, dtype=torch.float64)
        stats[f"l{i}"] = LayerStats(xa.T @ xa, xs.T @ xs, 64)
        weights[f"l{i}"] = torch.randn(s, a, generator=g, dtype=torch.float64)
    pool = EigenPool(actor_cpus=1.0, max_actors=2)
    try:
        scored = pool.score(stats, weights)
    finally:
        pool.shutdown()
    assert sorted(n for grp in pool.groups for n in grp) == sorted(stats)
    assert len(pool.groups) == 2 and {pool.groups[0][0], pool.groups[1][0]} == {"l3", "l1"}  # the two largest first
    assert all(sec > 0 for sec in pool.compute_seconds())
    for n, st in stats.items():
        want = score_in_basis(n, weights[n], eigenbasis(n, st))
        torch.testing.assert_close(scored[n].entries, want.entries, rtol=1e-9, atol=1e-12)


@pytest.mark.ray
def test_worker_killed_during_statistics_is_restarted_with_same_statistics(ray_cluster, tmp_path, monkeypatch):
    from raykfe.distributed.backend import FAULT_ENV, RayBackend

    cfg, model, _, adapters, _ = _setup(tmp_path, "ray.max_failures=2")
    recipe, state = ModelRecipe(dict(model.raykfe_spec)), state_of(model)
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"stats:1:1:{marker}")  # rank 1 exits hard after its first batch
    dist_stats = _opened(RayBackend(cfg), cfg).kfac(recipe, state, list(adapters), "patch")
    assert marker.exists(), "the fault was not injected"
    _assert_stats_close(dist_stats, _opened(LocalBackend(), cfg).kfac(recipe, state, list(adapters), "patch"))


class _DiesAfterStatistics(LocalBackend):
    def score(self, stats, weights):
        raise KeyboardInterrupt  # the driver is stopped right after the statistics stage


@pytest.mark.slow
def test_job_stopped_after_statistics_resumes_and_reuses_them(tmp_path, tiny_job_overrides):
    cfg = load_config("jobs/digits.yaml", [*tiny_job_overrides, "runtime=local"])
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, _DiesAfterStatistics(), log=lambda m: None)
    assert not (tmp_path / "out" / "manifest.json").exists()  # no half result is visible
    with pytest.raises(raykfe.StorageError):
        raykfe.load(str(tmp_path / "out"))
    job = run_job(cfg, LocalBackend(), log=lambda m: None)
    assert job.metrics["reused_stages"] == ["base", "statistics"]
    assert raykfe.load(str(tmp_path / "out")).plan.target == "flops:0.5"
    # a different job may not reuse these stages
    other = load_config("jobs/digits.yaml", [*tiny_job_overrides, "runtime=local", "stats.fisher=empirical"])
    with pytest.raises(raykfe.StorageError, match="different job"):
        run_job(other, LocalBackend(), log=lambda m: None)


@pytest.mark.ray
@pytest.mark.slow
def test_job_on_s3_stopped_mid_finetuning_resumes_from_last_epoch(ray_cluster, s3_server, tmp_path, tiny_job_overrides, monkeypatch):
    """The digits job on Ray with an s3:// output on the loopback server: stopped mid fine-tuning,
    re-run, completed, and the result round-trips from object storage."""
    from raykfe.distributed.backend import FAULT_ENV, RayBackend

    uri = s3_server.uri(f"jobs/{tmp_path.name}")
    overrides = [*tiny_job_overrides, "finetune.epochs=2", "ray.max_failures=0", f"output.uri={uri}"]
    cfg = load_config("jobs/digits.yaml", overrides)
    monkeypatch.setenv(FAULT_ENV, f"finetune:0:1:{tmp_path / 'killed'}")  # chief dies before epoch 2
    with pytest.raises(RaykfeError, match="finetune stage failed"):
        run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert (tmp_path / "killed").exists()
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result"):
        raykfe.load(uri)
    monkeypatch.delenv(FAULT_ENV)
    job = run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert job.metrics["reused_stages"] == ["base", "statistics", "eigen", "plan"]
    assert job.metrics["resumed_from_epoch"] == {"finetune": 1}
    assert [r["epoch"] for r in job.metrics["history"]["finetune"]] == [1, 2]
    loaded = raykfe.load(uri)
    loaded.model.eval()
    x = job_splits(cfg.data, cfg.seed).test[0][0][None]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), job.result.model.eval()(x))


# ------------------------------------------------------------------------------------------------
# ray job submit against a `ray start --head` cluster on loopback, token authentication on
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_quiet_console(lines: list[str]) -> None:
    """The job's console: the workers' epoch and pass lines reach it once each (relayed by the
    driver), and none of Ray's own worker or Train log lines, nothing that looks like an error."""
    for line in ("[base] epoch 1/1", "[finetune] epoch 1/1", "[stats] K-FAC statistics"):
        assert sum(ln.startswith(line) for ln in lines) == 1, (line, lines)
    noisy = [ln for ln in lines if "pid=" in ln or "RayTrainWorker" in ln or "Traceback" in ln or " E " in ln
             or "ERROR" in ln or "WARNING" in ln or "Reporting training result" in ln]
    assert not noisy, noisy


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_of_digits_job(tmp_path):
    bindir = Path(sys.executable).parent
    ray_cli = str(bindir / "ray")
    gcs, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # its own temp dir (short: it holds unix sockets), so it shares no session files with the
    # test session's cluster, which may be running at the same time
    temp_dir = tempfile.mkdtemp(prefix="rkhead", dir="/tmp")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # every port of its own: the session cluster holds the defaults (the job agent's 52365 first)
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    out = tmp_path / "submitted"
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([ray_cli, "job", "list", "--address", address], env=env, capture_output=True, timeout=60)
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not start within 120 s")
        # only what the job needs is uploaded (the package and the job spec)
        workdir = tmp_path / "wd"
        shutil.copytree(REPO / "raykfe", workdir / "raykfe", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "jobs", workdir / "jobs")
        submit = [
            ray_cli, "job", "submit", "--address", address, "--working-dir", str(workdir), "--",
            "python", "-m", "raykfe.cli", "prune", "-c", "jobs/digits.yaml", "model.name=resnet8", "data.image_size=16",
            "base.epochs=1", "finetune.epochs=1", "stats.max_batches=2", "progress=true", f"output.uri={out}",
        ]
        deadline = time.time() + 120
        while True:  # the head's job agent comes up a little after its dashboard (bounded wait)
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
        _assert_quiet_console((proc.stdout + proc.stderr).splitlines())
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)
    result = raykfe.load(str(out))
    assert result.plan.target == "flops:0.7"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert result.model(x).shape == (2, 10)
