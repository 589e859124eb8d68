"""``raykfe sweep``: many pruning jobs over targets, methods and fine-tuning settings on Ray Tune,
with the accuracy-vs-cost Pareto front at the end.

    driver:  base model ONCE  ->  statistics (+ eigenbases) ONCE per method family  ->  Tune trials
    trial:   plan for its target -> surgery -> fine-tune (reports val_acc every epoch; ASHA may stop
             it) -> evaluation, latency -> its result under <sweep uri>/trials/<trial id>

The statistics do not depend on the target or the fine-tuning, so every trial reads them (and the
base model) from the driver's stage stores under ``<sweep uri>/shared/`` instead of recomputing
them; a *method family* is the set of methods that use the same statistics (EigenDamage one-pass
and iterative share the K-FAC factors of ``stats.conv_mode``; c-obs, kron-obd and kron-obs share
full-mode factors; the others have their own). A trial's id is made of its settings, so re-running
a sweep reuses every finished trial, and a stopped sweep continues.

Results under the sweep URI (``sweep.json`` is written last; ``raykfe report <uri>`` prints them):

    trials.csv / trials.md   one row per trial: settings, status, accuracy, MACs, params, latency
    front.md / front.png     Pareto fronts of validation accuracy vs MACs, parameters and latency
    best.json                the best finished trial per target (by validation accuracy)
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import os
import time
from itertools import product

from .config import JobConfig, config_from_dict, config_to_dict, expand_target
from .errors import ConfigError, RaykfeError
from .methods import METHODS
from .pareto import pareto_front
from .report import format_table, human
from .storage import open_uri

__all__ = ["run_sweep", "family_of", "trial_grid", "trial_id", "trial_config", "sweep_tables", "SWEEP_MANIFEST"]

SWEEP_MANIFEST = "sweep.json"
COSTS = (("macs", "MACs"), ("params", "parameters"), ("latency_ms", "latency batch 1 (ms)"))


def family_of(method: str, conv_mode: str) -> str:
    """The statistics a method needs, as a name: methods with the same family share them."""
    kind = METHODS[method].statistics
    return f"kfac-{conv_mode}" if kind == "kfac" else kind


def trial_grid(cfg: JobConfig) -> list[dict]:
    """Every combination of the sweep's settings (empty lists take the job's own value)."""
    s, f = cfg.sweep, cfg.finetune
    targets = [t for spec in s.targets for t in expand_target(spec)]
    grid = product(
        s.methods or (cfg.prune.method,), dict.fromkeys(targets), s.lr or (f.lr,), s.epochs or (f.epochs,),
        s.weight_decay or (f.weight_decay,),
    )
    return [{"method": m, "target": t, "lr": float(lr), "epochs": int(ep), "weight_decay": float(wd)} for m, t, lr, ep, wd in grid]


def trial_id(t: dict) -> str:
    return f"{t['method']}-{t['target'].replace(':', '')}-lr{t['lr']:g}-ep{t['epochs']}-wd{t['weight_decay']:g}"


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _job_dict(cfg: JobConfig, uri: str, **prune) -> dict:
    d = config_to_dict(cfg)
    d["output"] = {"uri": uri, "overwrite": False}
    d["prune"] = {**d["prune"], **prune}
    return d


def trial_config(config: dict, setup: dict) -> JobConfig:
    """The job config of one trial (its method, target and fine-tuning settings) on the sweep's
    shared stages; the driver times the models later, one at a time."""
    d = copy.deepcopy(setup["job"])
    d["prune"] = {**d["prune"], "method": config["method"], "target": config["target"]}
    d["finetune"] = {**d["finetune"], "lr": config["lr"], "epochs": config["epochs"], "weight_decay": config["weight_decay"]}
    d["output"] = {"uri": _join(setup["uri"], "trials", trial_id(config)), "overwrite": False}
    d["runtime"], d["progress"] = "local", False
    d["latency"] = {**d.get("latency", {}), "repeats": 0}  # timed by the driver after the trials, one model at a time
    return config_from_dict(d)


def _prepare(cfg: JobConfig, backend_for, methods: list[str], uri: str, log) -> tuple[str, dict[str, str], dict]:
    """The base model and each family's statistics, computed once: (base uri, {family: uri}, base row)."""
    from .widen import job_model
    from .data import job_splits
    from .pipeline import run_job

    base_uri = _join(uri, "shared", "base")
    base_cfg = config_from_dict(_job_dict(cfg, base_uri))
    base = run_job(base_cfg, backend_for(base_cfg), log=log, stop_after="base")
    families: dict[str, str] = {}
    for method in METHODS:  # canonical order: a family's stages always come from the same method
        if method not in methods:
            continue
        fam = family_of(method, cfg.stats.conv_mode)
        if fam in families:
            continue
        families[fam] = _join(uri, "shared", fam)
        fcfg = config_from_dict(_job_dict(cfg, families[fam], method=method))
        log(f"raykfe: sweep: statistics of family {fam} (shared by {', '.join(m for m in methods if family_of(m, cfg.stats.conv_mode) == fam)})")
        run_job(fcfg, backend_for(fcfg), log=log, shared=[base_uri], stop_after="statistics")
    # the base model's own row (reference point of the fronts)

    from .stages import StageStore

    splits = job_splits(cfg.data, cfg.seed)
    model = job_model(cfg, splits.num_classes)
    tensors, _ = StageStore(open_uri(base_uri)).load("base")
    model.load_state_dict(tensors)
    example = splits.test[0][0][None]
    from .counting import count

    c = count(model, example)
    row = {
        "trial": "base", "method": "-", "target": "-", "lr": None, "epochs": None, "weight_decay": None, "status": "base",
        "val_acc": base.metrics["base"]["val_acc"], "test_acc": base.metrics["base"]["test_acc"], "macs": c.macs,
        "params": c.params, "_model": model,
    }
    return base_uri, families, row


