"""Results under an output URI: local path, file:// and s3:// (a real moto server on loopback).

Round trips are exact; a write that dies before its manifest leaves nothing loadable (also when it
overwrites an older result); corrupt or newer-format results, wrong credentials, a missing bucket
and an unreachable endpoint give one-line StorageErrors; credentials are never written; stage
files and per-epoch checkpoints work on S3; file names cannot escape the prefix.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

import raykfe
from raykfe.checkpoint import CHECKPOINT_FORMAT, MANIFEST, read_manifest
from raykfe.models import build_model
from raykfe.stages import StageStore
from raykfe.storage import Location, open_uri
from s3server import S3Server, free_port  # the s3_server session fixture comes from conftest.py

FILES = ("plan.json", "weights.safetensors", "report.json")


# --- fixtures ----------------------------------------------------------------------------------
def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    return raykfe.prune(build_model("resnet8", 10), _batches(0), target="flops:0.5")


@pytest.fixture(scope="module")
def other_result():
    """A different result (another model and target), to overwrite ``result`` with."""
    torch.manual_seed(1)
    return raykfe.prune(build_model("resnet8", 10), _batches(1), target="flops:0.7")


def _foreign_model() -> nn.Module:
    """An architecture raykfe did not build (no model spec)."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.fixture(params=["local", "file", "s3"])
