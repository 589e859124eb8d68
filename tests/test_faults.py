"""Injected faults with nothing lost, and a load test.

Each fault hits a real job (resnet8 on the digits at 16x16, tiny stages) and the job must either
finish with EXACTLY the result of an undisturbed run of the same job (same seed), or fail with one
line and leave nothing that loads, so that a re-run finishes it:

* a Ray Train worker dies (``os._exit``) in the statistics pass / between fine-tuning epochs;
* the driver (``raykfe prune`` CLI) is SIGKILLed while it fine-tunes, then re-run;
* the network to the object store (moto on loopback, behind a proxy this test controls) drops
  while the job's result files are being uploaded, then comes back;
* a 50-trial ``raykfe sweep`` on the 2-core machine.

Equality is bit-for-bit (``torch.equal``) throughout: a restarted worker group or a resumed job
repeats exactly the same float operations in the same order (same shards, same per-example Fisher
labels, same two-rank all-reduce, same thread count, per-epoch data order and RNG seeded from
(seed, epoch) only), so no tolerance is needed; a mismatch is a real defect.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import raykfe
from raykfe.config import load_config
from raykfe.counting import count
from raykfe.pareto import pareto_front
from raykfe.backend import LocalBackend
from raykfe.data import job_splits
from raykfe.pipeline import run_job
from raykfe.stages import StageStore
from raykfe.storage import open_uri

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "digits.yaml")
FT_EPOCHS = 3
TINY = [
    "model.name=resnet8", "data.image_size=16", "base.epochs=1", f"finetune.epochs={FT_EPOCHS}", "stats.max_batches=3",
    "stats.batch_size=32", "prune.target=flops:0.5", "progress=false", "latency.repeats=0",
]
RAY = ["runtime=ray", "ray.workers=2", "ray.max_failures=2", "ray.max_actors=2"]  # 2 eigen actors: fewer cold starts


def _state(uri: str) -> dict[str, torch.Tensor]:
    return raykfe.load(uri).model.state_dict()


def _assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what  # (safetensors does not keep the order of the keys)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{what}: {k} differs"


def _assert_same_result(uri: str, ref_uri: str) -> None:
    """Plan, final weights and every metric but timings / reuse bookkeeping are identical."""
    assert open_uri(uri).read_bytes("plan.json") == open_uri(ref_uri).read_bytes("plan.json")
    _assert_same_tensors(_state(uri), _state(ref_uri), "final pruned weights")
    got, want = (json.loads(open_uri(u).read_bytes("metrics.json")) for u in (uri, ref_uri))
    for key in ("base", "pruned", "achieved", "params_reduction", "macs_reduction", "history"):
        assert got[key] == want[key], key


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The tiny job run undisturbed in this process (one torch thread, like the CLI runs below)."""
    out = tmp_path_factory.mktemp("faults") / "local-ref"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = run_job(load_config(JOB, [*TINY, "runtime=local", f"output.uri={out}"]), LocalBackend(), log=lambda m: None)
    finally:
        torch.set_num_threads(old)
    assert job.metrics["reused_stages"] == []
    return str(out)


@pytest.fixture(scope="module")
def ray_reference(ray_cluster, local_reference, tmp_path_factory):
    """The job on Ray (2 Train workers, eigen actors), undisturbed; its base model is the local
    reference's (``model.weights``), so no Ray fit is spent on it."""
    from raykfe.distributed.backend import RayBackend

    weights = f"model.weights={local_reference}/base.safetensors"
    out = tmp_path_factory.mktemp("faults") / "ray-ref"
    cfg = load_config(JOB, [*TINY, *RAY, weights, f"output.uri={out}"])
    job = run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert job.metrics["backend"] == "ray" and job.metrics["reused_stages"] == []
    return str(out), weights


# ------------------------------------------------------------------------------------------------
# 1-2: a Ray Train worker dies
# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_worker_killed_during_statistics_gives_the_same_result(ray_cluster, ray_reference, tmp_path, monkeypatch):
    """Rank 1 exits hard after its first statistics batch; Ray Train restarts the group, which
    redoes the whole pass (no partial sums are kept: the chief stores the statistics only after the
    all-reduce). The restarted pass reads the same shards in the same order, draws the same
    per-example Fisher labels and all-reduces two ranks in the same order, so the statistics, the
    eigenbases, the plan and the fine-tuned weights are BIT-FOR-BIT those of the undisturbed run."""
    from raykfe.distributed.backend import FAULT_ENV, RayBackend

    ref, weights = ray_reference
    out, marker = tmp_path / "out", tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"stats:1:1:{marker}")
    cfg = load_config(JOB, [*TINY, *RAY, weights, f"output.uri={out}"])
    job = run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert marker.read_text().startswith("killed stats rank 1"), "the fault was not injected"
    assert job.metrics["reused_stages"] == []
    mine, theirs = StageStore(open_uri(str(out))), StageStore(open_uri(ref))
    for stage in ("stats", "eigen"):
        (got, got_meta), (want, want_meta) = mine.load(stage), theirs.load(stage)
        _assert_same_tensors(got, want, stage)
        assert got_meta == want_meta, stage
    _assert_same_result(str(out), ref)


