"""Finished stages of a job, kept under ``<output uri>/stages/`` so that a re-run resumes.

Each stage is a safetensors file plus a small JSON marker written LAST (with the file's sha256):
a stage is done only when its marker exists and the hash matches, so a run killed mid-write simply
redoes that stage. Training stages also keep a per-epoch checkpoint (``<stage>.ckpt.json`` points
at the newest ``<stage>.ckpt-<epoch>.safetensors``), from which a re-run continues.

    stages/config.yaml                     the resolved config of the job these stages belong to
    stages/base.safetensors  + .json       trained base model
    stages/stats.safetensors + .json       K-FAC sums and counts of every pruned layer
    stages/eigen.safetensors + .json       eigenbases (Q_A, l_A, Q_S, l_S) of every pruned layer
    stages/plan.json                       the plan
    stages/<train stage>.ckpt-E.safetensors, .ckpt.json   the last epoch's model + optimizer state
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .errors import StorageError
from .storage import Location

__all__ = ["StageStore", "optimizer_to_tensors", "optimizer_from_tensors", "job_identity", "existing_result", "open_stages"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, say) is refused, never executed."""
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception:
        raise StorageError(f"{what} is not a safetensors file: re-run with output.overwrite=true") from None


class StageStore:
    """Stages under ``<loc>/<prefix>``. ``fallbacks`` are other (read-only) stores whose finished
    whole stages count as this one's: a sweep's trials read the base model, statistics and
    eigenbases its driver computed once (:mod:`raykfe.sweep`); everything is written here."""

    def __init__(self, loc: Location, prefix: str = "stages", fallbacks: "list[StageStore] | None" = None) -> None:
        self.loc = loc
        self.prefix = prefix
        self.fallbacks = list(fallbacks or [])

    def _p(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    # --- whole stages -----------------------------------------------------------------------
    def has(self, stage: str) -> bool:
        return self.has_own(stage) or any(f.has(stage) for f in self.fallbacks)

    def has_own(self, stage: str) -> bool:
        return self.loc.exists(self._p(f"{stage}.json"))

    def save(self, stage: str, tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
        from safetensors.torch import save as st_save

        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        self.loc.delete(self._p(f"{stage}.json"))
        self.loc.write_bytes(self._p(f"{stage}.safetensors"), data)
        self.loc.write_bytes(self._p(f"{stage}.json"), json.dumps({"sha256": _sha(data), "meta": meta}).encode())

    def load(self, stage: str) -> tuple[dict[str, torch.Tensor], Any]:
        if not self.has_own(stage):
            for f in self.fallbacks:
                if f.has(stage):
                    return f.load(stage)
        marker = json.loads(self.loc.read_bytes(self._p(f"{stage}.json")))
        data = self.loc.read_bytes(self._p(f"{stage}.safetensors"))
        if _sha(data) != marker["sha256"]:
            raise StorageError(f"stage {stage!r} under {self.loc.uri!r} is corrupt: re-run with output.overwrite=true")
        return _safetensors(data, f"stage {stage!r} under {self.loc.uri!r}"), marker["meta"]

    def save_text(self, name: str, text: str) -> None:
        self.loc.write_bytes(self._p(name), text.encode())

    def load_text(self, name: str) -> str | None:
        return self.loc.read_bytes(self._p(name)).decode() if self.loc.exists(self._p(name)) else None

    def clear(self) -> None:
        """Forget every stage (``output.overwrite=true``)."""
        try:
            if self.loc.fs.get_file_info(self.loc.path(self.prefix)).type.name != "NotFound":
                self.loc.fs.delete_dir_contents(self.loc.path(self.prefix), missing_dir_ok=True)
        except Exception as exc:
            raise StorageError(f"cannot clear the stages under {self.loc.uri!r}: {exc}") from None

    # --- per-epoch checkpoints of training stages ------------------------------------------
    def save_checkpoint(self, stage: str, epoch: int, tensors: dict[str, torch.Tensor], meta: Any) -> None:
        from safetensors.torch import save as st_save

        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        name = f"{stage}.ckpt-{epoch}.safetensors"
        previous = self._checkpoint_marker(stage)
        self.loc.write_bytes(self._p(name), data)
        marker = {"epoch": epoch, "file": name, "sha256": _sha(data), "meta": meta}
        self.loc.write_bytes(self._p(f"{stage}.ckpt.json"), json.dumps(marker).encode())
        if previous and previous["file"] != name:
            self.loc.delete(self._p(previous["file"]))

    def _checkpoint_marker(self, stage: str) -> dict | None:
        text = self.load_text(f"{stage}.ckpt.json")
        return json.loads(text) if text else None

    def load_checkpoint(self, stage: str) -> tuple[int, dict[str, torch.Tensor], Any] | None:
        """(epoch, tensors, meta) of the newest complete checkpoint, or None."""
        marker = self._checkpoint_marker(stage)
        if not marker:
            return None
        data = self.loc.read_bytes(self._p(marker["file"]))
        if _sha(data) != marker["sha256"]:
            return None
        return int(marker["epoch"]), _safetensors(data, f"checkpoint {marker['file']!r} under {self.loc.uri!r}"), marker["meta"]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """SGD state as flat tensors (``opt.<param index>.<key>``) + JSON param groups (no pickles)."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------------
# job identity: which stored stages and results belong to a config
# ------------------------------------------------------------------------------------------------

#: keys whose change does not make a different job (where results go, how it is shown or run)
RUN_ONLY_KEYS = ("output", "progress", "ray", "runtime", "sweep", "latency")
#: settings inside a section that change how fast a job runs, never what it computes
RUN_ONLY_FIELDS = {"data": ("access", "workers")}


def job_identity(d: dict) -> dict:
    """What makes two configs the same job: everything but the run-only keys, with the stored
    config's missing (newer) keys filled with their defaults, so a result written before a field
    existed is still recognised as this job's."""
    from .config import config_from_dict, config_to_dict
    from .errors import ConfigError

    try:
        d = config_to_dict(config_from_dict(d))
    except ConfigError:
        pass  # an older raykfe's config that this one cannot read: compared as stored (a different job)
    out = {k: v for k, v in d.items() if k not in RUN_ONLY_KEYS}
    for section, keys in RUN_ONLY_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in keys}
    return out


def existing_result(cfg) -> dict | None:
    """The metrics of a finished job with the SAME config under the output URI, else None.

    Raises when the URI holds a different job's result and ``output.overwrite`` is false.
    """
    import yaml

    from .checkpoint import read_file, read_manifest
    from .config import config_to_dict
    from .storage import open_uri

    loc = open_uri(cfg.output.uri)
    if cfg.output.overwrite or not loc.exists("manifest.json"):
        return None
    manifest = read_manifest(cfg.output.uri)
    try:
        stored = yaml.safe_load(read_file(cfg.output.uri, "config.yaml", manifest))
    except StorageError:
        stored = None
    if not isinstance(stored, dict) or job_identity(stored) != job_identity(config_to_dict(cfg)):
        raise StorageError(
            f"output.uri={cfg.output.uri!r} already holds a different job's result: choose another output.uri "
            "or set output.overwrite=true"
        )
    for name in manifest.get("files", {}):  # a damaged result is reported, not shown as this job's
        try:
            read_file(cfg.output.uri, name, manifest)
        except StorageError as exc:
            raise StorageError(f"{exc}; or set output.overwrite=true to run the job again") from None
    return json.loads(read_file(cfg.output.uri, "metrics.json", manifest))


def open_stages(cfg, shared=()) -> StageStore:
    """The job's stage store, checked to belong to this job (or cleared with ``output.overwrite``);
    ``shared``: other jobs' outputs whose finished stages count as this job's (a sweep's trials)."""
    import yaml

    from .config import config_to_dict
    from .storage import open_uri

    store = StageStore(open_uri(cfg.output.uri), fallbacks=[StageStore(open_uri(u)) for u in shared])
    mine = config_to_dict(cfg)
    stored_text = store.load_text("config.yaml")
    if stored_text is not None:
        stored = yaml.safe_load(stored_text)
        if cfg.output.overwrite:  # start over: the old result stops being visible now
            store.loc.delete("manifest.json")
            store.clear()
        elif not isinstance(stored, dict) or job_identity(stored) != job_identity(mine):
            raise StorageError(
                f"output.uri={cfg.output.uri!r} holds unfinished stages of a different job: choose another "
                "output.uri or set output.overwrite=true"
            )
    store.save_text("config.yaml", yaml.safe_dump(mine, sort_keys=False))
    return store
