"""``raykfe export``: results as self-contained ExportedProgram / TorchScript / ONNX models that run without raykfe.

Three results: a tiny digits JOB pruned with EigenDamage (three-layer rebuilt convs; its manifest
records the input shape), resnet8 pruned with a channel method (l1, via the API; the channel plan
records the input shape) and torchvision resnet18 at 32x32 pruned with EigenDamage (via the API;
nothing recorded, the shape is given). Each is exported in every format and run in a FRESH
interpreter where ``import raykfe`` is impossible (ExportedProgram with plain ``torch.export.load``,
TorchScript with plain ``torch.jit.load``, ONNX with onnxruntime); outputs match the rebuilt pruned model at batch 1 and 5 (the export traced batch
2). Exports are byte-identical when repeated, an s3:// result exports to an s3:// object, and bad
input is one line ``raykfe: error: ...``, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import raykfe
from raykfe import cli
from raykfe.export import export
from raykfe.models import build_model
from raykfe.surgery import KFEConv2d

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),  # TorchScript is deprecated, still supported
    pytest.mark.slow,  # its module fixture runs two jobs
]

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
BATCHES = (1, 5)
FORMATS = {"pt2": "pt2", "torchscript": "pt", "onnx": "onnx"}
TINY_JOB = [
    "model.name=resnet8", "data.image_size=16", "base.epochs=0", "finetune.epochs=0", "stats.max_batches=1",
    "stats.batch_size=16", "prune.target=flops:0.5", "progress=false", "runtime=local",
]
#: input shapes (without batch) of the three results
SHAPES = {"kfe": (3, 16, 16), "l1": (3, 16, 16), "resnet18": (3, 32, 32)}


def _digits_batches(size: int, n: int = 2, bs: int = 16):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images[: n * bs], dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.as_tensor(d.target[: n * bs])
    return [(x[i * bs:(i + 1) * bs].contiguous(), y[i * bs:(i + 1) * bs]) for i in range(n)]


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    """{name: local URI} of the three results (built once for the module)."""
    from raykfe.config import load_config
    from raykfe.pipeline import run_job

    root = tmp_path_factory.mktemp("results")
    uris = {k: str(root / k) for k in SHAPES}
    cfg = load_config(str(REPO / "jobs/digits.yaml"), TINY_JOB + [f"output.uri={uris['kfe']}"])
    run_job(cfg, None, log=lambda m: None)
    torch.manual_seed(0)
    raykfe.save(raykfe.prune(build_model("resnet8", 10), _digits_batches(16), method="l1", target="flops:0.5"), uris["l1"])
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    torch.manual_seed(0)
    raykfe.save(raykfe.prune(build_model("resnet18", 10), batches, target="flops:0.5"), uris["resnet18"])
    return uris


@pytest.fixture(scope="module")
def pruned(results):
    """The rebuilt pruned models (the reference)."""
    return {k: raykfe.load(uri).model.eval() for k, uri in results.items()}


@pytest.fixture(scope="module")
def exported(results, tmp_path_factory):
    """{(result, format): path} of every export (API), input shape from the result where recorded."""
    out = tmp_path_factory.mktemp("exported")
    paths = {}
    for key, uri in results.items():
        for fmt, ext in FORMATS.items():
            path = out / f"{key}.{ext}"
            shape = SHAPES[key] if key == "resnet18" else None  # recorded by the job / the channel plan
            info = export(uri, str(path), fmt, input_shape=shape)
            assert info.input_shape == list(SHAPES[key]) and info.output_shape == [10] and info.max_abs_diff <= ATOL
            assert path.stat().st_size == info.size
            paths[key, fmt] = path
    return paths


FRESH = r"""
import json, sys
sys.modules["raykfe"] = None  # any import of raykfe now fails: the files must be self-contained
import numpy as np, onnxruntime as ort, torch
jobs = json.loads(sys.argv[1])
for job in jobs:
    x = np.load(job["input"])
    if job["format"] == "torchscript":
        model = torch.jit.load(job["path"])
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
    elif job["format"] == "pt2":
        model = torch.export.load(job["path"]).module()
        with torch.no_grad():
            y = model(torch.from_numpy(x)).numpy()
    else:
        y = ort.InferenceSession(job["path"], providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]
    np.save(job["output"], y)
