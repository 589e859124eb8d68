"""latency:F targets end to end: the plan's own measured figure (base and pruned timed interleaved
at latency.batch), the table's prediction, the plans timed, and an independent re-measurement.

    .venv/bin/python bench/latency_target.py --archs resnet32,resnet50 --target latency:0.5 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import raykfe  # noqa: E402
from raykfe.counting import count  # noqa: E402
from raykfe.latency import latency_profile  # noqa: E402
from raykfe.report import format_table  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="resnet32,resnet50")
    ap.add_argument("--target", default="latency:0.5")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table", default="results/latency-tables")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from imagenet_scale import arch_setup

    rows = []
    for arch in args.archs.split(","):
        model, batches, example = arch_setup(arch, 2)
        t0 = time.perf_counter()
        res = raykfe.prune(model, batches, target=args.target, example_input=example, rank="score", latency_batch=args.batch,
                           latency_threads=args.threads, latency_table=args.table)
        secs = time.perf_counter() - t0
        rec = res.plan.steps[0]["latency"]
        again = latency_profile({"base": model, "pruned": res.model}, example, batches=(args.batch,), repeats=7, threads=args.threads)
        b, p = again["base"]["cpu"][str(args.batch)], again["pruned"]["cpu"][str(args.batch)]
        rows.append([arch, args.target, f"{100 * rec['predicted']:.1f}%", f"{100 * rec['asked']:.1f}%", len(rec["probes"]),
                     f"{rec['base_ms']:.1f} / {rec['pruned_ms']:.1f}", f"{100 * rec['measured']:.1f}%",
                     f"{b:.1f} / {p:.1f}", f"{100 * (1 - p / b):.1f}%",
                     f"{count(model, example).macs / count(res.model, example).macs:.2f}x", f"{secs:.0f}"])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"### {args.target} at batch {args.batch}, CPU {args.threads} threads\n")
    print(format_table(["model", "target", "table predicted", "asked of the table", "plans timed", "plan's ms base / pruned",
                        "plan's measured", "re-measured ms", "re-measured removed", "MACs reduction", "seconds"], rows,
                       markdown=True))


if __name__ == "__main__":
    main()
