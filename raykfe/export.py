"""Export a finished result as a self-contained model: ExportedProgram, TorchScript or ONNX (``raykfe export``).

The result (a local path, ``file://``, ``s3://`` or ``gs://`` URI) is read with raykfe's own loader
(plan JSON + safetensors, checked against the manifest; nothing is unpickled), the pruned model is
rebuilt from its plan, and the export runs WITHOUT raykfe afterwards:

* ``pt2`` (recommended for PyTorch): ``torch.export.export`` of the rebuilt model in eval mode with
  a dynamic ``batch`` dimension, saved with ``torch.export.save`` and loaded with plain
  ``torch.export.load(path).module()``;
* ``torchscript`` (for older runtimes; deprecated by torch): ``torch.jit.trace`` of the rebuilt
  model in eval mode, loadable with plain ``torch.jit.load``; the batch dimension is free (tracing
  records shapes symbolically).
* ``onnx``: ``torch.onnx.export(..., dynamo=True)`` (onnxscript), opset :data:`ONNX_OPSET`, one
  input ``input`` ``[batch, C, H, W]`` float32 with a dynamic ``batch`` axis, one output ``logits``.
  Needs ``pip install 'raykfe[export]'`` (onnx, onnxscript, onnxruntime).

Before anything is written the exported bytes are loaded back (``torch.export.load`` /
``torch.jit.load`` / ``onnxruntime``) and their outputs compared with the rebuilt model's on seeded inputs at batch 1
and 3 (the trace uses batch 2, so both sizes exercise the dynamic batch); a mismatch is an error.
The file is written whole (a temporary sibling renamed over ``out`` locally; one atomic PUT on an
object store), so a failed export leaves nothing behind. The same result exported twice gives the
same bytes.

The input shape comes from the result: ``manifest.metadata.input_shape`` (jobs record it), else the
channel plan's ``input_shape``, else ``config.yaml``'s ``data.image_size`` (``[3, S, S]``: every
raykfe dataset yields 3-channel square images), else ``input_shape=`` must be given.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from urllib.parse import urlparse, urlunparse

import torch
from torch import nn

from .errors import ConfigError, RaykfeError, StorageError

__all__ = ["FORMATS", "ONNX_OPSET", "ExportError", "ExportInfo", "export", "export_bytes", "parse_input_shape"]

FORMATS = ("pt2", "torchscript", "onnx")
_FORMAT_HINT = "--format pt2, --format torchscript or --format onnx"
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'raykfe[export]'"
#: batch sizes the exported model is checked at (the trace / export itself uses batch 2)
CHECK_BATCHES = (1, 3)
TRACE_BATCH = 2
#: outputs must agree within ``ATOL * max(1, max |reference|)`` (float32)
ATOL = 1e-4
_EXTENSIONS = {".pt2": "pt2", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript", ".onnx": "onnx"}


class ExportError(RaykfeError):
    """The model cannot be exported, or the exported model does not reproduce it."""


@dataclass
class ExportInfo:
    """What :func:`export` wrote and what it checked."""

    out: str
    format: str
    which: str  # "pruned" or "base"
    input_shape: list[int]
    output_shape: list[int]
    size: int
    max_abs_diff: float
    checked_batches: tuple[int, ...] = CHECK_BATCHES
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        what = "base" if self.which == "base" else "pruned"
        m = self.metadata
        origin = f"{m.get('method')} {m.get('target')}, " if self.which == "pruned" and m.get("method") else ""
        kind = {"onnx": f"ONNX opset {m.get('opset')}", "pt2": "ExportedProgram (torch.export)"}.get(self.format, "TorchScript")
        io_names = "input 'input' " if self.format == "onnx" else "input "
        out_name = "output 'logits' " if self.format == "onnx" else "output "
        runner = {"onnx": "onnxruntime", "pt2": "torch.export.load"}.get(self.format, "torch.jit.load")
        return (
            f"exported the {what} model ({origin}{m.get('model') or 'custom architecture'}) to {self.out}: {kind}, "
            f"{io_names}float32 [batch, {', '.join(map(str, self.input_shape))}], {out_name}[batch, "
            f"{', '.join(map(str, self.output_shape))}], {_human_bytes(self.size)}\n"
            f"{m.get('batchnorms_folded') or 0} BatchNorm layer(s) folded into the conv before them\n"
            f"checked: {runner} reproduces the rebuilt model at batch {' and '.join(map(str, self.checked_batches))} "
            f"(max |diff| {self.max_abs_diff:.1e})"
        )


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# --- arguments --------------------------------------------------------------------------------
def resolve_format(fmt: str | None, out: str) -> str:
    if fmt is None:
        ext = os.path.splitext(urlparse(out).path if "://" in out else out)[1].lower()
        if ext in _EXTENSIONS:
            return _EXTENSIONS[ext]
        raise ConfigError(f"cannot tell the export format from {out!r}: give {_FORMAT_HINT}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose {_FORMAT_HINT}")
    return fmt


def parse_input_shape(text) -> list[int]:
    """``"3,32,32"`` / ``"3x32x32"`` / a sequence -> ``[3, 32, 32]`` (without the batch dimension)."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace("x", ",").split(",")]
    else:
        parts = list(text)
    try:
        dims = [int(p) for p in parts]
        if not dims or any(d < 1 for d in dims) or any(isinstance(p, bool) or (isinstance(p, float) and p != int(p)) for p in parts):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"input shape {text!r} is not a list of positive sizes without the batch dimension: use e.g. 3,32,32") from None
    return dims