def run_sweep(cfg: JobConfig, *, log=print) -> dict:
    """Run the sweep of ``cfg`` (its ``sweep`` section) on Ray Tune; returns the summary."""
    from .distributed.cluster import connect
    from .distributed.resources import check_job
    from .distributed.tune import run_trials

    s = cfg.sweep
    grid = trial_grid(cfg)
    methods = sorted({t["method"] for t in grid}, key=list(METHODS).index)
    for m in methods:
        if METHODS[m].space == "channels" and any(t["target"].startswith("directions") for t in grid):
            raise ConfigError(f"sweep.targets has a directions:F target, which {m} cannot use: use params:F or flops:F")
        if (METHODS[m].space == "channels" or METHODS[m].rounds > 1) and any(t["target"].startswith("latency") for t in grid):
            raise ConfigError(f"sweep.targets has a latency:F target, which {m} cannot use (one-shot eigendamage only "
                              "for now): use flops:F, or sweep only eigendamage")
    uri = cfg.output.uri
    if "://" not in uri or uri.startswith("file://"):  # trials run in other working directories
        uri = os.path.abspath(uri[7:] if uri.startswith("file://") else uri)
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, uri=uri))
    loc = open_uri(uri)
    if cfg.output.overwrite:
        loc.delete(SWEEP_MANIFEST)
    connect(cfg.ray.address, cfg.ray.num_cpus, log_to_driver=cfg.ray.verbose)
    check_job(cfg, sweep=True, log=log)

    def backend_for(c: JobConfig):
        if c.runtime == "ray":
            from .distributed.backend import RayBackend

            return RayBackend(c)
        return None

    t0 = time.perf_counter()
    base_uri, families, base_row = _prepare(cfg, backend_for, methods if s.share_statistics else [], uri, log)
    prepare_s = time.perf_counter() - t0

    setup = {
        "job": config_to_dict(cfg), "uri": uri, "base_uri": base_uri, "families": families,
        "threads": s.cpus_per_trial, "repeats": s.latency_repeats, "share": s.share_statistics,
        "asha": bool(s.asha and len(grid) > 1),
    }
    log(f"raykfe: sweep of {len(grid)} trials ({len(methods)} method(s), {len({t['target'] for t in grid})} target(s))"
        + (", ASHA on val_acc" if setup["asha"] else ""))
    t0 = time.perf_counter()
    results = run_trials(cfg, grid, setup)
    tune_s = time.perf_counter() - t0

    rows = [base_row]
    for conf, met, error in results:
        if error is not None:
            status = "error: " + (str(error).strip().splitlines() or [type(error).__name__])[-1][:120]
        elif met.get("finished"):
            status = "done"
        else:
            status = f"stopped by ASHA after epoch {met.get('epoch', '?')}"
        rows.append({
            "trial": trial_id(conf), **conf, "status": status,
            **{k: met.get(k) for k in ("val_acc", "test_acc", "test_acc_before_finetune", "macs", "params", "macs_reduction",
                                        "params_reduction", "latency_ms", "latency_ms_32", "reused_stages", "uri")},
        })
        if status != "done":  # an unfinished trial's cost is not known: it is not a point of the front
            rows[-1].update(macs=None, params=None, latency_ms=None, latency_ms_32=None)
    _measure_latencies(cfg, rows, log)
    rows[1:] = sorted(rows[1:], key=lambda r: (list(METHODS).index(r["method"]), r["target"], r["lr"], r["epochs"], r["weight_decay"]))
    return _write_results(cfg, rows, {"prepare_seconds": prepare_s, "tune_seconds": tune_s, "families": families})


