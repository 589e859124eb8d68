"""Benchmark (issue 17 part 2): does widening the bottlenecks a method flags beat widening every
layer uniformly at the same MACs, once both are pruned again?

    .venv/bin/python bench/widen.py [--models resnet32,vgg_small] [--seeds 0,1] [--methods sosp-h,eigendamage]
        [--targets 0.5,0.8] [--base-epochs 8] [--ft-epochs 3] [--image-size 16] [--out results/bench-widen]

Per model and seed, a base is trained once (``jobs/digits.yaml``'s recipe, ``--base-epochs``),
in-process (``runtime=local``). Per method, ``raykfe widen`` (:func:`raykfe.widen_job.run_widen`)
runs on the base pruned to the FIRST target: it reads that plan's bottleneck flags, widens the
flagged groups x2 and, at the same MACs, every group uniformly, trains both from scratch with the
same recipe as the base, prunes them with the same method to that target and fine-tunes them. The
other targets prune the same three trained networks again (their finished base and statistics
stages are shared, so nothing is trained twice): the flags of one plan define the widened
architectures, the targets are where they are compared.

Prints one markdown table (also ``<out>/widen.md``), one row per model, seed, method and target;
progress goes to stderr; it asserts nothing. Finished jobs are reused (an interrupted run
continues where it stopped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from raykfe.config import load_config
from raykfe.pipeline import run_job
from raykfe.report import format_table, human
from raykfe.widen_job import VARIANTS, run_widen, widen_uri

JOB = "jobs/digits.yaml"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet32,vgg_small")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default="sosp-h,eigendamage")
    ap.add_argument("--targets", default="0.5,0.8")
    ap.add_argument("--base-epochs", type=int, default=8)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--out", default="results/bench-widen")
    a = ap.parse_args()
    out = Path(a.out)
    targets = [float(t) for t in a.targets.split(",")]
    rows, records = [], []
    t_start = time.perf_counter()
    for model in a.models.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            common = [f"model.name={model}", f"seed={seed}", "runtime=local", "latency.repeats=0", "progress=false",
                      f"data.image_size={a.image_size}", f"base.epochs={a.base_epochs}", f"finetune.epochs={a.ft_epochs}"]
            base_uri = out / f"{model}-s{seed}" / "base"
            t0 = time.perf_counter()
            run_job(load_config(JOB, common + [f"output.uri={base_uri}"]), log=log, stop_after="base")
            log(f"[bench] base {model} seed {seed}: {time.perf_counter() - t0:.0f} s")
            weights = f"{base_uri}/stages/base.safetensors"
            for method in a.methods.split(","):
                first = None
                for target in targets:
                    cfg = load_config(JOB, common + [f"model.weights={weights}", f"prune.method={method}",
                                                     f"prune.target=flops:{target}",
                                                     f"output.uri={out / f'{model}-s{seed}' / f'{method}-{target}'}"])
                    t0 = time.perf_counter()
                    if first is None:
                        first, wm = cfg, run_widen(cfg, log=log)
                        res = wm["rows"]
                    else:  # the same three networks, pruned to another target
                        res = {"base": _row(run_job(cfg, log=log, shared=[first.output.uri]).metrics)}
                        for v in VARIANTS:
                            sub = dataclasses.replace(
                                cfg, name=f"{cfg.name}-{v}",
                                model=dataclasses.replace(cfg.model, widths=f"{widen_uri(first)}/stages/{v}.widths.json", weights=None),
                                output=dataclasses.replace(cfg.output, uri=f"{widen_uri(cfg)}/{v}"))
                            res[v] = _row(run_job(sub, log=log, shared=[f"{widen_uri(first)}/{v}"]).metrics)
                    secs = time.perf_counter() - t0
                    log(f"[bench] {model} seed {seed} {method} flops:{target}: {secs:.0f} s")
                    records.append({"model": model, "seed": seed, "method": method, "target": target,
                                    "flagged": wm["flagged"], "groups": wm["bottleneck_groups"],
                                    "uniform_factor": wm["uniform_factor"], "rows": res, "seconds": secs})
                    b, w, u = res["base"], res["bottlenecks"], res["uniform"]
                    rows.append([model, seed, method, target, ", ".join(wm["bottleneck_groups"]), f"{wm['uniform_factor']:.3f}",
                                 f"{human(b['macs'])} / {human(w['macs'])} / {human(u['macs'])}",
                                 f"{_p(b['test_acc'])} / {_p(w['test_acc'])} / {_p(u['test_acc'])}",
                                 f"{human(b['pruned_macs'])} / {human(w['pruned_macs'])} / {human(u['pruned_macs'])}",
                                 f"{_p(b['before_ft'])} / {_p(w['before_ft'])} / {_p(u['before_ft'])}",
                                 f"{_p(b['after_ft'])} / {_p(w['after_ft'])} / {_p(u['after_ft'])}"])
    headers = ["model", "seed", "method", "flops", "widened groups (x2)", "uniform x", "MACs base / bneck / unif",
               "trained acc % b / bn / u", "pruned MACs b / bn / u", "before FT % b / bn / u", "after FT % b / bn / u"]
    table = format_table(headers, rows, markdown=True)
    summary = _summary(records)
    text = table + "\n\n" + summary + f"\n\ntotal {time.perf_counter() - t_start:.0f} s\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "widen.md").write_text(text)
    (out / "widen.json").write_text(json.dumps(records, indent=1))
    print(text)


def _row(m: dict) -> dict:
    b, p = m["base"], m["pruned"]
    return {"test_acc": b["test_acc"], "macs": b["macs"], "pruned_macs": p["macs"], "before_ft": p["test_acc_before_finetune"],
            "after_ft": p["test_acc"]}


def _p(x: float) -> str:
    return f"{100 * x:.1f}"


def _summary(records: list[dict]) -> str:
    """Mean over seeds of the after-fine-tuning accuracy, and how often each widening wins."""
    by: dict[tuple, list[dict]] = {}
    for r in records:
        by.setdefault((r["model"], r["method"], r["target"]), []).append(r["rows"])
    rows = []
    wins = {"bottlenecks": 0, "uniform": 0, "tie": 0}
    for (model, method, target), rs in by.items():
        mean = {k: sum(x[k]["after_ft"] for x in rs) / len(rs) for k in ("base", *VARIANTS)}
        rows.append([model, method, target, len(rs), _p(mean["base"]), _p(mean["bottlenecks"]), _p(mean["uniform"]),
                     f"{100 * (mean['bottlenecks'] - mean['uniform']):+.2f}"])
        for x in rs:
            d = x["bottlenecks"]["after_ft"] - x["uniform"]["after_ft"]
            wins["tie" if abs(d) < 1e-9 else ("bottlenecks" if d > 0 else "uniform")] += 1
    table = format_table(["model", "method", "flops", "seeds", "base %", "bottlenecks %", "uniform %", "bneck - unif (points)"],
                         rows, markdown=True)
    return table + f"\n\nafter fine-tuning, per seed: bottlenecks better {wins['bottlenecks']}, uniform better {wins['uniform']}, tied {wins['tie']}"


if __name__ == "__main__":
    main()
