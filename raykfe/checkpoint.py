"""Save / load a pruned model: a plan (JSON) and weights (safetensors), rebuilt on load.

Layout under the output URI::

    plan.json             the plan (pure data, raykfe.plan.Plan)
    weights.safetensors   the pruned model's state_dict
    report.json           per-layer report and job metrics
    manifest.json         WRITTEN LAST: format version, model spec, sha256 of every file above

A result is visible only through its manifest, so a write that dies before the manifest leaves
nothing loadable; a file whose hash does not match is reported as corrupt. Loading never unpickles:
it builds the architecture from the model spec (:func:`raykfe.models.build_model`) or from a model
the caller passes, replaces the pruned layers by their shells in the plan's forms (three layers or
folded), and loads the weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Mapping

from torch import nn

from .errors import ConfigError, StorageError
from .plan import Plan
from .storage import open_uri
from .surgery import rebuild

__all__ = ["save", "load", "CHECKPOINT_FORMAT", "MANIFEST", "plan_from_json", "ModelRecipe", "read_manifest", "read_file"]

CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class ModelRecipe:
    """How to rebuild a model anywhere (a Train worker, a later run): a registry spec
    (:func:`raykfe.models.build_model`) and, for a pruned model, its plan as a dict."""

    spec: dict
    plan: dict | None = None

    def build(self) -> nn.Module:
        from .models import build_model

        model = build_model(**self.spec)
        if self.plan is not None:
            model = rebuild(model, Plan.from_dict(self.plan))
        return model


def plan_from_json(text: str) -> Plan:
    """The plan of a result (any format raykfe wrote); a one-line StorageError when it is not one."""
    try:
        d = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise StorageError("plan.json is not valid JSON: re-run the job that wrote it") from None
    if not isinstance(d, dict):
        raise StorageError("plan.json does not hold a plan: re-run the job that wrote it")
    try:
        return Plan.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise StorageError(f"plan.json does not hold a valid plan ({type(exc).__name__}: {first}): re-run the job that wrote it") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(result, uri: str, *, extra_files: Mapping[str, bytes] | None = None, metadata: dict | None = None) -> str:
    """Write ``result`` (a :class:`raykfe.PruneResult`) under ``uri``; returns the URI.

    ``extra_files`` (name -> bytes) are stored beside it and listed in the manifest.
    """
    from safetensors.torch import save as st_save

    loc = open_uri(uri)
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    files: dict[str, bytes] = {
        "plan.json": result.plan.to_json().encode(),
        "weights.safetensors": st_save(state, metadata={"format": str(CHECKPOINT_FORMAT)}),
        "report.json": json.dumps({"layers": result.report}, indent=1, default=str).encode(),
    }
    for name, data in (extra_files or {}).items():
        if name == MANIFEST or name in files:
            raise StorageError(f"extra file name {name!r} is reserved")
        files[name] = data
    spec = getattr(result.model, "raykfe_spec", None)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "kind": "raykfe.pruned_model",
        "model_spec": spec,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: _sha256(data) for name, data in files.items()},
        "metadata": metadata or {},
    }
    loc.delete(MANIFEST)  # the old result stops being visible before any of its files change
    for name, data in files.items():
        loc.write_bytes(name, data)
    loc.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return uri


def read_manifest(uri: str) -> dict:
    loc = open_uri(uri)
    if not loc.exists(MANIFEST):
        raise StorageError(
            f"no complete raykfe result at {uri!r} (no {MANIFEST}; an interrupted write leaves none): "
            "check the URI or re-run the job"
        )
    try:
        manifest = json.loads(loc.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError):
        raise StorageError(f"{MANIFEST} at {uri!r} is corrupt: re-run the job that wrote it") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(fmt, int):
        raise StorageError(f"{MANIFEST} at {uri!r} is not a raykfe manifest: check the URI")
    if fmt > CHECKPOINT_FORMAT:
        raise StorageError(
            f"the result at {uri!r} has checkpoint format {fmt}, newer than this raykfe reads ({CHECKPOINT_FORMAT}): upgrade raykfe"
        )
    return manifest


def read_file(uri: str, name: str, manifest: dict | None = None) -> bytes:
    """One file of a saved result, checked against the manifest's hash."""
    manifest = manifest or read_manifest(uri)
    expected = manifest.get("files", {}).get(name)
    if expected is None:
        raise StorageError(f"{name!r} is not part of the result at {uri!r}")
    data = open_uri(uri).read_bytes(name)
    if _sha256(data) != expected:
        raise StorageError(f"{name!r} at {uri!r} is corrupt or truncated (hash mismatch): re-run the job that wrote it")
    return data


def load(uri: str, model: nn.Module | None = None):
    """Rebuild a saved pruned model -> :class:`raykfe.PruneResult` (``stats`` is None).

    ``model``: an instance of the ORIGINAL (unpruned) architecture, needed only when the result was
    made from a model that raykfe did not build itself (no model spec in the manifest).
    """
    from safetensors.torch import load as st_load

    from .engine import PruneResult

    manifest = read_manifest(uri)
    plan = plan_from_json(read_file(uri, "plan.json", manifest).decode(errors="replace"))
    weights = read_file(uri, "weights.safetensors", manifest)
    try:  # safetensors only: a pickle (or anything else) in its place is refused, never executed
        state = st_load(weights)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"weights at {uri!r} are not a safetensors file ({first}): re-run the job that wrote them") from None
    try:
        report = json.loads(read_file(uri, "report.json", manifest)).get("layers", [])
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise StorageError(f"report.json at {uri!r} is not a raykfe report: re-run the job that wrote it") from None
    spec = manifest.get("model_spec")
    if model is not None:
        base = copy.deepcopy(model)
    elif spec:
        from .models import build_model

        base = build_model(**spec)
    else:
        raise StorageError(
            f"the result at {uri!r} was made from a model raykfe did not build (no model spec): "
            "pass load(uri, model=<an instance of the original architecture>)"
        )
    pruned = rebuild(base, plan)
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StorageError(
            f"weights at {uri!r} do not fit the rebuilt model (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}): pass the original architecture as load(uri, model=...)"
        )
    pruned.eval()
    return PruneResult(pruned, plan, report, None, {})