def _measure_latencies(cfg: JobConfig, rows: list[dict], log) -> None:
    """CPU latency of the base and of every finished trial's model, measured one model at a time
    in the driver after the trials (timed inside concurrent trials, they would measure the
    contention), with ``sweep.cpus_per_trial`` threads."""
    from .checkpoint import load
    from .latency import latency_profile
    from .data import job_splits

    example = job_splits(cfg.data, cfg.seed).test[0][0][None]
    threads = max(1, int(cfg.sweep.cpus_per_trial))
    reps = cfg.sweep.latency_repeats
    gpu = cfg.device if cfg.device.startswith("cuda") else None  # also timed on the job's GPU when there is one
    log(f"raykfe: sweep: latency of {sum(r['status'] in ('done', 'base') for r in rows)} models ({threads} thread(s))")
    for r in rows:
        if r["status"] not in ("done", "base"):
            continue
        model = r.pop("_model", None) or load(r["uri"]).model
        prof = latency_profile({"m": model}, example, batches=(1, 32), repeats=reps, threads=threads, gpu=gpu)["m"]
        r["latency_ms"], r["latency_ms_32"] = prof["cpu"]["1"], prof["cpu"]["32"]
        if "cuda" in prof:
            r["gpu_latency_ms"], r["gpu_latency_ms_32"] = prof["cuda"]["1"], prof["cuda"]["32"]


def _best_per_target(rows: list[dict]) -> dict:
    best: dict[str, dict] = {}
    for r in rows:
        if r["status"] != "done" or r.get("val_acc") is None:
            continue
        cur = best.get(r["target"])
        if cur is None or (r["val_acc"], -(r["macs"] or 0)) > (cur["val_acc"], -(cur["macs"] or 0)):
            best[r["target"]] = r
    return {t: {"trial": r["trial"], "uri": r["uri"], "val_acc": r["val_acc"], "test_acc": r["test_acc"], "macs": r["macs"]} for t, r in sorted(best.items())}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def sweep_tables(rows: list[dict]) -> tuple[str, str]:
    """(trials table, fronts) as markdown."""
    headers = ["trial", "method", "target", "lr", "epochs", "wd", "status", "val acc %", "test acc %", "MACs", "params", "latency ms (b1)", "latency ms (b32)"]
    body = [[r["trial"], r["method"], r["target"], r["lr"], r["epochs"], r["weight_decay"], r["status"], _pct(r.get("val_acc")),
             _pct(r.get("test_acc")), human(r.get("macs")), human(r.get("params")),
             "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}",
             "-" if r.get("latency_ms_32") is None else f"{r['latency_ms_32']:.2f}"] for r in rows]
    trials = format_table(headers, body, markdown=True)
    fronts = []
    for key, label in COSTS:
        front = pareto_front(rows, accuracy="val_acc", cost=key)
        fronts.append(f"### Pareto front: validation accuracy vs {label}\n\n" + format_table(
            ["trial", "val acc %", "test acc %", label],
            [[r["trial"], _pct(r["val_acc"]), _pct(r.get("test_acc")), f"{r[key]:.2f}" if key == "latency_ms" else human(r[key])] for r in front],
            markdown=True,
        ))
    return trials, "\n\n".join(fronts)


