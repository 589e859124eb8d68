"""Reliability and security: one test per row of the README's "Reliability and security" table.

Every bad input goes through the user's path (``raykfe prune`` / ``report`` / ``sweep``: the CLI's
``main``, in this process to save start-up time, or as a real subprocess where the process itself
matters): ONE line ``raykfe: error: ...`` on stderr, exit status 2, no traceback, nothing written
(or, for a fault in a late stage, nothing half-written: no result, no non-finite stage). The
security rows plant a malicious pickle, a secret in the environment and path-escaping names, and
check the cluster specs keep Ray's token authentication on. The last test keeps the README table
and the tests it names in step.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import raykfe
from raykfe.cli import main
from s3server import free_port  # the s3_server session fixture comes from conftest.py

REPO = Path(__file__).resolve().parents[1]
JOB = str(REPO / "jobs" / "digits.yaml")
TINY = [
    "model.name=resnet8", "data.image_size=16", "base.epochs=1", "finetune.epochs=1", "stats.max_batches=3",
    "stats.batch_size=32", "prune.target=flops:0.5", "progress=false", "latency.repeats=0",
]


# --- helpers -----------------------------------------------------------------------------------
def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``raykfe <args>`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def prune(capsys, out: Path | str, *overrides: str) -> tuple[int, str, str]:
    return cli(capsys, "prune", "-c", JOB, "--local", *TINY, f"output.uri={out}", *overrides)


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one ``raykfe: error:`` line holding every needle, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("raykfe: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Planted:
    """A pickle whose loading writes ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def planted_pickle(marker: Path, wrap=None) -> bytes:
    data = pickle.dumps(Planted(marker) if wrap is None else wrap(Planted(marker)))
    probe = marker.with_name(marker.name + ".probe")  # the payload is live: plain pickle runs it
    pickle.loads(pickle.dumps(Planted(probe)))
    assert probe.is_file()
    probe.unlink()
    return data