@pytest.mark.ray
def test_worker_killed_during_finetuning_gives_the_same_result(ray_cluster, ray_reference, tmp_path, monkeypatch):
    """Rank 1 exits hard after epoch 1 of 3 (once the chief has stored epoch 1's checkpoint: every
    rank's ``ray.train.report`` of epoch 1 waits for the chief's, which follows the checkpoint).
    Ray Train restarts the group; the new workers load the model AND the SGD momentum from that
    checkpoint and run epochs 2-3 only. Each epoch's shard permutation is seeded by (seed, epoch)
    and torch's RNG (augmentation, dropout) by (seed, rank, epoch), so the resumed epochs repeat
    the undisturbed run's float operations: the weights and accuracies are bit-for-bit equal.

    The statistics, eigenbases and plan are the undisturbed run's stages (copied), so only the
    fine-tuning runs here."""
    from raykfe.distributed.backend import FAULT_ENV, RayBackend

    ref, weights = ray_reference
    out, marker = tmp_path / "out", tmp_path / "killed"
    shutil.copytree(Path(ref) / "stages", out / "stages", ignore=lambda d, names: [n for n in names if n.startswith("finetune.")])
    monkeypatch.setenv(FAULT_ENV, f"finetune:1:1:{marker}")
    cfg = load_config(JOB, [*TINY, *RAY, weights, f"output.uri={out}"])
    job = run_job(cfg, RayBackend(cfg), log=lambda m: None)
    assert marker.read_text().startswith("killed finetune rank 1 after 1"), "the fault was not injected"
    assert job.metrics["reused_stages"] == ["statistics", "eigen", "plan"]
    # the first attempt started at epoch 0, the restarted group after epoch 1's checkpoint
    assert json.loads((out / "stages" / "finetune.attempts.json").read_text()) == [0, 1]
    assert [r["epoch"] for r in job.metrics["history"]["finetune"]] == list(range(1, FT_EPOCHS + 1))
    _assert_same_result(str(out), ref)


# ------------------------------------------------------------------------------------------------
# 3: the driver is killed
# ------------------------------------------------------------------------------------------------