def plot_fronts(rows: list[dict], title: str) -> bytes:
    """PNG: validation accuracy vs MACs, parameters and latency; every finished trial by method,
    the Pareto front as a line, the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COSTS), figsize=(5 * len(COSTS), 4))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for ax, (key, label) in zip(axes, COSTS):
        for m in methods:
            pts = [r for r in rows if r["method"] == m and r.get(key) is not None and r.get("val_acc") is not None]
            ax.scatter([r[key] for r in pts], [100 * r["val_acc"] for r in pts], label=m, s=18)
        front = pareto_front(rows, accuracy="val_acc", cost=key)
        ax.plot([r[key] for r in front], [100 * r["val_acc"] for r in front], "k--", lw=1, label="Pareto front")
        base = [r for r in rows if r["status"] == "base" and r.get(key) is not None]
        if base:
            ax.scatter([base[0][key]], [100 * base[0]["val_acc"]], marker="*", s=150, c="gold", edgecolors="k", label="base", zorder=5)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _write_results(cfg: JobConfig, rows: list[dict], info: dict) -> dict:
    loc = open_uri(cfg.output.uri)
    cols = ["trial", "method", "target", "lr", "epochs", "weight_decay", "status", "val_acc", "test_acc", "test_acc_before_finetune",
            "macs", "params", "macs_reduction", "params_reduction", "latency_ms", "latency_ms_32", "reused_stages", "uri"]
    if any("gpu_latency_ms" in r for r in rows):
        cols[-2:-2] = ["gpu_latency_ms", "gpu_latency_ms_32"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in cols})
    trials_md, fronts_md = sweep_tables(rows)
    best = _best_per_target(rows)
    loc.delete(SWEEP_MANIFEST)
    loc.write_bytes("trials.csv", buf.getvalue().encode())
    loc.write_bytes("trials.md", (trials_md + "\n").encode())
    loc.write_bytes("front.md", (fronts_md + "\n").encode())
    loc.write_bytes("front.png", plot_fronts(rows, f"raykfe sweep {cfg.name}"))
    loc.write_bytes("best.json", json.dumps(best, indent=1).encode())
    summary = {
        "kind": "raykfe.sweep", "name": cfg.name, "trials": len(rows) - 1,
        "done": sum(r["status"] == "done" for r in rows), "stopped": sum(r["status"].startswith("stopped") for r in rows),
        "errors": sum(r["status"].startswith("error") for r in rows), "best": best, **info,
        "files": ["trials.csv", "trials.md", "front.md", "front.png", "best.json"],
    }
    loc.write_bytes(SWEEP_MANIFEST, json.dumps(summary, indent=1, default=str).encode())
    return summary


def read_sweep(uri: str) -> dict | None:
    """The manifest of a finished sweep at ``uri``, or None when ``uri`` holds no sweep."""
    loc = open_uri(uri)
    if not loc.exists(SWEEP_MANIFEST):
        return None
    try:
        return json.loads(loc.read_bytes(SWEEP_MANIFEST))
    except ValueError:
        raise RaykfeError(f"{SWEEP_MANIFEST} at {uri!r} is corrupt: re-run the sweep") from None