def set_manifest_hash(result: Path, name: str) -> None:
    """What an attacker who controls the result folder would do: make the manifest agree."""
    manifest = json.loads((result / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((result / name).read_bytes()).hexdigest()
    (result / "manifest.json").write_text(json.dumps(manifest))


def planted_secrets() -> dict[str, str]:
    """Credentials and tokens that look real and occur nowhere else."""
    upper = "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    return {
        "AWS_ACCESS_KEY_ID": f"AKIA{upper}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAYKFE_TEST_API_TOKEN": secrets.token_hex(24),
    }


def subprocess_cli(*args: str, env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAYKFE_DEBUG"} | env_extra
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "raykfe.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


def assert_no_secret(secret_values: dict[str, str], blobs: dict[str, bytes | str]) -> None:
    assert blobs
    for where, blob in blobs.items():
        data = blob.encode() if isinstance(blob, str) else blob
        for key, value in secret_values.items():
            assert value.encode() not in data, f"{key} was written to {where}"
            assert value not in where, f"{key} is in the name {where}"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("RAYKFE_DEBUG", raising=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, s3_server) -> SimpleNamespace:
    """A finished tiny job, run as a real `raykfe prune --local` process with secrets planted in its
    environment and its output on the loopback S3 server (moto takes any key). ``objects`` is
    everything it stored, ``out`` a local copy of it for the tests that damage a result."""
    work = tmp_path_factory.mktemp("finished")
    planted = planted_secrets()
    prefix = f"finished/{uuid.uuid4().hex}"
    proc = subprocess_cli("prune", "-c", JOB, "--local", *TINY, f"output.uri={s3_server.uri(prefix)}", env_extra=planted,
                          cwd=work)
    assert proc.returncode == 0, proc.stderr
    objects = {k: v for k, v in s3_server.objects(prefix).items() if not k.endswith("/")}
    out = tmp_path_factory.mktemp("copy") / "out"
    for key, data in objects.items():
        dest = out / key[len(prefix) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return SimpleNamespace(work=work, out=out, objects=objects, proc=proc, secrets=planted)


@pytest.fixture
def result_copy(finished, tmp_path) -> Path:
    dest = tmp_path / "result"
    shutil.copytree(finished.out, dest)
    return dest


# --- bad input ---------------------------------------------------------------------------------
def test_invalid_yaml_is_one_line_error_naming_the_line(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name: resnet8\nprune: {target: flops:0.5\n")
    code, _, err = cli(capsys, "prune", "-c", str(broken), f"output.uri={tmp_path / 'out'}")
    one_line_error(code, err, "not valid YAML", "line", str(broken))
    code, _, err = cli(capsys, "sweep", "-c", str(broken))
    one_line_error(code, err, "not valid YAML")
    assert not (tmp_path / "out").exists()


def test_unknown_key_suggests_the_closest_known_key(capsys, tmp_path):
    for override, suggestion in [("prune.targt=flops:0.5", "did you mean 'prune.target'?"),
                                 ("modle.name=resnet8", "did you mean 'model'?"),
                                 ("finetune.epoch=3", "did you mean 'finetune.epochs'?")]:
        code, _, err = prune(capsys, tmp_path / "out", override)
        one_line_error(code, err, "unknown config key", suggestion)
    assert not (tmp_path / "out").exists()


def test_wrong_type_names_the_field_and_the_expected_type(capsys, tmp_path):
    for override, needles in [("finetune.lr=abc", ("finetune.lr='abc'", "expected a number")),
                              ("base.epochs=three", ("base.epochs='three'", "expected an integer")),
                              ("prune.include_classifier=maybe", ("prune.include_classifier", "true or false")),
                              ("prune.exclude=3", ("prune.exclude", "list")),
                              ("finetune.lr=.inf", ("finetune.lr", "finite"))]:
        code, _, err = prune(capsys, tmp_path / "out", override)
        one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()
    # YAML 1.1 reads 1e-3 (no dot) as a string; raykfe takes it as the number it means
    code, out, err = cli(capsys, "config", "-c", JOB, "finetune.lr=1e-3", "base.lr=5E-2")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["finetune"]["lr"] == 1e-3 and cfg["base"]["lr"] == 5e-2


def test_target_out_of_range_or_malformed(capsys, tmp_path):
    for target, needle in [("flops:1.5", "outside (0, 1)"), ("params:0", "outside (0, 1)"), ("flops", "malformed"),
                           ("flops:abc", "flops:abc"), ("speed:0.5", "speed")]:
        code, _, err = prune(capsys, tmp_path / "out", f"prune.target={target}")
        one_line_error(code, err, "prune.target", needle)
    code, _, err = cli(capsys, "sweep", "-c", str(REPO / "jobs" / "digits-sweep.yaml"), "sweep.targets=[flops:0.9..0.3/4]",
                       f"output.uri={tmp_path / 'out'}")
    one_line_error(code, err, "sweep.targets", "A < B")
    assert not (tmp_path / "out").exists()


def test_unknown_model_method_or_dataset(capsys, tmp_path):
    for override, needles in [("model.name=resnet999", ("resnet999",)), ("prune.method=magic", ("magic", "eigendamage")),
                              ("data.name=mnist", ("mnist", "digits"))]:
        code, _, err = prune(capsys, tmp_path / "out", override)
        one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_model_with_only_unsupported_layers(capsys, tmp_path):
    # through the API: depthwise convolutions (groups > 1) and a classifier left dense by default
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1, groups=3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))]
    with pytest.raises(raykfe.ConfigError) as info:
        raykfe.prune(model, batches, target="flops:0.5")
    assert "no prunable layer" in str(info.value) and "\n" not in str(info.value)
    # through the CLI: every prunable layer excluded
    code, _, err = prune(capsys, tmp_path / "out", "model.name=vgg_tiny",
                         "prune.exclude=[features.0,features.4,features.8,features.12]")
    one_line_error(code, err, "no prunable layer", "include_classifier")
    assert not (tmp_path / "out").exists()


def test_empty_dataset(capsys, tmp_path):
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)  # class folders, no images
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    code, _, err = prune(capsys, tmp_path / "out", "data.name=imagefolder", f"data.root={root}")
    one_line_error(code, err, "no images", str(root / "train"))
    # a CIFAR tree whose batches hold no image
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    empty = {"data": np.zeros((0, 3072), np.uint8), "labels": []}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(empty))
    code, _, err = prune(capsys, tmp_path / "out", "data.name=cifar10", f"data.root={tmp_path / 'cifar'}")
    one_line_error(code, err, "cifar10 train set", "is empty")
    assert not (tmp_path / "out").exists()


