"""Transformers at width (issue 15): EigenDamage on torchvision vit_b_16, swin_t and convnext_tiny
at 224x224, time per stage and peak memory, next to a plain training step on the same batch.

    .venv/bin/python bench/transformers.py [--archs vit_b_16,swin_t,convnext_tiny] [--batch 8]
                                           [--batches 2] [--target flops:0.5] [--threads 2]

Each architecture runs in a fresh child process (peak RSS is per process): build the model
(randomly initialised: no weights are downloaded), time one plain forward + backward on one batch,
then ``raykfe.prune(model, batches, method="eigendamage", target=...)`` in this process (statistics,
eigendecompositions, plan, surgery, BatchNorm recalibration: the engine's own timings), and report
the widest factor, the layers rebuilt (attention projections among them) and the reductions.
Images are seeded Gaussian noise: the figures measure cost, not accuracy. Prints a markdown
table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings


def child(arch: str, batch: int, batches: int, target: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import raykfe
    from raykfe.attention import Attention, WindowAttention
    from raykfe.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(arch, 1000).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, 3, 224, 224, generator=g), torch.randint(0, 1000, (batch,), generator=g)) for _ in range(batches)]
    model.train()
    t0 = time.perf_counter()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    step = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(model, data, method="eigendamage", target=target, recalibrate_batches=batches)
    total = time.perf_counter() - t0
    parts = {Attention: ("q_proj", "k_proj", "v_proj", "out_proj"), WindowAttention: ("qkv", "proj")}
    attn = {f"{n}.{p}" for n, m in res.model.named_modules() for p in parts.get(type(m), ())}
    kfe = [n for n, lp in res.plan.layers.items() if lp.action == "kfe"]
    widest = max((max(lp.d_in, lp.d_out) for lp in res.plan.layers.values()), default=0)
    return {
        "arch": arch, "params": res.plan.base_params, "macs": res.plan.base_macs, "step_s": step, "total_s": total,
        "timings": res.timings, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "model_rss_gib": rss_model, "layers": len(res.plan.layers), "kfe": len(kfe),
        "attention_kfe": sum(n in attn for n in kfe), "attention": len(attn), "widest": widest,
        "macs_reduction": res.plan.macs_reduction, "params_reduction": res.plan.params_reduction,
        "space": res.plan.space, "channels_removed": sum(len(v) for v in res.plan.removed.values()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="vit_b_16,swin_t,convnext_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--target", default="flops:0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(args._child, args.batch, args.batches, args.target, args.threads)))
        return
    rows = []
    for arch in args.archs.split(","):
        cmd = [sys.executable, __file__, "--_child", arch, "--batch", str(args.batch), "--batches", str(args.batches),
               "--target", args.target, "--threads", str(args.threads)]
        print(f"[{arch}] running ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"[{arch}] failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"[{arch}] {json.dumps(r)}", file=sys.stderr, flush=True)
        rows.append(r)
    t = lambda r, k: f"{r['timings'].get(k, 0.0):.1f}"  # noqa: E731
    print(f"EigenDamage {args.target}, {args.batches} batches of {args.batch} at 224x224 (statistics and "
          f"recalibration), {args.threads} threads, torch {__import__('torch').__version__}\n")
    print("| model | params | MACs | train step (1 batch) s | statistics s | eigen s | plan + surgery s | BatchNorm recalibration s | total s | "
          "peak RSS GiB (model alone) | widest factor | layers rebuilt / prunable (attention) | MACs / params removed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['params'] / 1e6:.1f}M | {r['macs'] / 1e9:.2f}G | {r['step_s']:.1f} | {t(r, 'statistics')} | "
              f"{t(r, 'eigen')} | {t(r, 'plan')} | {t(r, 'recalibration')} | {r['total_s']:.1f} | {r['peak_rss_gib']:.2f} "
              f"({r['model_rss_gib']:.2f}) | {r['widest']} | {r['kfe']} / {r['layers']} ({r['attention_kfe']} of "
              f"{r['attention']}) | {100 * r['macs_reduction']:.1f}% / {100 * r['params_reduction']:.1f}% |")
    print("\ntimings keys:", sorted({k for r in rows for k in r["timings"]}))


if __name__ == "__main__":
    main()