def require_onnx() -> None:
    """Raise a one-line error naming the install command when an ONNX package is missing."""
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX export needs {', '.join(ONNX_PACKAGES)} ({', '.join(missing)} missing): {INSTALL_HINT}")


@dataclass
class _Target:
    """Where the exported file goes: a Location (its parent) and the file name in it."""

    uri: str
    parent: str
    name: str
    local: bool


def check_out(out: str, force: bool) -> _Target:
    """Validate ``out`` before any work: its directory exists, it is not a directory, and it does not
    exist unless ``force``."""
    from .storage import open_uri

    if not isinstance(out, str) or not out.strip():
        raise ConfigError("no output file: give --out PATH (e.g. --out model.onnx)")
    parsed = urlparse(out)
    local = parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt")
    if local:
        loc = open_uri(out)  # resolves file:// and ~, refuses file://host/...
        path = loc.root
        if out.endswith(("/", os.sep)) or os.path.isdir(path):
            raise ConfigError(f"--out {out!r} is a directory: give a file path, e.g. {os.path.join(out, 'model.pt')}")
        parent, name = os.path.split(path)
        if not os.path.isdir(parent):
            raise ConfigError(f"the directory of --out {out!r} ({parent}) does not exist: create it first")
        if os.path.exists(path) and not force:
            raise ConfigError(f"--out {out!r} already exists: pass --force to replace it")
        return _Target(out, parent, name, True)
    dirname, _, name = parsed.path.rpartition("/")
    if not name:
        raise ConfigError(f"--out {out!r} names no file: give an object key, e.g. {out.rstrip('/')}/model.onnx")
    parent = urlunparse(parsed._replace(path=dirname))
    loc = open_uri(parent)  # refuses credentials in the URI and unknown schemes
    if loc.exists(name) and not force:
        raise ConfigError(f"--out {out!r} already exists: pass --force to replace it")
    return _Target(out, parent, name, False)


# --- loading ----------------------------------------------------------------------------------
def _load(uri: str, base: bool, model: nn.Module | None):
    """(model in eval mode, plan, manifest) of the result at ``uri``."""
    import copy

    from .checkpoint import load, plan_from_json, read_file, read_manifest
    from .storage import open_uri

    try:
        manifest = read_manifest(uri)
    except StorageError:
        if open_uri(uri).exists("sweep.json"):
            raise StorageError(
                f"{uri!r} holds a sweep, not one result: export one of its trials, e.g. {uri.rstrip('/')}/trials/<trial>"
            ) from None
        raise
    spec = manifest.get("model_spec")
    if model is None and not spec:
        raise StorageError(
            f"the result at {uri!r} was made from a model raykfe did not build (no model spec): export it from Python "
            "with raykfe.export.export(uri, out, model=<an instance of the original architecture>)"
        )
    plan = plan_from_json(read_file(uri, "plan.json", manifest).decode(errors="replace"))
    if not base:
        return load(uri, model=model).model, plan, manifest
    if "base.safetensors" not in manifest.get("files", {}):
        raise StorageError(
            f"the result at {uri!r} stores no base model (base.safetensors; only jobs run with raykfe prune do): "
            "export the pruned model instead (drop --base)"
        )
    from safetensors.torch import load as st_load

    data = read_file(uri, "base.safetensors", manifest)
    try:  # safetensors only: anything else in its place is refused, never executed
        state = st_load(data)
    except Exception as exc:
        raise StorageError(f"base.safetensors at {uri!r} is not a safetensors file ({_first_line(exc)}): re-run the job that wrote it") from None
    if model is not None:
        net = copy.deepcopy(model)
    else:
        from .models import build_model

        net = build_model(**spec)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise StorageError(f"base.safetensors at {uri!r} does not fit the architecture ({first})") from None
    return net.eval(), plan, manifest