def test_missing_data_root(capsys, tmp_path):
    for overrides, needles in [(["data.name=cifar10", "data.root=/nonexistent/cifar"], ("/nonexistent/cifar", "cifar-10-batches-py")),
                               (["data.name=imagefolder", f"data.root={tmp_path / 'nowhere'}"], ("nowhere", "train/<class>")),
                               (["data.name=cifar100"], ("data.root",))]:
        code, _, err = prune(capsys, tmp_path / "out", *overrides)
        one_line_error(code, err, *needles, "never downloads" if "data.root=" in " ".join(overrides) else "")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_nan_or_inf_in_the_statistics_names_the_layer(capsys, finished, tmp_path):
    from safetensors.torch import load_file, save_file

    base = load_file(finished.out / "base.safetensors")
    # finite weights so large that the layer's outputs overflow: the statistics pass names the layer
    huge = dict(base, **{"layer2.0.conv1.weight": base["layer2.0.conv1.weight"] * 1e38})
    save_file(huge, tmp_path / "huge.safetensors")
    out = tmp_path / "out"
    code, _, err = prune(capsys, out, f"model.weights={tmp_path / 'huge.safetensors'}")
    one_line_error(code, err, "'layer2.0.conv1'", "NaN/Inf", "statistics", "model.weights")
    assert not (out / "manifest.json").exists()
    assert not (out / "stages" / "stats.json").exists()  # no non-finite statistics were stored
    # NaN in the weights file itself: refused before anything runs, naming the tensor
    nan = dict(base, **{"layer3.0.conv2.weight": base["layer3.0.conv2.weight"].clone().fill_(float("nan"))})
    save_file(nan, tmp_path / "nan.safetensors")
    code, _, err = prune(capsys, tmp_path / "out2", f"model.weights={tmp_path / 'nan.safetensors'}")
    one_line_error(code, err, "'layer3.0.conv2.weight'", "NaN/Inf")
    assert not (tmp_path / "out2").exists()
    # the eigendecomposition guard names the layer too (API path, factors given directly)
    from raykfe.eigen import eigenbasis
    from raykfe.factors import LayerStats

    st = LayerStats.zeros(3, 2)
    st.A_sum[1, 1], st.count = float("inf"), 1
    with pytest.raises(raykfe.NumericalError, match="factor A of layer 'conv7'"):
        eigenbasis("conv7", st)


@pytest.mark.slow
def test_diverging_training_stops_naming_the_stage_and_the_fix(capsys, finished, tmp_path):
    out = tmp_path / "out"
    weights = finished.out / "base.safetensors"
    code, _, err = prune(capsys, out, f"model.weights={weights}", "finetune.lr=1e8", "finetune.epochs=2", "stats.max_batches=1")
    one_line_error(code, err, "fine-tuning diverged at epoch 1", "finetune.lr=1e+08", "lower the learning rate")
    assert not (out / "manifest.json").exists()  # no result
    stages = out / "stages"
    assert (stages / "plan.json").is_file() and (stages / "stats.json").is_file()  # finished stages are kept
    assert not list(stages.glob("finetune.ckpt*"))  # and no non-finite checkpoint was written
    code, _, err = prune(capsys, tmp_path / "out2", "base.lr=1e8")
    one_line_error(code, err, "base training diverged", "base.lr=1e+08")


def test_diverged_epoch_is_never_checkpointed_and_the_last_good_one_is_kept(tmp_path):
    """The training loop every stage uses (in-process and on the Ray Train workers): epoch 2 ends
    with finite losses but NaN/Inf weights (its last step blew up); it must not replace epoch 1's
    checkpoint, and a re-run resumes from epoch 1."""
    from raykfe.config import TrainConfig
    from raykfe.finetune import run_training
    from raykfe.stages import StageStore
    from raykfe.storage import open_uri

    torch.manual_seed(0)
    batch = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]  # one step per epoch
    tcfg = TrainConfig(epochs=3, lr=0.1)
    store = StageStore(open_uri(str(tmp_path / "out")))

    def blow_up_at_epoch_2(model):
        def before(epoch):
            if epoch == 2:
                model[0].weight.register_hook(lambda g: g * float("inf"))
        return before

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(raykfe.NumericalError) as info:
        run_training(model, batch, tcfg.settings(), "finetune", store, before_epoch=blow_up_at_epoch_2(model))
    msg = str(info.value)
    assert "fine-tuning diverged at epoch 2" in msg and "finetune.lr=0.1" in msg
    assert "checkpoint of epoch 1" in msg and "\n" not in msg
    epoch, tensors, meta = store.load_checkpoint("finetune")
    assert epoch == 1 and len(meta["history"]) == 1
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert sorted(p.name for p in (tmp_path / "out" / "stages").iterdir()) == ["finetune.ckpt-1.safetensors", "finetune.ckpt.json"]
    # a re-run continues from the last good epoch
    again = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    history = run_training(again, batch, tcfg.settings(), "finetune", store)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert store.load_checkpoint("finetune")[0] == 3
    assert all(torch.isfinite(p).all() for p in again.parameters())