def out_uri(request, tmp_path):
    """A fresh, empty output URI of each kind."""
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "file":
        return (tmp_path / "out").as_uri()
    server: S3Server = request.getfixturevalue("s3_server")
    return server.uri(f"results/{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "s3"])
def any_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server: S3Server = request.getfixturevalue("s3_server")
    return server.uri(f"results/{uuid.uuid4().hex}")


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _assert_same(loaded, original) -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(_outputs(loaded.model, x), _outputs(original.model, x))
    assert loaded.plan == original.plan
    assert loaded.plan.to_json() == original.plan.to_json()
    assert json.loads(json.dumps(loaded.report, default=str)) == json.loads(json.dumps(original.report, default=str))
    assert loaded.stats is None


def _one_line_storage_error(excinfo, uri: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert uri in msg, msg
    return msg


# --- round trips -------------------------------------------------------------------------------
def test_round_trip_is_exact(result, out_uri):
    assert raykfe.save(result, out_uri) == out_uri
    loaded = raykfe.load(out_uri)  # no model=: rebuilt from the model spec in the manifest
    _assert_same(loaded, result)
    assert type(loaded.model) is type(result.model)
    manifest = read_manifest(out_uri)
    assert manifest["format"] == CHECKPOINT_FORMAT
    assert manifest["model_spec"] == {"name": "resnet8", "num_classes": 10, "width": 1.0}
    assert set(manifest["files"]) == set(FILES)


def test_round_trip_of_a_foreign_architecture_needs_the_model(any_uri):
    result = raykfe.prune(_foreign_model(), _batches(3), target="flops:0.5")
    raykfe.save(result, any_uri)
    with pytest.raises(raykfe.StorageError, match=r"pass load\(uri, model=") as excinfo:
        raykfe.load(any_uri)
    _one_line_storage_error(excinfo, any_uri)
    _assert_same(raykfe.load(any_uri, model=_foreign_model()), result)


def test_extra_files_and_metadata_round_trip(result, any_uri):
    raykfe.save(result, any_uri, extra_files={"notes.txt": b"hello"}, metadata={"job": "t"})
    manifest = read_manifest(any_uri)
    assert manifest["metadata"] == {"job": "t"}
    assert raykfe.checkpoint.read_file(any_uri, "notes.txt") == b"hello"
    with pytest.raises(raykfe.StorageError, match="reserved"):
        raykfe.save(result, any_uri, extra_files={MANIFEST: b"{}"})


# --- interrupted writes ------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for the process dying in the middle of a save (a BaseException: nothing catches it)."""


def _die_when_writing(monkeypatch, victim: str) -> list[str]:
    written: list[str] = []
    real = Location.write_bytes

    def write_bytes(self, name, data):
        if name == victim:
            raise Killed(name)
        real(self, name, data)
        written.append(name)

    monkeypatch.setattr(Location, "write_bytes", write_bytes)
    return written


def test_write_interrupted_before_manifest_is_not_visible(result, any_uri, monkeypatch):
    written = _die_when_writing(monkeypatch, MANIFEST)
    with pytest.raises(Killed):
        raykfe.save(result, any_uri)
    monkeypatch.undo()
    assert sorted(written) == sorted(FILES)  # every file but the manifest reached storage
    loc = open_uri(any_uri)
    assert all(loc.exists(name) for name in FILES) and not loc.exists(MANIFEST)
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result") as excinfo:
        raykfe.load(any_uri)
    _one_line_storage_error(excinfo, any_uri)


@pytest.mark.parametrize("victim", [*FILES, MANIFEST])
def test_interrupted_overwrite_leaves_nothing_loadable(result, other_result, any_uri, monkeypatch, victim):
    raykfe.save(result, any_uri)
    _assert_same(raykfe.load(any_uri), result)
    _die_when_writing(monkeypatch, victim)
    with pytest.raises(Killed):
        raykfe.save(other_result, any_uri)
    monkeypatch.undo()
    # the old manifest went first: neither the old result nor a mix of old and new files loads
    assert not open_uri(any_uri).exists(MANIFEST)
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result"):
        raykfe.load(any_uri)
    raykfe.save(other_result, any_uri)  # a re-run completes the overwrite
    _assert_same(raykfe.load(any_uri), other_result)


class _TornLocalFS(pafs.LocalFileSystem):
    """A local filesystem on which the process 'dies' halfway through writing a matching file."""

    def __init__(self, victim_suffix: str):
        super().__init__()
        self.victim_suffix = victim_suffix

    def open_output_stream(self, path, *args, **kwargs):
        stream = super().open_output_stream(path, *args, **kwargs)
        filename = path.rpartition("/")[2]
        if not filename.partition(".tmp-")[0].endswith(self.victim_suffix):  # also a temporary sibling
            return stream

        class Torn:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                stream.close()

            def write(self, data):
                stream.write(data[: len(data) // 2])
                stream.flush()
                raise Killed(path)

        return Torn()


def _torn(loc: Location, victim_suffix: str) -> Location:
    return Location(_TornLocalFS(victim_suffix), loc.root, loc.uri)


def test_local_writes_are_never_torn(tmp_path):
    loc = open_uri(str(tmp_path / "out"))
    store = StageStore(loc)
    store.save_text("plan.json", '{"old": true}')
    with pytest.raises(Killed):
        StageStore(_torn(loc, "plan.json")).save_text("plan.json", '{"new": true, "longer": "text"}')
    assert store.load_text("plan.json") == '{"old": true}'  # the old file, not half of the new one
    # a stage whose marker write died is simply not done (a re-run redoes it)
    with pytest.raises(Killed):
        StageStore(_torn(loc, "stats.json")).save("stats", {"w": torch.ones(3)}, meta={"m": 1})
    assert not store.has("stats")
    assert store.load_checkpoint("stats") is None
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_torn_local_manifest_is_not_a_result(result, tmp_path):
    uri = str(tmp_path / "out")
    raykfe.save(result, uri)
    loc = open_uri(uri)
    manifest = loc.read_bytes(MANIFEST)
    # the last steps of save(): the old manifest is removed, the new one written last ... and torn
    loc.delete(MANIFEST)
    with pytest.raises(Killed):
        _torn(loc, MANIFEST).write_bytes(MANIFEST, manifest)
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result"):
        raykfe.load(uri)


# --- damaged results ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_weights_are_reported(result, any_uri, damage):
    raykfe.save(result, any_uri)
    loc = open_uri(any_uri)
    data = loc.read_bytes("weights.safetensors")
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = data[:-1] + bytes([data[-1] ^ 0xFF])
    loc.write_bytes("weights.safetensors", data)
    with pytest.raises(raykfe.StorageError, match="corrupt") as excinfo:
        raykfe.load(any_uri)
    msg = _one_line_storage_error(excinfo, any_uri)
    assert "weights.safetensors" in msg


def test_corrupt_manifest_is_reported(result, any_uri):
    raykfe.save(result, any_uri)
    open_uri(any_uri).write_bytes(MANIFEST, b'{"format": 1, "fil')
    with pytest.raises(raykfe.StorageError, match="corrupt") as excinfo:
        raykfe.load(any_uri)
    _one_line_storage_error(excinfo, any_uri)


def test_newer_format_asks_for_an_upgrade(result, any_uri):
    raykfe.save(result, any_uri)
    loc = open_uri(any_uri)
    manifest = json.loads(loc.read_bytes(MANIFEST))
    manifest["format"] = CHECKPOINT_FORMAT + 1
    loc.write_bytes(MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(raykfe.StorageError, match="upgrade") as excinfo:
        raykfe.load(any_uri)
    _one_line_storage_error(excinfo, any_uri)


def test_empty_location_has_no_result(any_uri):
    with pytest.raises(raykfe.StorageError, match="no complete raykfe result") as excinfo:
        raykfe.load(any_uri)
    _one_line_storage_error(excinfo, any_uri)


# --- credentials, endpoints, buckets -----------------------------------------------------------
def test_wrong_credentials_are_rejected_with_a_clear_error(result, s3_server, monkeypatch):
    uri = s3_server.uri(f"auth/{uuid.uuid4().hex}")
    with s3_server.enforce_auth() as (key_id, secret):
        # the right keys work while moto checks signatures ...
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        raykfe.save(result, uri)
        _assert_same(raykfe.load(uri), result)
        # ... a wrong secret, an unknown key id are refused, for loading and saving alike
        for bad_id, bad_secret in [(key_id, secret[::-1]), ("AKIAUNKNOWNKEY000000", secret)]:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", bad_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
            for action in (lambda: raykfe.load(uri), lambda: raykfe.save(result, uri)):
                start = time.monotonic()
                with pytest.raises(raykfe.StorageError) as excinfo:
                    action()
                assert time.monotonic() - start < 10
                msg = _one_line_storage_error(excinfo, uri)
                assert "credentials" in msg and "endpoint" in msg
                assert bad_secret not in msg and secret not in msg
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        _assert_same(raykfe.load(uri), result)  # the refused save changed nothing


def test_missing_bucket(result, s3_server):
    uri = s3_server.uri("x", bucket="raykfe-no-such-bucket")
    with pytest.raises(raykfe.StorageError) as excinfo:
        raykfe.save(result, uri)
    msg = _one_line_storage_error(excinfo, uri)
    assert "check the URI" in msg
    with pytest.raises(raykfe.StorageError) as excinfo:
        raykfe.load(uri)
    _one_line_storage_error(excinfo, uri)


def test_unreachable_endpoint_fails_fast(result, s3_server):
    port = free_port()  # nothing listens there
    uri = f"s3://{s3_server.bucket}/x?endpoint_override=http://127.0.0.1:{port}&scheme=http&region=us-east-1"
    for action in (lambda: raykfe.load(uri), lambda: raykfe.save(result, uri)):
        start = time.monotonic()
        with pytest.raises(raykfe.StorageError) as excinfo:
            action()
        elapsed = time.monotonic() - start
        msg = _one_line_storage_error(excinfo, uri)
        assert "endpoint" in msg and "credentials" in msg
        assert elapsed < 5, f"an unreachable endpoint took {elapsed:.1f} s to report"


def test_stage_store_on_an_unreachable_endpoint(s3_server):
    uri = f"s3://{s3_server.bucket}/x?endpoint_override=http://127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    store = StageStore(open_uri(uri))
    for action in (lambda: store.has("stats"), store.clear, lambda: store.load_checkpoint("finetune"),
                   lambda: store.save_text("config.yaml", "a: 1\n")):
        with pytest.raises(raykfe.StorageError) as excinfo:
            action()
        _one_line_storage_error(excinfo, uri)


def test_secret_is_never_written(result, tmp_path, s3_server):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # set by the s3_server fixture
    assert len(secret) > 20
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    local = tmp_path / "out"
    raykfe.save(result, str(local), metadata={"note": "s3 round trip"})
    prefix = f"secret/{uuid.uuid4().hex}"
    uri = s3_server.uri(prefix)
    raykfe.save(result, uri, metadata={"note": "s3 round trip"})
    _assert_same(raykfe.load(uri), result)
    files = {str(p): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    objects = s3_server.objects(prefix)
    assert len(files) == len(objects) == len(FILES) + 1
    for name, data in {**files, **objects}.items():
        assert secret.encode() not in data, f"the secret access key was written to {name}"
        assert key_id.encode() not in data, f"the access key id was written to {name}"


# --- stages on S3 ------------------------------------------------------------------------------
def test_stage_store_round_trip(any_uri):
    store = StageStore(open_uri(any_uri))
    tensors = {"a": torch.randn(3, 4), "b.count": torch.tensor([5], dtype=torch.int64)}
    assert not store.has("stats")
    store.save("stats", tensors, meta={"layers": ["conv1"]})
    assert store.has("stats")
    loaded, meta = StageStore(open_uri(any_uri)).load("stats")
    assert meta == {"layers": ["conv1"]}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    store.save_text("config.yaml", "a: 1\n")
    assert store.load_text("config.yaml") == "a: 1\n"
    assert store.load_text("missing.yaml") is None

    # a damaged stage file is reported, not silently used
    store.loc.write_bytes("stages/stats.safetensors", b"garbage")
    with pytest.raises(raykfe.StorageError, match="corrupt"):
        store.load("stats")


def test_stage_checkpoints_keep_only_the_newest(any_uri):
    store = StageStore(open_uri(any_uri))
    assert store.load_checkpoint("finetune") is None
    first = {"w": torch.zeros(2, 2)}
    second = {"w": torch.ones(2, 2)}
    store.save_checkpoint("finetune", 1, first, {"history": [1]})
    assert store.loc.exists("stages/finetune.ckpt-1.safetensors")
    store.save_checkpoint("finetune", 2, second, {"history": [1, 2]})
    epoch, tensors, meta = StageStore(open_uri(any_uri)).load_checkpoint("finetune")
    assert epoch == 2 and meta == {"history": [1, 2]} and torch.equal(tensors["w"], second["w"])
    assert not store.loc.exists("stages/finetune.ckpt-1.safetensors")  # the older file is deleted
    assert store.loc.exists("stages/finetune.ckpt-2.safetensors")


def test_stage_store_clear(any_uri, request):
    store = StageStore(open_uri(any_uri))
    store.save("base", {"w": torch.zeros(1)})
    store.save_checkpoint("finetune", 3, {"w": torch.ones(1)}, {})
    store.save_text("config.yaml", "x: 1\n")
    store.clear()
    assert not store.has("base")
    assert store.load_checkpoint("finetune") is None
    assert store.load_text("config.yaml") is None
    if any_uri.startswith("s3://"):
        server: S3Server = request.getfixturevalue("s3_server")
        prefix = any_uri.split("?")[0].removeprefix(f"s3://{server.bucket}/")
        left = [k for k in server.objects(prefix) if not k.endswith("/")]  # directory markers may stay
        assert left == []
    else:
        assert [p for p in Path(any_uri).rglob("*") if p.is_file()] == []
    store.clear()  # clearing nothing is fine
    store.save("base", {"w": torch.zeros(1)})  # and the store is usable afterwards
    assert store.has("base")


# --- names and URIs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/../../x", "..", "/etc/x", "a/../b"])
def test_names_cannot_escape_the_prefix(any_uri, name):
    loc = open_uri(any_uri)
    with pytest.raises(raykfe.StorageError, match="escape"):
        loc.write_bytes(name, b"x")
    with pytest.raises(raykfe.StorageError, match="escape"):
        loc.read_bytes(name)


def test_escape_writes_nothing_outside(tmp_path):
    loc = open_uri(str(tmp_path / "out"))
    with pytest.raises(raykfe.StorageError):
        loc.write_bytes("../x", b"x")
    assert not (tmp_path / "x").exists()


def test_file_uris(result, tmp_path):
    target = tmp_path / "my results"  # as_uri() percent-encodes the space
    uri = target.as_uri()
    assert "%20" in uri
    raykfe.save(result, uri)
    assert (target / MANIFEST).is_file()
    _assert_same(raykfe.load(str(target)), result)
    _assert_same(raykfe.load("file://localhost" + str(target)), result)
    # file://results/run1 names a host: it must not quietly become /run1
    with pytest.raises(raykfe.StorageError, match="file:///absolute/path"):
        open_uri("file://results/run1")


@pytest.mark.parametrize("uri", ["", "   ", "ftp://host/x", "hdfs://nn/x"])
def test_bad_uris(uri):
    with pytest.raises(raykfe.StorageError):
        open_uri(uri)


def test_credentials_in_the_uri_are_refused_and_never_echoed():
    from raykfe.storage import open_uri

    with pytest.raises(raykfe.StorageError) as info:
        open_uri("s3://AKIDEXAMPLE:sup3rs3cret@bucket/prefix")
    assert "sup3rs3cret" not in str(info.value) and "environment" in str(info.value)
    # as query options too (pyarrow would accept access_key / secret_key / session_token there)
    for query in ("secret_key=sup3rs3cret", "access_key=AKID&region=us-east-1", "session_token=sup3rs3cret"):
        with pytest.raises(raykfe.StorageError) as info:
            open_uri(f"s3://bucket/prefix?{query}")
        assert "sup3rs3cret" not in str(info.value) and "environment" in str(info.value)
