"""A whole pruning job in one process: the reference the distributed run must match.

data -> base model (trained here when ``model.weights`` is not given) -> K-FAC statistics ->
eigenbases -> scores -> plan -> surgery -> fine-tuning -> evaluation -> checkpoint + report.

Nothing is written under the output URI until the job has finished; the result becomes visible
when its manifest is written last (see :mod:`raykfe.checkpoint`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from .checkpoint import read_file, read_manifest, save
from .config import JobConfig, config_to_dict
from .counting import count
from .data import load_data, make_loader
from .errors import ConfigError, StorageError
from .finetune import evaluate, train
from .models import build_model
from .pruning import PruneResult, prune
from .report import format_table, human
from .storage import open_uri

__all__ = ["run_job", "JobResult", "job_table", "seed_everything"]


@dataclass
class JobResult:
    config: JobConfig
    metrics: dict
    result: PruneResult | None = None
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _device(cfg: JobConfig) -> torch.device:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA GPU is visible: use device=cpu")
    return torch.device(cfg.device)


def _load_base_weights(model: torch.nn.Module, path: str) -> None:
    from safetensors.torch import load as st_load

    loc = open_uri(path.rpartition("/")[0] or ".")
    try:
        state = st_load(loc.read_bytes(path.rpartition("/")[2]))
    except StorageError:
        raise ConfigError(f"model.weights='{path}' cannot be read: give a safetensors state_dict of the base model") from None
    except Exception:
        raise ConfigError(f"model.weights='{path}' is not a safetensors file: save the base model with safetensors") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.weights='{path}' does not fit model.name: missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )


def existing_result(cfg: JobConfig) -> dict | None:
    """The metrics of a finished job with the SAME config under the output URI, else None.

    Raises when the URI holds a different job's result and ``output.overwrite`` is false.
    """
    loc = open_uri(cfg.output.uri)
    if not loc.exists("manifest.json"):
        return None
    manifest = read_manifest(cfg.output.uri)
    try:
        stored = yaml.safe_load(read_file(cfg.output.uri, "config.yaml", manifest))
    except StorageError:
        stored = None
    mine = config_to_dict(cfg)
    if cfg.output.overwrite:
        return None
    same = isinstance(stored, dict) and {k: v for k, v in stored.items() if k not in ("output", "progress")} == {
        k: v for k, v in mine.items() if k not in ("output", "progress")
    }
    if not same:
        raise StorageError(
            f"output.uri={cfg.output.uri!r} already holds a different job's result: choose another output.uri "
            "or set output.overwrite=true"
        )
    return json.loads(read_file(cfg.output.uri, "metrics.json", manifest))


def run_job(cfg: JobConfig, *, log=print) -> JobResult:
    """Run ``cfg`` end to end; returns the metrics (also saved as ``metrics.json``)."""
    done = existing_result(cfg)
    if done is not None:
        log(f"raykfe: {cfg.output.uri} already holds this job's result; showing it (output.overwrite=true re-runs)")
        return JobResult(cfg, done, None, reused=True, timings=done.get("timings", {}))

    device = _device(cfg)
    seed_everything(cfg.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    d = cfg.data
    splits = load_data(
        d.name, root=d.root, image_size=d.image_size, seed=cfg.seed, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction, augment=d.augment, synthetic_size=d.synthetic_size, num_classes=d.num_classes,
    )
    model = build_model(cfg.model.name, splits.num_classes, width=cfg.model.width).to(device)
    val_loader = make_loader(splits.val, 256, shuffle=False)
    test_loader = make_loader(splits.test, 256, shuffle=False)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    base_history: list[dict] = []
    if cfg.model.weights:
        _load_base_weights(model, cfg.model.weights)
    else:
        log(f"raykfe: training the base {cfg.model.name} for {cfg.base.epochs} epochs (no model.weights given)")
        base_history = train(
            model, make_loader(splits.train, cfg.base.batch_size, shuffle=True, seed=cfg.seed, drop_last=True),
            cfg.base.settings(), val_loader=val_loader, device=device, progress=cfg.progress, desc="base",
        )
    timings["base"] = time.perf_counter() - t0
    base_test = evaluate(model, test_loader, device=device)
    base_val = evaluate(model, val_loader, device=device)

    t0 = time.perf_counter()
    stats_loader = make_loader(splits.train, cfg.stats.batch_size, shuffle=False)
    p = cfg.prune
    result = prune(
        model, stats_loader, p.method, p.target, fisher=cfg.stats.fisher, conv_mode=cfg.stats.conv_mode,
        max_layer_ratio=p.max_layer_ratio, include_classifier=p.include_classifier, exclude=p.exclude,
        tolerance=p.tolerance, freeze_rotations=p.freeze_rotations, seed=cfg.seed,
        max_batches=cfg.stats.max_batches, max_factor_dim=cfg.stats.max_factor_dim, progress=cfg.progress,
    )
    timings.update({k: v for k, v in result.timings.items()})
    timings["prune_total"] = time.perf_counter() - t0
    pruned = result.model.to(device)
    pruned_before = evaluate(pruned, test_loader, device=device)

    t0 = time.perf_counter()
    ft_history = train(
        pruned, make_loader(splits.train, cfg.finetune.batch_size, shuffle=True, seed=cfg.seed + 1, drop_last=True),
        cfg.finetune.settings(), val_loader=val_loader, device=device, progress=cfg.progress, desc="finetune",
    )
    timings["finetune"] = time.perf_counter() - t0
    pruned_test = evaluate(pruned, test_loader, device=device)
    pruned_val = evaluate(pruned, val_loader, device=device)

    example = splits.test[0][0][None].to(device)
    base_counts, pruned_counts = count(model, example), count(pruned, example)
    metrics = {
        "name": cfg.name,
        "method": p.method,
        "target": p.target,
        "achieved": result.plan.options["summary"]["achieved"],
        "base": {"test_acc": base_test["accuracy"], "val_acc": base_val["accuracy"], "params": base_counts.params, "macs": base_counts.macs},
        "pruned": {
            "test_acc_before_finetune": pruned_before["accuracy"],
            "test_acc": pruned_test["accuracy"],
            "val_acc": pruned_val["accuracy"],
            "params": pruned_counts.params,
            "macs": pruned_counts.macs,
        },
        "params_reduction": 1 - pruned_counts.params / base_counts.params,
        "macs_reduction": 1 - pruned_counts.macs / base_counts.macs,
        "history": {"base": base_history, "finetune": ft_history},
        "timings": timings,
    }
    from safetensors.torch import save as st_save

    t0 = time.perf_counter()
    extra = {
        "config.yaml": yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode(),
        "metrics.json": json.dumps(metrics, indent=1).encode(),
        "report.md": (job_table(metrics, markdown=True) + "\n\n" + result.table() + "\n").encode(),
        "base.safetensors": st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}),
    }
    save(result, cfg.output.uri, extra_files=extra, metadata={"job": cfg.name})
    timings["save"] = time.perf_counter() - t0
    return JobResult(cfg, metrics, result, timings=timings)


def job_table(metrics: dict, *, markdown: bool = False) -> str:
    """Base vs pruned: accuracy, params, MACs, reductions, and the time of each stage."""
    b, p = metrics["base"], metrics["pruned"]
    rows = [
        ["base", f"{100 * b['test_acc']:.2f}", "-", human(b["params"]), human(b["macs"]), "-", "-"],
        [
            f"{metrics['method']} {metrics['target']}",
            f"{100 * p['test_acc']:.2f}",
            f"{100 * p['test_acc_before_finetune']:.2f}",
            human(p["params"]),
            human(p["macs"]),
            f"{100 * metrics['params_reduction']:.1f}%",
            f"{100 * metrics['macs_reduction']:.1f}%",
        ],
    ]
    table = format_table(
        ["model", "test acc %", "before FT %", "params", "MACs", "params removed", "MACs removed"], rows, markdown=markdown
    )
    t = metrics.get("timings", {})
    times = format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in t.items()], markdown=markdown)
    return table + "\n\n" + times