# --- storage -----------------------------------------------------------------------------------
def test_unreachable_storage_endpoint_fails_fast(capsys, monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret-for-this-test")
    uri = f"s3://raykfe-test/job?endpoint_override=http://127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    for args in (["prune", "-c", JOB, "--local", *TINY, f"output.uri={uri}"], ["report", uri]):
        start = time.monotonic()
        code, _, err = cli(capsys, *args)
        assert time.monotonic() - start < 15
        one_line_error(code, err, "endpoint", "credentials", "127.0.0.1")


@pytest.mark.slow
def test_wrong_credentials_are_one_line_errors_without_the_secret(capsys, finished, s3_server, monkeypatch):
    uri = s3_server.uri(f"auth/{uuid.uuid4().hex}")
    result = raykfe.load(str(finished.out))
    with s3_server.enforce_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        raykfe.save(result, uri, extra_files={"report.md": b"the report\n"})
        code, out, err = cli(capsys, "report", uri)
        assert code == 0 and "the report" in out, err
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret[::-1])
        for args in (["report", uri], ["prune", "-c", JOB, "--local", *TINY, f"output.uri={uri}"]):
            code, out, err = cli(capsys, *args)
            one_line_error(code, err, "credentials")
            assert secret not in err + out and secret[::-1] not in err + out
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)