def _cli_env() -> dict:
    # one torch thread, as the in-process reference; its own session so a kill takes every child
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _prune_cmd(uri: str) -> list[str]:
    return [sys.executable, "-m", "raykfe.cli", "prune", "-c", JOB, "--local", *TINY, f"output.uri={uri}"]


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_driver_killed_during_finetuning_resumes(local_reference, tmp_path):
    """``raykfe prune --local`` is SIGKILLed (its whole process group) as soon as the stage store
    holds a fine-tuning checkpoint; running the same command again reuses the base model,
    statistics, eigenbases and plan, continues after the last finished epoch, and gives bit-for-bit
    the uninterrupted run's result (one torch thread in both; data order and RNG of each epoch
    depend only on (seed, epoch))."""
    out = tmp_path / "out"
    ckpt = out / "stages" / "finetune.ckpt.json"
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(_prune_cmd(str(out)), cwd=REPO, env=_cli_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists():
            assert proc.poll() is None, f"the job ended before fine-tuning: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no fine-tuning checkpoint within 300 s"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert _group_gone(proc.pid), "processes of the killed driver are left"
    epoch = json.loads(ckpt.read_text())["epoch"]
    assert 1 <= epoch < FT_EPOCHS, f"killed too late (after epoch {epoch} of {FT_EPOCHS})"
    assert not (out / "manifest.json").exists()
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result"):
        raykfe.load(str(out))

    rerun = subprocess.run(_prune_cmd(str(out)), cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=600,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # nothing finished is redone: no base training, no statistics, no eigendecomposition ...
    for redo in ("training the base", "K-FAC statistics", "eigendecomposition"):
        assert redo not in rerun.stderr, rerun.stderr
    # ... fine-tuning continues after the last finished epoch, and the report says so
    assert f"fine-tuning the pruned model for {FT_EPOCHS} epochs (resuming after epoch {epoch})" in rerun.stderr
    assert "reused from an earlier run: base, statistics, eigen, plan" in rerun.stdout
    assert f"finetune resumed after epoch {epoch}" in rerun.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reused_stages"] == ["base", "statistics", "eigen", "plan"]
    assert metrics["resumed_from_epoch"] == {"finetune": epoch}
    _assert_same_result(str(out), local_reference)


# ------------------------------------------------------------------------------------------------
# 4: object storage fails while the result is written
# ------------------------------------------------------------------------------------------------


class FlakyLink:
    """A TCP proxy in front of the S3 server. When a PUT of a key ending in ``victim`` passes, it
    forwards the request's headers and ``keep`` bytes of its body, then resets both connections and
    resets every new connection (the storage is unreachable) until :meth:`recover`."""

    def __init__(self, upstream_port: int, victim: str, keep: int = 2048) -> None:
        self.upstream = upstream_port
        self.pattern = re.compile(rb"PUT /[^ ]*/" + re.escape(victim.encode()) + rb"[ ?]")
        self.keep = keep
        self.down = threading.Event()
        self.tripped = threading.Event()
        self.refused = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def uri(self, s3_server, prefix: str) -> str:
        return s3_server.uri(prefix).replace(f"127.0.0.1:{s3_server.port}", f"127.0.0.1:{self.port}")

    def recover(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self._closed = True
        self.server.close()

    @staticmethod
    def _reset(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                self.refused += 1
                self._reset(client)
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                self._reset(client)
                continue
            threading.Thread(target=self._pump_up, args=(client, up), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(up, client), daemon=True).start()

    def _pump_down(self, up: socket.socket, client: socket.socket) -> None:
        try:
            while data := up.recv(65536):
                client.sendall(data)
        except OSError:
            pass
        finally:
            self._reset(client, up)

    def _pump_up(self, client: socket.socket, up: socket.socket) -> None:
        tail, seen = b"", None  # seen: bytes of the victim request so far (from its request line)
        try:
            while chunk := client.recv(65536):
                if seen is None and not self.tripped.is_set():
                    m = self.pattern.search(tail + chunk)
                    if m:
                        seen = (tail + chunk)[m.start():]
                else:
                    seen = None if seen is None else seen + chunk
                if seen is not None and b"\r\n\r\n" in seen:
                    cut = seen.index(b"\r\n\r\n") + 4 + self.keep  # headers + `keep` bytes of the body
                    if len(seen) >= cut:
                        up.sendall(chunk[: max(0, len(chunk) - (len(seen) - cut))])
                        self.down.set()
                        self.tripped.set()
                        self._reset(client, up)
                        return
                up.sendall(chunk)
                tail = chunk[-512:]
        except OSError:
            pass
        finally:
            self._reset(client, up)


@pytest.mark.slow
def test_storage_failing_mid_write_leaves_no_result_and_rerun_succeeds(local_reference, s3_server, tmp_path):
    """The job writes to s3:// (moto on loopback) through a proxy that cuts the connection in the
    middle of the upload of the result's ``weights.safetensors`` and keeps the store unreachable
    (a real network failure: the S3 client sees its PUT and its retries reset). The job exits 2
    with one line; the files written before the cut are there but no manifest, so nothing loads and
    ``raykfe report`` says there is no complete result. Once the storage is back the same command
    reuses every stage (base, statistics, eigen, plan, the last epoch's checkpoint), writes the
    result, and it equals the undisturbed run's bit-for-bit."""
    link = FlakyLink(s3_server.port, "weights.safetensors")
    prefix = f"faults/{tmp_path.name}"
    uri, direct = link.uri(s3_server, prefix), s3_server.uri(prefix)
    try:
        first = subprocess.run(_prune_cmd(uri), cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=600,
                               start_new_session=True)
        assert link.tripped.is_set(), "the upload of the result was never cut: " + first.stderr[-2000:]
        assert first.returncode == 2, first.stderr[-3000:]
        error = first.stderr.strip().splitlines()[-1]
        assert error.startswith("raykfe: error: cannot write 'weights.safetensors'"), first.stderr[-3000:]
        assert "Traceback" not in first.stderr
        print(error)
        assert link.refused >= 1, "the S3 client did not retry"

        keys = {k[len(prefix) + 1:] for k in s3_server.objects(prefix)}
        assert "plan.json" in keys  # written before the cut ...
        assert "manifest.json" not in keys and "weights.safetensors" not in keys  # ... but no result
        assert "stages/finetune.ckpt.json" in keys
        with pytest.raises(raykfe.StorageError, match="no complete raykfe result"):
            raykfe.load(direct)
        rep = subprocess.run([sys.executable, "-m", "raykfe.cli", "report", direct], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert rep.returncode == 2 and "no complete raykfe result" in rep.stderr, rep.stderr

        link.recover()
        again = subprocess.run(_prune_cmd(uri), cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=600,
                               start_new_session=True)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "reused from an earlier run: base, statistics, eigen, plan" in again.stdout
        assert f"finetune resumed after epoch {FT_EPOCHS}" in again.stdout
    finally:
        link.close()
    assert "manifest.json" in {k[len(prefix) + 1:] for k in s3_server.objects(prefix)}
    _assert_same_result(direct, local_reference)


# ------------------------------------------------------------------------------------------------
# 5: a 50-trial sweep
# ------------------------------------------------------------------------------------------------

SWEEP_LRS = [0.002, 0.005, 0.01, 0.02, 0.05]


@pytest.mark.ray
def test_fifty_trial_sweep_completes_with_a_consistent_table(ray_cluster, tmp_path):
    """5 targets x 5 learning rates x 2 epoch counts = 50 Ray Tune trials (ASHA off, so every
    trial must finish) of resnet8 at 8x8 on 320 synthetic images (3 steps an epoch: the load is
    Tune's, not the training's), sharing one base model and one statistics pass: every
    trial's result is complete and loadable, trials.csv has one row per trial and per result
    directory, statuses add up, and best.json / front.md follow from the table."""
    from raykfe.sweep import run_sweep, trial_grid, trial_id

    out = tmp_path / "sweep"
    cfg = load_config(str(REPO / "jobs" / "digits-sweep.yaml"), [
        "model.name=resnet8", "data.name=synthetic", "data.synthetic_size=320", "data.image_size=8", "base.epochs=1",
        "stats.max_batches=1", "stats.batch_size=64", "finetune.batch_size=64", "progress=false", "runtime=local",
        "sweep.targets=[flops:0.3..0.7/5]",
        f"sweep.lr=[{','.join(map(str, SWEEP_LRS))}]", "sweep.epochs=[1,2]", "sweep.asha=false",
        "sweep.latency_repeats=2", f"output.uri={out}",
    ])
    grid = trial_grid(cfg)
    assert len(grid) == 50
    t0 = time.perf_counter()
    summary = run_sweep(cfg, log=lambda m: None)
    seconds = time.perf_counter() - t0
    assert (summary["trials"], summary["done"], summary["stopped"], summary["errors"]) == (50, 50, 0, 0), summary

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert rows[0]["trial"] == "base" and rows[0]["status"] == "base"
    trials = rows[1:]
    ids = [r["trial"] for r in trials]
    assert len(trials) == 50 and len(set(ids)) == 50
    assert set(ids) == {trial_id(t) for t in grid}
    assert {d.name for d in (out / "trials").iterdir()} == set(ids)  # one result directory per row
    for r in trials:
        assert r["status"] == "done", r
        assert Path(r["uri"]) == out / "trials" / r["trial"]
        assert (out / "trials" / r["trial"] / "manifest.json").exists(), r["trial"]
        assert r["trial"] == trial_id({"method": r["method"], "target": r["target"], "lr": float(r["lr"]),
                                       "epochs": int(r["epochs"]), "weight_decay": float(r["weight_decay"])})
        assert {"base", "statistics", "eigen"} <= set(r["reused_stages"].split(","))
        assert float(r["macs"]) > 0 and 0 <= float(r["val_acc"]) <= 1 and float(r["latency_ms"]) > 0
        metrics = json.loads((out / "trials" / r["trial"] / "metrics.json").read_text())
        assert len(metrics["history"]["finetune"]) == int(r["epochs"])
        assert metrics["pruned"]["val_acc"] == pytest.approx(float(r["val_acc"]), abs=0)
    # the same target gives the same plan whatever the fine-tuning: the MACs agree per target
    for target in {r["target"] for r in trials}:
        assert len({r["macs"] for r in trials if r["target"] == target}) == 1, target

    # spot checks: the saved model loads and has the MACs and parameters the table says
    example = job_splits(cfg.data, cfg.seed).test[0][0][None]
    for r in trials[::12]:
        loaded = raykfe.load(r["uri"])
        assert loaded.plan.target == r["target"]
        c = count(loaded.model, example)
        assert (c.macs, c.params) == (int(float(r["macs"])), int(float(r["params"])))

    # best.json and the fronts follow from the table
    best = json.loads((out / "best.json").read_text())
    assert set(best) == {r["target"] for r in trials}
    for target, b in best.items():
        top = max(float(r["val_acc"]) for r in trials if r["target"] == target)
        assert b["val_acc"] == top
    front_md = (out / "front.md").read_text()
    table = [{"trial": r["trial"], "val_acc": float(r["val_acc"]), "macs": float(r["macs"])} for r in rows]
    for f in pareto_front(table, accuracy="val_acc", cost="macs"):
        assert f"| {f['trial']} |" in front_md
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["kind"] == "raykfe.sweep" and manifest["trials"] == 50
    print(f"50-trial sweep: {seconds:.0f} s")