def resolve_input_shape(uri: str, manifest: dict, plan) -> list[int]:
    """The input shape (no batch) recorded with the result; see the module docstring for the order."""
    shape = (manifest.get("metadata") or {}).get("input_shape") or plan.input_shape
    if shape:
        return parse_input_shape(shape)
    if "config.yaml" in manifest.get("files", {}):
        import yaml

        from .checkpoint import read_file

        try:
            cfg = yaml.safe_load(read_file(uri, "config.yaml", manifest)) or {}
            size = int(cfg["data"]["image_size"])
        except (KeyError, TypeError, ValueError, yaml.YAMLError):
            size = 0
        if size > 0:
            return [3, size, size]
    raise ConfigError(f"the result at {uri!r} records no input shape: give it, e.g. --input-shape 3,32,32")


# --- export -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _fresh_script_types():
    """Trace into a fresh TorchScript compilation unit so that class names are not mangled by what
    the process traced before (``___torch_mangle_N``): the archive then depends only on the model.
    Private torch API; without it exports are still identical across fresh processes."""
    try:
        import torch.jit._recursive as rec
        import torch.jit._state as state

        saved = (state._python_cu, rec.concrete_type_store)
        state._python_cu = torch._C.CompilationUnit()
        rec.concrete_type_store = rec.ConcreteTypeStore()
    except (AttributeError, ImportError):  # pragma: no cover - torch internals moved
        yield
        return
    try:
        yield
    finally:
        state._python_cu, rec.concrete_type_store = saved


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def _example(shape: list[int], batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


def _torchscript_bytes(model: nn.Module, shape: list[int], meta: dict) -> bytes:
    with _fresh_script_types(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and TracerWarnings: the outputs are checked below
        try:
            traced = torch.jit.trace(model, _example(shape, TRACE_BATCH, 0), check_trace=False, _store_inputs=False)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace cannot trace the model ({type(exc).__name__}: {_first_line(exc)}): try --format onnx") from None
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={"raykfe.json": json.dumps(meta, sort_keys=True)})
    return _strip_debug_info(buf.getvalue())


def _strip_debug_info(data: bytes) -> bytes:
    """The TorchScript (or ExportedProgram) archive without its ``*.debug_pkl`` records and its
    random ``serialization_id``. They hold the Python call stack
    of the trace (absolute paths of the installation and of whoever called :func:`export`), which
    would make the bytes depend on the caller and leak local paths; ``torch.jit.load`` does not need
    them. The archive is rewritten with torch's own writer (64-byte aligned records)."""
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name == ".data/serialization_id":  # the id is re-derived from the content
            continue
        record = reader.get_record(name)
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()
    return out.getvalue()


def _pt2_bytes(model: nn.Module, shape: list[int], meta: dict) -> bytes:
    """``torch.export`` with a dynamic batch; the metadata rides along as an extra file."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, (_example(shape, TRACE_BATCH, 0),), dynamic_shapes=({0: batch},))
        except Exception as exc:
            raise ExportError(f"torch.export cannot export the model ({type(exc).__name__}: {_first_line(exc)}): "
                              "try --format torchscript") from None
        for node in program.graph.nodes:  # provenance: ids of this process's graphs, local source paths
            for key in ("from_node", "stack_trace"):
                node.meta.pop(key, None)
        buf = io.BytesIO()
        torch.export.save(program, buf, extra_files={"raykfe.json": json.dumps(meta, sort_keys=True)})
    return _strip_debug_info(buf.getvalue())


def _onnx_bytes(model: nn.Module, shape: list[int], meta: dict, opset: int) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (_example(shape, TRACE_BATCH, 0),), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: batch},), opset_version=opset, verbose=False, optimize=True,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx cannot export the model ({type(exc).__name__}: {_first_line(exc)}): try --format torchscript") from None
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"raykfe.{key}", json.dumps(value) if not isinstance(value, str) else value
    if proto.ByteSize() >= 2**31:
        raise ExportError("the model is too large for a single-file ONNX model (2 GB): use --format torchscript")
    import onnx

    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def _run_exported(data: bytes, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "pt2":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.export.load(io.BytesIO(data)).module()
        with torch.no_grad():
            return loaded(x)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            out = loaded(x)
        return out
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def _export_checked(model: nn.Module, fmt: str, input_shape, metadata: dict | None, opset: int,
                    fold_bn: bool) -> tuple[bytes, float, list[int], dict]:
    """:func:`export_bytes`, also returning the metadata written into the file."""
    fmt = resolve_format(fmt, "")
    shape = parse_input_shape(input_shape)
    if fmt == "onnx":
        require_onnx()
    model = model.eval().float().cpu()
    refs = []
    with torch.no_grad():
        for i, n in enumerate(CHECK_BATCHES):
            x = _example(shape, n, 1 + i)
            try:
                y = model(x)
            except Exception as exc:
                raise ConfigError(f"the model does not run on input [batch, {', '.join(map(str, shape))}] ({_first_line(exc)}): "
                                  "give the right --input-shape") from None
            if not isinstance(y, torch.Tensor):
                raise ExportError(f"the model returns {type(y).__name__}, not one tensor: only single-output classifiers are exported")
            refs.append((x, y))
    meta = {**(metadata or {}), "format": fmt, "input_shape": shape}
    if fold_bn:
        from .fold import fold_batchnorms

        model, meta["batchnorms_folded"], _ = fold_batchnorms(model)
    if fmt == "onnx":
        meta["opset"] = opset
        data = _onnx_bytes(model, shape, meta, opset)
    elif fmt == "pt2":
        data = _pt2_bytes(model, shape, meta)
    else:
        data = _torchscript_bytes(model, shape, meta)
    worst = 0.0
    for x, y in refs:
        got = _run_exported(data, fmt, x)
        if got.shape != y.shape:
            raise ExportError(f"the exported model gives shape {list(got.shape)} at batch {x.shape[0]}, the model {list(y.shape)}: nothing was written")
        diff = float((got.float() - y.float()).abs().max())
        tol = ATOL * max(1.0, float(y.abs().max()))
        if not diff <= tol:  # also catches NaN
            raise ExportError(
                f"the exported model differs from the rebuilt model by {diff:.2e} at batch {x.shape[0]} (tolerance {tol:.1e}): "
                "nothing was written; try the other --format"
            )
        worst = max(worst, diff)
    return data, worst, list(refs[0][1].shape[1:]), meta


def export_bytes(model: nn.Module, fmt: str, input_shape, *, metadata: dict | None = None, opset: int = ONNX_OPSET,
                 fold_bn: bool = True) -> tuple[bytes, float, list[int]]:
    """``model`` (any module taking one float32 ``[N, *input_shape]`` tensor and returning one tensor)
    exported to ``fmt`` in memory and checked: ``(bytes, max |diff| at CHECK_BATCHES, output shape)``.
    With ``fold_bn`` every BatchNorm that directly follows a conv is folded into it first
    (:mod:`raykfe.fold`; the count is in the metadata), and the check compares the exported model
    with the UNFOLDED one.
    ``model`` is put in eval mode (float32, CPU). Not thread-safe (TorchScript tracing swaps torch's
    global type registry for the duration of the trace)."""
    return _export_checked(model, fmt, input_shape, metadata, opset, fold_bn)[:3]


def export(
    uri: str,
    out: str,
    format: str | None = None,  # noqa: A002 - the CLI's name
    *,
    base: bool = False,
    input_shape=None,
    force: bool = False,
    model: nn.Module | None = None,
    opset: int = ONNX_OPSET,
    fold_bn: bool = True,
) -> ExportInfo:
    """Export the pruned (or, with ``base=True``, the base) model of the result at ``uri`` to ``out``.

    ``format``: ``"pt2"``, ``"torchscript"`` or ``"onnx"`` (None: from ``out``'s extension, ``.pt2``,
    ``.onnx`` or ``.pt``/``.pth``/``.ts``). ``out``: a local file path (its directory must exist) or an
    ``s3://`` / ``gs://`` object URI; an existing file is replaced only with ``force``.
    ``input_shape``: ``[C, H, W]`` when the result records none. ``model``: an instance of the
    original architecture, for results of models raykfe did not build. ``fold_bn``: BatchNorms that
    directly follow a conv are folded into it (exact in eval mode; checked against the unfolded
    model). Nothing is written on error.
    """
    from .storage import open_uri

    target = check_out(out, force)
    fmt = resolve_format(format, out)
    if fmt == "onnx":
        require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ConfigError(f"ONNX opset {opset!r} is not supported: use 18 to 23 (default {ONNX_OPSET})")
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    net, plan, manifest = _load(uri, base, model)
    if target.local and open_uri(uri).root == target.parent and target.name in {*manifest.get("files", {}), "manifest.json"}:
        raise ConfigError(f"--out {out!r} is a file of the result itself: write the export elsewhere")
    shape = shape or resolve_input_shape(uri, manifest, plan)
    spec = manifest.get("model_spec") or {}
    meta = {
        "producer": "raykfe",
        "model": spec.get("name"),
        "num_classes": spec.get("num_classes"),
        "which": "base" if base else "pruned",
        "method": getattr(plan, "method", None),
        "target": getattr(plan, "target", None),
        "weights_sha256": manifest.get("files", {}).get("base.safetensors" if base else "weights.safetensors"),
    }
    data, worst, out_shape, written = _export_checked(net, fmt, shape, meta, opset, fold_bn)
    meta["batchnorms_folded"] = written.get("batchnorms_folded", 0)
    open_uri(target.parent).write_bytes(target.name, data)  # temp sibling + rename locally, one PUT remotely
    return ExportInfo(out, fmt, meta["which"], shape, out_shape, len(data), worst, CHECK_BATCHES,
                      {**meta, "opset": opset if fmt == "onnx" else None})