def test_truncated_or_corrupt_result_is_reported(capsys, result_copy):
    uri = str(result_copy)
    # a truncated report: `raykfe report` refuses it
    report = (result_copy / "report.md").read_bytes()
    (result_copy / "report.md").write_bytes(report[: len(report) // 2])
    code, out, err = cli(capsys, "report", uri)
    one_line_error(code, err, "'report.md'", "corrupt or truncated")
    assert out == ""
    (result_copy / "report.md").write_bytes(report)
    # truncated weights: loading refuses them, and re-running the job does not show the damaged result
    weights = (result_copy / "weights.safetensors").read_bytes()
    (result_copy / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(raykfe.StorageError, match="corrupt or truncated") as info:
        raykfe.load(uri)
    assert "weights.safetensors" in str(info.value) and "\n" not in str(info.value)
    code, _, err = prune(capsys, uri)
    one_line_error(code, err, "weights.safetensors", "corrupt or truncated", "output.overwrite=true")
    # a truncated manifest
    manifest = (result_copy / "manifest.json").read_bytes()
    (result_copy / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    code, _, err = cli(capsys, "report", uri)
    one_line_error(code, err, "manifest.json", "corrupt")


def test_result_of_a_newer_format_asks_for_an_upgrade(capsys, result_copy):
    from raykfe.checkpoint import CHECKPOINT_FORMAT

    manifest = json.loads((result_copy / "manifest.json").read_text())
    manifest["format"] = CHECKPOINT_FORMAT + 1
    (result_copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli(capsys, "report", str(result_copy))
    one_line_error(code, err, f"format {CHECKPOINT_FORMAT + 1}", "upgrade raykfe")
    with pytest.raises(raykfe.StorageError, match="upgrade raykfe"):
        raykfe.load(str(result_copy))
    code, _, err = prune(capsys, result_copy)
    one_line_error(code, err, "upgrade raykfe")


@pytest.mark.slow
def test_output_uri_of_a_different_job_is_refused_unless_overwrite(capsys, finished, result_copy, tmp_path):
    weights = tmp_path / "base.safetensors"
    shutil.copy(finished.out / "base.safetensors", weights)
    before = files_under(result_copy)
    other = [f"model.weights={weights}", "prune.target=flops:0.3", "stats.max_batches=1", "finetune.epochs=0"]  # another job
    code, _, err = prune(capsys, result_copy, *other)
    one_line_error(code, err, "different job", "output.overwrite=true")
    assert files_under(result_copy) == before  # nothing changed
    code, _, err = prune(capsys, result_copy, *other, "output.overwrite=true")
    assert code == 0, err
    metrics = json.loads((result_copy / "metrics.json").read_text())
    assert metrics["target"] == "flops:0.3" and raykfe.load(str(result_copy)).plan.target == "flops:0.3"


# --- security ----------------------------------------------------------------------------------
def test_planted_pickles_are_never_executed(capsys, result_copy, tmp_path):
    marker = tmp_path / "PWNED"
    # a result whose weights are a pickle, with a manifest that agrees (the folder is the attacker's)
    (result_copy / "weights.safetensors").write_bytes(planted_pickle(marker))
    set_manifest_hash(result_copy, "weights.safetensors")
    with pytest.raises(raykfe.StorageError, match="not a safetensors file") as info:
        raykfe.load(str(result_copy))
    assert "\n" not in str(info.value)
    (result_copy / "plan.json").write_bytes(planted_pickle(marker))
    set_manifest_hash(result_copy, "plan.json")
    with pytest.raises(raykfe.StorageError, match="plan.json"):
        raykfe.load(str(result_copy))
    code, _, _ = cli(capsys, "report", str(result_copy))
    assert code == 0
    # a stage of an unfinished job: the re-run refuses it
    (result_copy / "manifest.json").unlink()
    stage = result_copy / "stages" / "stats.safetensors"
    stage.write_bytes(planted_pickle(marker))
    marker_json = json.loads((result_copy / "stages" / "stats.json").read_text())
    marker_json["sha256"] = hashlib.sha256(stage.read_bytes()).hexdigest()
    (result_copy / "stages" / "stats.json").write_text(json.dumps(marker_json))
    code, _, err = prune(capsys, result_copy)
    one_line_error(code, err, "stage 'stats'", "not a safetensors file")
    # CIFAR batches that are pickles of code, bare or inside the batch dict
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]):
        wrap = None if i % 2 else (lambda p: {"data": p, "labels": [0]})
        (root / name).write_bytes(planted_pickle(marker, wrap))
    code, _, err = prune(capsys, tmp_path / "out", "data.name=cifar10", f"data.root={root.parent}")
    one_line_error(code, err, "data_batch_1", "builtins.exec", "never loads")
    assert not marker.exists(), "a planted pickle was executed"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_any_output(finished):
    # the finished job (a real process with the secrets in its environment, its output on S3):
    # every object it stored (result, report, config, stages, checkpoints), every file in its
    # working directory, and everything it printed
    objects = finished.objects
    for name in ("manifest.json", "config.yaml", "report.md", "metrics.json", "weights.safetensors", "stages/config.yaml",
                 "stages/stats.safetensors", "stages/finetune.ckpt.json"):
        assert any(k.endswith("/" + name) for k in objects), name
    blobs = {**objects, **files_under(finished.work), "stdout": finished.proc.stdout, "stderr": finished.proc.stderr}
    assert_no_secret(finished.secrets, blobs)


def test_job_paths_cannot_escape_the_output_prefix(capsys, tmp_path):
    from raykfe.config import load_config
    from raykfe.storage import open_uri
    from raykfe.sweep import trial_grid, trial_id

    inside = tmp_path / "a" / "b"
    inside.mkdir(parents=True)
    # the job name becomes part of Ray Train / Tune run directories: one plain path component
    for name in ("../../x", "a/b", "..", "/abs"):
        code, _, err = prune(capsys, inside / "out", f"name={name}")
        one_line_error(code, err, "name=")
        code, _, err = cli(capsys, "sweep", "-c", str(REPO / "jobs" / "digits-sweep.yaml"), f"name={name}",
                           f"output.uri={inside / 'sweep'}")
        one_line_error(code, err, "name=")
    # object keys are literal: '..' in an s3:// / gs:// prefix is refused
    for uri in ("s3://bucket/results/../other", "gs://bucket/./x", "s3://bucket/a/..?endpoint_override=http://127.0.0.1:1"):
        code, _, err = prune(capsys, uri)
        one_line_error(code, err, "output.uri", "'..'")
    # stage and file names inside the prefix cannot climb out of it
    loc = open_uri(str(inside / "out"))
    for name in ("../x", "stages/../../x", "/etc/x", "trials/../../x"):
        with pytest.raises(raykfe.StorageError, match="escape"):
            loc.write_bytes(name, b"x")
    # trial ids (the folders of a sweep's trials) are single safe components for any grid
    cfg = load_config(REPO / "jobs" / "digits-sweep.yaml", [
        "sweep.targets=[flops:0.3..0.9/4, params:0.5, directions:0.25]", "sweep.methods=[eigendamage, eigendamage-iterative]",
        "sweep.lr=[1e-5, 0.1, 3]", "sweep.epochs=[1, 20]", "sweep.weight_decay=[0, 5.0e-4]",
    ])
    ids = [trial_id(t) for t in trial_grid(cfg)]
    assert len(set(ids)) == len(ids) > 10
    for tid in ids:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", tid) and ".." not in tid.split("/"), tid
        assert Path(loc.path(f"trials/{tid}")).resolve().is_relative_to((inside / "out").resolve())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]  # nothing written


def test_ray_token_auth_stays_on_in_cluster_specs_and_the_docs_say_how_to_pass_it():
    clusters = REPO / "clusters"
    specs = sorted(clusters.glob("*.yaml"))
    assert len(specs) >= 4
    for spec in specs:
        text = spec.read_text()
        assert "RAY_AUTH_MODE=disabled" not in text and not re.search(r"RAY_AUTH_MODE\W+value:\s*['\"]?disabled", text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        for doc in docs:
            if "available_node_types" in doc:  # cluster launcher: every `ray start` runs with token auth
                starts = [c for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in doc[k] if "ray start" in c]
                assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), spec.name
                assert doc["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", spec.name
            else:  # KubeRay: every container has RAY_AUTH_MODE=token and the token from a Secret
                envs = [c.get("env", []) for c in _containers(doc)]
                assert envs
                for env in envs:
                    by_name = {e["name"]: e for e in env}
                    assert by_name["RAY_AUTH_MODE"]["value"] == "token", spec.name
                    assert "secretKeyRef" in by_name["RAY_AUTH_TOKEN"].get("valueFrom", {}), spec.name
                    assert "value" not in by_name["RAY_AUTH_TOKEN"], spec.name
    guide = (clusters / "README.md").read_text()
    for needle in ("RAY_AUTH_TOKEN", "~/.ray/auth_token", "RAY_AUTH_MODE=token", "kubectl create secret generic"):
        assert needle in guide, needle
    readme = (REPO / "README.md").read_text()
    assert "RAY_AUTH_MODE=token ray job submit" in readme and "RAY_AUTH_TOKEN" in readme and "~/.ray/auth_token" in readme


def _containers(doc: dict) -> list[dict]:
    found: list[dict] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


# --- the README table --------------------------------------------------------------------------
def _reliability_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Reliability and security")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_readme_table_names_existing_tests():
    rows = [ln for ln in _reliability_section().splitlines() if ln.startswith("|") and not set(ln) <= set("|- ")]
    header, body = rows[0], rows[1:]
    assert [c.strip() for c in header.strip("|").split("|")] == ["input or fault", "what raykfe does", "test"]
    assert len(body) >= 20
    seen = set()
    for row in body:
        test_cell = row.rstrip().rstrip("|").rsplit("|", 1)[-1]
        ids = re.findall(r"`(tests/[\w/]+\.py::[\w\[\]\-.]+)`", test_cell)
        assert ids, f"row without a test: {row}"
        for node in ids:
            path, _, name = node.partition("::")
            func = name.split("[")[0]
            file = REPO / path
            assert file.is_file(), f"{node}: no file {path}"
            tree = ast.parse(file.read_text())
            defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            assert func in defined and func.startswith("test_"), f"{node}: no test {func} in {path}"
            seen.add(node)
    # every test of this file is in the table (except this one)
    mine = {n.name for n in ast.parse(Path(__file__).read_text()).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    listed = {s.split("::")[1] for s in seen if s.startswith("tests/test_reliability.py::")}
    assert mine - listed == {"test_readme_table_names_existing_tests"}