assert not [m for m in sys.modules if m.startswith("raykfe.")]
print("ok")
"""


@pytest.fixture(scope="module")
def fresh_outputs(exported, pruned, tmp_path_factory):
    """Run every exported file in ONE fresh interpreter without raykfe; {(result, format, batch): (got, want)}."""
    work = tmp_path_factory.mktemp("fresh")
    jobs, expected = [], {}
    for (key, fmt), path in exported.items():
        for n in BATCHES:
            x = torch.randn(n, *SHAPES[key], generator=torch.Generator().manual_seed(100 + n))
            with torch.no_grad():
                want = pruned[key](x).numpy()
            np.save(work / f"{key}-{fmt}-{n}-in.npy", x.numpy())
            jobs.append({"format": fmt, "path": str(path), "input": str(work / f"{key}-{fmt}-{n}-in.npy"),
                         "output": str(work / f"{key}-{fmt}-{n}-out.npy")})
            expected[key, fmt, n] = want
    proc = subprocess.run([sys.executable, "-c", FRESH, json.dumps(jobs)], capture_output=True, text=True, cwd=work,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    return {k: (np.load(work / f"{k[0]}-{k[1]}-{k[2]}-out.npy"), v) for k, v in expected.items()}


def test_results_cover_kfe_and_channel_surgery(pruned):
    assert sum(isinstance(m, KFEConv2d) for m in pruned["kfe"].modules()) > 0
    assert sum(isinstance(m, KFEConv2d) for m in pruned["resnet18"].modules()) > 0
    assert not any(isinstance(m, KFEConv2d) for m in pruned["l1"].modules())
    widths = {m.out_channels for m in pruned["l1"].modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths - {16, 32, 64}, widths  # channels were removed


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("key", list(SHAPES))
def test_exported_model_matches_without_raykfe(fresh_outputs, key, fmt):
    for n in BATCHES:
        got, want = fresh_outputs[key, fmt, n]
        assert got.shape == want.shape == (n, 10)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL, err_msg=f"{key} {fmt} batch {n}")


def test_export_is_deterministic(results, exported, tmp_path):
    """The same result gives the same bytes, also after other models were traced in this process."""
    for fmt, ext in FORMATS.items():
        again = tmp_path / f"again.{ext}"
        export(results["kfe"], str(again), fmt)
        assert again.read_bytes() == exported["kfe", fmt].read_bytes(), fmt


def test_pt2_is_an_exported_program_with_a_dynamic_batch_and_metadata(results, exported):
    """The recommended PyTorch format: ``torch.export.load`` gives an ExportedProgram whose batch
    is symbolic, with raykfe's record beside it."""
    extra = {"raykfe.json": ""}
    program = torch.export.load(str(exported["kfe", "pt2"]), extra_files=extra)
    assert isinstance(program, torch.export.ExportedProgram)
    (spec,) = [s for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    batch = program.graph.find_nodes(op="placeholder", target=spec.arg.name)[0].meta["val"].shape[0]
    assert not isinstance(batch, int)  # a symbol, not the traced batch of 2
    meta = json.loads(extra["raykfe.json"])
    assert meta["format"] == "pt2" and meta["method"] == "eigendamage" and meta["input_shape"] == [3, 16, 16]
    # every BatchNorm of resnet8 follows a conv alone: all folded, none left in the program
    assert meta["batchnorms_folded"] == 9
    assert not [n for n in program.graph.nodes if "batch_norm" in str(n.target)]


def test_onnx_has_a_dynamic_batch_and_metadata(results, exported):
    import onnx

    model = onnx.load(str(exported["kfe", "onnx"]))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert [o.name for o in model.graph.output] == ["logits"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["raykfe.method"] == "eigendamage" and meta["raykfe.which"] == "pruned"
    manifest = json.loads(Path(results["kfe"], "manifest.json").read_text())
    assert meta["raykfe.weights_sha256"] == manifest["files"]["weights.safetensors"]


def test_base_model_export(results, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "base.pt"
    info = export(results["kfe"], str(out), "torchscript", base=True)
    assert info.which == "base"
    base = build_model("resnet8", 10)
    base.load_state_dict(load_file(os.path.join(results["kfe"], "base.safetensors")))
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), base.eval()(x), atol=ATOL, rtol=ATOL)
    with pytest.raises(raykfe.StorageError, match="stores no base model"):
        export(results["l1"], str(tmp_path / "nobase.pt"), "torchscript", base=True)
    assert not (tmp_path / "nobase.pt").exists()


def test_old_result_without_recorded_shape_uses_its_config(results, tmp_path):
    """Results written before the input shape was recorded: ``data.image_size`` from config.yaml."""
    old = tmp_path / "old"
    shutil.copytree(results["kfe"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["metadata"].pop("input_shape")
    (old / "manifest.json").write_text(json.dumps(manifest))
    info = export(str(old), str(tmp_path / "old.pt"), "torchscript")
    assert info.input_shape == [3, 16, 16]
    # without a config either, the shape must be given
    with pytest.raises(raykfe.ConfigError, match="records no input shape"):
        export(results["resnet18"], str(tmp_path / "r.pt"), "torchscript")


def test_cli_end_to_end(results, tmp_path):
    out = tmp_path / "model.pt"  # format from the extension
    env = {k: v for k, v in os.environ.items() if k != "RAYKFE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "raykfe.cli", "export", results["kfe"], "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "TorchScript" in proc.stdout and "checked" in proc.stdout and "[batch, 3, 16, 16]" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]  # no temporary left


def test_s3_result_to_s3_object(results, exported, s3_server):
    from raykfe.storage import open_uri

    src = s3_server.uri(f"results/{uuid.uuid4().hex}")
    loc = open_uri(src)
    names = sorted(os.listdir(results["l1"]), key=lambda n: n == "manifest.json")  # the manifest last
    for name in names:
        loc.write_bytes(name, Path(results["l1"], name).read_bytes())
    key = f"exports/{uuid.uuid4().hex}/l1.pt"
    out = s3_server.uri(key)
    info = export(src, out, "torchscript")
    assert info.input_shape == [3, 16, 16]
    objects = s3_server.objects(key.rpartition("/")[0])
    assert list(objects) == [key]
    assert objects[key] == exported["l1", "torchscript"].read_bytes()
    with pytest.raises(raykfe.ConfigError, match="already exists"):
        export(src, out, "torchscript")
    export(src, out, "torchscript", force=True)


# --- bad input: one line, exit 2, nothing written ----------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["export", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("raykfe: error:") and needle in lines[0], err
    assert "Traceback" not in err


BAD = [
    ("missing result", lambda r, d: [str(d / "nothing"), "--out", str(d / "m.pt")], "no complete raykfe result"),
    ("unknown format", lambda r, d: [r["kfe"], "--format", "tflite", "--out", str(d / "m.pt")], "unknown export format"),
    ("no format", lambda r, d: [r["kfe"], "--out", str(d / "m.bin")], "--format pt2, --format torchscript or --format onnx"),
    ("no out", lambda r, d: [r["kfe"], "--format", "onnx"], "--out"),
    ("missing dir", lambda r, d: [r["kfe"], "--out", str(d / "no" / "m.pt")], "does not exist"),
    ("out is a dir", lambda r, d: [r["kfe"], "--out", str(d)], "is a directory"),
    ("existing out", lambda r, d: [r["kfe"], "--out", str(d / "keep.pt")], "pass --force"),
    ("bad shape", lambda r, d: [r["resnet18"], "--out", str(d / "m.pt"), "--input-shape", "3,a"], "input shape"),
    ("wrong shape", lambda r, d: [r["resnet18"], "--out", str(d / "m.pt"), "--input-shape", "1,32,32"], "does not run"),
    ("no base", lambda r, d: [r["l1"], "--base", "--out", str(d / "m.pt")], "stores no base model"),
    ("needs shape", lambda r, d: [r["resnet18"], "--out", str(d / "m.pt")], "--input-shape 3,32,32"),
    ("over the result", lambda r, d: [r["l1"], "--format", "torchscript", "--force", "--out", f"{r['l1']}/plan.json"],
     "a file of the result itself"),
]


@pytest.mark.parametrize("make_args,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(results, tmp_path, capsys, make_args, needle):
    (tmp_path / "keep.pt").write_bytes(b"old")
    rc, out, err = _cli(capsys, *make_args(results, tmp_path))
    _one_line_error(rc, err, needle)
    assert sorted(os.listdir(tmp_path)) == ["keep.pt"] and (tmp_path / "keep.pt").read_bytes() == b"old"


def test_incomplete_or_corrupt_result(results, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(results["kfe"], partial)
    (partial / "manifest.json").unlink()  # a run that died before its manifest
    rc, _, err = _cli(capsys, str(partial), "--out", str(tmp_path / "m.pt"))
    _one_line_error(rc, err, "no complete raykfe result")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(results["kfe"], corrupt)
    data = bytearray((corrupt / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "weights.safetensors").write_bytes(bytes(data))
    rc, _, err = _cli(capsys, str(corrupt), "--out", str(tmp_path / "m.pt"))
    _one_line_error(rc, err, "corrupt")
    assert not (tmp_path / "m.pt").exists()


def test_missing_onnx_packages(results, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    rc, _, err = _cli(capsys, results["kfe"], "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    _one_line_error(rc, err, "pip install 'raykfe[export]'")
    assert "onnxscript missing" in err and os.listdir(tmp_path) == []


def test_force_replaces_and_a_failed_check_keeps_the_old_file(results, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")
    import raykfe.export as ex

    real = ex._run_exported
    monkeypatch.setattr(ex, "_run_exported", lambda data, fmt, x: real(data, fmt, x) + 1.0)  # a broken export
    rc, _, err = _cli(capsys, results["kfe"], "--out", str(out), "--force")
    _one_line_error(rc, err, "differs from the rebuilt model")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.pt"]
    monkeypatch.setattr(ex, "_run_exported", real)
    rc, stdout, err = _cli(capsys, results["kfe"], "--out", str(out), "--force")
    assert rc == 0, err
    assert torch.jit.load(str(out)) is not None and os.listdir(tmp_path) == ["m.pt"]
