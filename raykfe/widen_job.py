"""``raykfe widen -c job.yaml``: remove the bottlenecks a pruning job reveals (SOSP's procedure,
ALGORITHMS.md section 7), and check that it beats spending the same MACs uniformly::

    the job's result (run first when absent) -> the layers its plan flags as bottlenecks
      -> the channel groups holding those layers' outputs, x widen.factor  ("bottlenecks")
      -> every widenable group x f, f bisected to the same MACs            ("uniform")
      -> each widened net: a job of its own under <widen uri>/<variant> (model.widths = its spec):
         trained from scratch with base:, pruned with prune: to the same target, fine-tuned
      -> <widen uri>: report.md (base vs bottlenecks vs uniform, before and after pruning),
         metrics.json, the two widths specs, config.yaml, manifest.json written LAST

Why a command and not a stage of ``raykfe prune``: the comparison is three whole jobs (each a
trained base, statistics, a plan and a fine-tuning), each resumable on its own and each a normal
result (``raykfe report``, ``export`` and ``checkpoint.load`` work on them); the original result
stays untouched, and the widened nets' jobs can be re-run alone (``raykfe prune -c job.yaml
model.widths=<widen uri>/stages/bottlenecks.widths.json``).

The widen result goes beside the job's (``widen.uri``, default ``<output.uri>-widen``). The job's
own result is read, never rewritten (``output.overwrite`` applies to the widened jobs and the
comparison only). Bad input fails before anything of the comparison is written, exit 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable

import torch
import yaml

from .backend import LocalBackend
from .checkpoint import MANIFEST, plan_from_json, read_file, read_manifest
from .config import JobConfig, WidenConfig, config_to_dict
from .errors import ConfigError, StorageError
from .report import format_table, human
from .stages import existing_result, open_stages
from .storage import open_uri

__all__ = ["run_widen", "widen_uri", "comparison_table"]

VARIANTS = ("bottlenecks", "uniform")


def widen_uri(cfg: JobConfig) -> str:
    return cfg.widen.uri or cfg.output.uri.rstrip("/") + "-widen"


def _source_cfg(cfg: JobConfig) -> JobConfig:
    """The job whose bottlenecks are widened, as ``raykfe prune`` would run it (never overwritten)."""
    return dataclasses.replace(cfg, widen=WidenConfig(), output=dataclasses.replace(cfg.output, overwrite=False))


def _check(cfg: JobConfig) -> str:
    uri = widen_uri(cfg)
    if uri.rstrip("/") == cfg.output.uri.rstrip("/"):
        raise ConfigError(f"widen.uri={uri!r} is the job's own output.uri: give another directory, or null for <output.uri>-widen")
    if cfg.model.widths:
        raise ConfigError(f"model.widths={cfg.model.widths!r}: raykfe widen widens the job's base model itself; leave model.widths unset")
    return uri


def run_widen(cfg: JobConfig, backend_for: Callable[[JobConfig], object] | None = None, *, log=print) -> dict:
    """Run the comparison (module docstring); returns its metrics. ``backend_for(job config)``
    gives each job's backend (default: in-process)."""
    from .channels import ChannelGraph
    from .models import build_model
    from .pipeline import run_job
    from .widen import (bottleneck_groups, plan_bottlenecks, scaled_widths, uniform_widths, widenable_groups,
                        widened_macs, widths_for)

    backend_for = backend_for or (lambda c: LocalBackend())
    uri = _check(cfg)
    wcfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, uri=uri))
    done = existing_result(wcfg)
    if done is not None:
        log(f"raykfe: {uri} already holds this comparison; showing it (output.overwrite=true re-runs it)")
        return done
    t0 = time.perf_counter()

    # the job's result: its plan's flags
    src = _source_cfg(cfg)
    try:
        existing_result(src)
    except StorageError as exc:
        if "different job" not in str(exc):
            raise
        raise ConfigError(f"output.uri={src.output.uri!r} holds the result of a job with other settings: raykfe widen "
                          "widens the bottlenecks of this job's own result; give the settings it was made with, or "
                          "another output.uri") from None
    if not open_uri(src.output.uri).exists(MANIFEST):
        log(f"raykfe: no result at {src.output.uri} yet: running the job first, to find its bottlenecks")
    src_metrics = run_job(src, backend_for(src), log=log).metrics
    manifest = read_manifest(src.output.uri)
    plan = plan_from_json(read_file(src.output.uri, "plan.json", manifest).decode(errors="replace"))
    spec = manifest.get("model_spec")
    shape = (manifest.get("metadata") or {}).get("input_shape")
    if not spec or not shape:
        raise StorageError(f"the result at {src.output.uri!r} records no model spec or input shape: re-run the job with this raykfe")
    flags = plan_bottlenecks(plan)
    if not flags:
        raise ConfigError(f"the plan at {src.output.uri!r} flags no bottleneck (fewer than two pruned layers): prune more layers first")

    # the two widenings
    base = build_model(**spec)
    graph = ChannelGraph(base, torch.zeros(1, *shape))
    widenable = widenable_groups(base, graph)
    groups, lost = bottleneck_groups(graph, widenable, flags)
    if not groups:
        raise ConfigError(f"no bottleneck of {src.output.uri} ({', '.join(flags)}) holds the outputs of a widenable channel "
                          "group (a classifier's outputs are the classes): nothing to widen")
    bw = scaled_widths(widenable, list(groups), cfg.widen.factor)
    b_params, b_macs = widened_macs(graph, bw)
    factor, uw, u_macs = uniform_widths(graph, widenable, b_macs, hi=cfg.widen.max_uniform)
    specs = {"bottlenecks": widths_for(base, shape, bw, graph=graph), "uniform": widths_for(base, shape, uw, graph=graph)}

    store = open_stages(wcfg)  # checked to be this comparison's (or cleared by output.overwrite)
    paths = {}
    for v, w in specs.items():
        store.save_text(f"{v}.widths.json", w.to_json())
        paths[v] = f"{uri.rstrip('/')}/stages/{v}.widths.json"
    log(f"raykfe: bottlenecks {', '.join(flags)} -> groups {', '.join(groups)} x{cfg.widen.factor:g} ({human(b_macs)} MACs); "
        f"uniform x{factor:.4f} over {len(widenable)} groups ({human(u_macs)} MACs)")

    runs = {}
    for v in VARIANTS:
        sub = dataclasses.replace(
            cfg, name=f"{cfg.name}-{v}"[:100], widen=WidenConfig(),
            model=dataclasses.replace(cfg.model, widths=paths[v], weights=None),
            output=dataclasses.replace(cfg.output, uri=f"{uri.rstrip('/')}/{v}"),
        )
        log(f"raykfe: the {v}-widened {spec['name']}: trained from scratch ({cfg.base.epochs} epochs), pruned to "
            f"{cfg.prune.target} with {cfg.prune.method}, fine-tuned")
        runs[v] = run_job(sub, backend_for(sub), log=log).metrics

    metrics = {
        "name": cfg.name, "method": cfg.prune.method, "target": cfg.prune.target, "source": src.output.uri,
        "factor": cfg.widen.factor, "uniform_factor": factor, "flagged": flags, "not_widened": lost,
        "groups": {g: {"base": widenable[g], "bottlenecks": bw.get(g, widenable[g]), "uniform": uw[g]} for g in widenable},
        "bottleneck_groups": groups, "base_from_weights": bool(cfg.model.weights),
        "rows": {"base": _row(src_metrics, spec)} | {v: _row(m, specs[v].spec()) for v, m in runs.items()},
        "predicted_macs": {"bottlenecks": b_macs, "uniform": u_macs},
        "seconds": time.perf_counter() - t0,
    }
    _write(wcfg, metrics, specs)
    return metrics


