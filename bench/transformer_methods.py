"""Every method the issue names on the transformers at 224x224 (issue 15's first "done when"):
vit_b_16, swin_t and convnext_tiny, randomly initialised, a few batches of random images, pruned
to ``params:0.5`` and ``flops:0.5`` by eigendamage, c-obd, kron-obs and l1; each pruned model runs,
exports (ExportedProgram, checked against the model by ``raykfe.export.export_bytes``), and
reloads from storage (``raykfe.save`` / ``raykfe.load`` into a freshly built model) to the same
outputs.

    .venv/bin/python bench/transformer_methods.py [--archs ...] [--methods ...] [--targets ...]
                                                  [--batches 2] [--batch 4] [--out results/transformer-methods]

One child process per (architecture, method) (the statistics are shared by the two targets).
Prints a markdown table; asserts nothing. A refusal (an unreachable target) is a row with its
one-line reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings


def child(arch: str, method: str, targets: list[str], batches: int, batch: int) -> list[dict]:
    import torch

    import raykfe
    from raykfe.export import export_bytes
    from raykfe.models import build_model

    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = build_model(arch, 1000).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 1000, (batch,), generator=g)) for _ in range(batches)]
    x = data[0][0][:2]
    stats, rows = None, []
    for target in targets:
        row = {"arch": arch, "method": method, "target": target}
        t0 = time.perf_counter()
        try:
            res = raykfe.prune(model, data, method=method, target=target, stats=stats, recalibrate_batches=batches)
        except raykfe.ConfigError as exc:
            rows.append({**row, "refused": str(exc).splitlines()[0][:200]})
            continue
        if method == "eigendamage":
            stats = res.stats
        row.update(seconds=time.perf_counter() - t0, achieved=res.plan.summary.achieved, space=res.plan.space)
        res.model.eval()
        with torch.no_grad():
            y = res.model(x)
        _, worst, _ = export_bytes(res.model, "pt2", [3, 224, 224])
        with tempfile.TemporaryDirectory() as d:
            back = raykfe.load(raykfe.save(res, d + "/r"), model=build_model(arch, 1000)).model.eval()
            with torch.no_grad():
                row["reload_diff"] = float((back(x) - y).abs().max())
        row.update(export_diff=worst, out_shape=list(y.shape))
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="vit_b_16,swin_t,convnext_tiny")
    ap.add_argument("--methods", default="eigendamage,c-obd,kron-obs,l1")
    ap.add_argument("--targets", default="params:0.5,flops:0.5")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--_child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    if args._child:
        print(json.dumps(child(*args._child, targets, args.batches, args.batch)))
        return
    rows = []
    for arch in args.archs.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--_child", arch, method, "--targets", args.targets,
                   "--batches", str(args.batches), "--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else str(proc.returncode)
                got = [{"arch": arch, "method": method, "target": t, "failed": tail[:200]} for t in targets]
            else:
                got = json.loads(proc.stdout.strip().splitlines()[-1])
            for r in got:
                print(json.dumps(r), file=sys.stderr, flush=True)
            rows += got
    print(f"{args.batches} batches of {args.batch} random 224x224 images, random init, 2 threads\n")
    print("| model | method | target | outcome | achieved | seconds | export max abs diff (pt2) | reload max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "achieved" in r:
            print(f"| {r['arch']} | {r['method']} | {r['target']} | ok ({r['space']}) | {r['achieved']:.3f} | {r['seconds']:.0f} | "
                  f"{r['export_diff']:.1e} | {r['reload_diff']:.1e} |")
        else:
            print(f"| {r['arch']} | {r['method']} | {r['target']} | {'refused: ' + r['refused'] if 'refused' in r else 'FAILED: ' + r['failed']} | | | | |")


if __name__ == "__main__":
    main()