def _row(m: dict, spec: dict) -> dict:
    b, p = m["base"], m["pruned"]
    return {"test_acc": b["test_acc"], "params": b["params"], "macs": b["macs"], "pruned_macs": p["macs"],
            "pruned_params": p["params"], "before_ft": p["test_acc_before_finetune"], "after_ft": p["test_acc"],
            "achieved": m.get("achieved"), "spec": spec}


def comparison_table(metrics: dict, *, markdown: bool = False) -> str:
    """Base vs widened-bottlenecks vs uniformly widened: before and after pruning again."""
    rows = []
    names = {"base": "base", "bottlenecks": f"bottlenecks x{metrics['factor']:g}",
             "uniform": f"uniform x{metrics['uniform_factor']:.3f}"}
    for k, r in metrics["rows"].items():
        rows.append([names[k], human(r["params"]), human(r["macs"]), f"{100 * r['test_acc']:.2f}", human(r["pruned_macs"]),
                     f"{100 * r['before_ft']:.2f}", f"{100 * r['after_ft']:.2f}"])
    return format_table(["network", "params", "MACs", "test acc %", f"MACs after {metrics['target']}", "pruned, before FT %",
                         "pruned, after FT %"], rows, markdown=markdown)


def _report(metrics: dict) -> str:
    groups = metrics["groups"]
    widened = [[g, v["base"], v["bottlenecks"], v["uniform"]] for g, v in groups.items()]
    lines = [
        f"# Widening the bottlenecks of {metrics['name']} ({metrics['method']} {metrics['target']})", "",
        f"Flagged by the plan at {metrics['source']}: {', '.join(metrics['flagged'])}"
        + (f" (not widenable: {', '.join(metrics['not_widened'])})" if metrics["not_widened"] else "") + ".",
        f"Bottlenecks: {', '.join(metrics['bottleneck_groups'])} x{metrics['factor']:g}; uniform: every one of the "
        f"{len(groups)} widenable groups x{metrics['uniform_factor']:.4f}, bisected to the same MACs "
        f"({human(metrics['rows']['bottlenecks']['macs'])} vs {human(metrics['rows']['uniform']['macs'])}).",
        "The widened nets are trained from scratch with the job's base recipe, then pruned with the same method and "
        "target and fine-tuned like the base" + (" (the base itself came from model.weights)." if metrics["base_from_weights"] else "."),
        "", comparison_table(metrics, markdown=True), "", "Channel groups (units):", "",
        format_table(["group", "base", "bottlenecks", "uniform"], widened, markdown=True), "",
    ]
    return "\n".join(lines)


def _write(wcfg: JobConfig, metrics: dict, specs: dict) -> None:
    """The comparison's files, its manifest last (a result is visible only through it)."""
    loc = open_uri(wcfg.output.uri)
    files = {
        "config.yaml": yaml.safe_dump(config_to_dict(wcfg), sort_keys=False).encode(),
        "metrics.json": json.dumps(metrics, indent=1).encode(),
        "report.md": _report(metrics).encode(),
        **{f"{v}.widths.json": w.to_json().encode() for v, w in specs.items()},
    }
    manifest = {"format": 1, "kind": "raykfe.widen", "model_spec": metrics["rows"]["base"]["spec"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}, "metadata": {"job": wcfg.name}}
    loc.delete(MANIFEST)
    for n, d in files.items():
        loc.write_bytes(n, d)
    loc.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
