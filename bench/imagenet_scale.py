"""ImageNet-scale figures (issue 6): the statistics pass on torchvision resnet50 at 224x224 vs a
plain training step (time and peak memory), the memory model's prediction, and the measured CPU
speedup of pruned resnet50 (224x224) and VGG19-BN (32x32, the CIFAR setting) vs their MACs
reduction, for EigenDamage and C-OBD at flops:0.5.

    .venv/bin/python bench/imagenet_scale.py overhead [--batch 8 --batches 3]
    .venv/bin/python bench/imagenet_scale.py memory   [--batch 8]
    .venv/bin/python bench/imagenet_scale.py latency  [--repeats 10] [--deploy]

``--deploy`` adds what users deploy beside eager PyTorch: both models with their BatchNorms folded
into the convs (:mod:`raykfe.fold`), in eager PyTorch and as ONNX in onnxruntime (exported and
checked by ``raykfe.export.export_bytes``), timed interleaved the same way.

Models are randomly initialised (this machine has no network to fetch trained weights) and the
images are seeded Gaussian noise: the figures measure cost, not accuracy. Prints markdown tables;
asserts nothing. Each memory figure comes from a fresh child process (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import raykfe
from raykfe.capture import find_layers
from raykfe.counting import count
from raykfe.latency import latency_profile
from raykfe.models import build_model
from raykfe.report import format_table, human


def _resnet50(classes: int = 1000):
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None, num_classes=classes)


def _batches(n: int, batch: int, size: int, classes: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


def _plain_pass(model, batches, step: bool = False, opt=None):
    model.train()
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
        if step:
            opt.step()
        model.zero_grad(set_to_none=not step)
    model.eval()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def overhead(args) -> None:
    model = _resnet50()
    batches = _batches(args.batches, args.batch, 224, 1000)
    runs = {
        "plain forward+backward (train mode, weight grads)": lambda: _plain_pass(model, batches),
        "statistics, patch mode (the default)": lambda: raykfe.collect_factors(model, batches, conv_mode="patch"),
        "statistics, full mode (4608-wide factors)": lambda: raykfe.collect_factors(model, batches, conv_mode="full"),
    }
    for fn in runs.values():  # warm-up (allocator, kernels)
        fn()
    secs = {k: _best(fn, args.repeats) for k, fn in runs.items()}
    plain = secs[next(iter(runs))]
    print(f"### Statistics pass vs plain forward+backward: resnet50, 224x224, batch {args.batch}, "
          f"{args.batches} batches, {torch.get_num_threads()} threads (best of {args.repeats})\n")
    print(format_table(["pass", "seconds", "ratio to plain"], [[k, f"{v:.2f}", f"{v / plain:.2f}"] for k, v in secs.items()], markdown=True))


def _factor_bytes(conv_mode: str) -> tuple[int, int, int]:
    """(layers, bytes of the float64 factor sums, largest factor side) of resnet50's prunable layers."""
    adapters, _ = find_layers(_resnet50(), conv_mode, None)
    adapters = {n: a for n, a in adapters.items() if n != "fc"}
    total = sum(8 * (a.d_in**2 + a.d_out**2) for a in adapters.values())
    return len(adapters), total, max(max(a.d_in, a.d_out) for a in adapters.values())


def _child(kind: str, batch: int) -> None:
    torch.set_num_threads(2)
    model = _resnet50()
    batches = _batches(1, batch, 224, 1000)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if kind == "plain":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        _plain_pass(model, batches, step=True, opt=opt)
        _plain_pass(model, batches, step=True, opt=opt)
    else:
        stats = raykfe.collect_factors(model, batches, conv_mode=kind, layers=[n for n in find_layers(model, kind, None)[0] if n != "fc"])
        del stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak, "before_mb": base}))


def memory(args) -> None:
    rows, peaks = [], {}
    for kind, label in (("plain", "plain training step (SGD, momentum, 2 steps)"), ("patch", "statistics, patch mode"), ("full", "statistics, full mode")):
        out = subprocess.run([sys.executable, __file__, "_child", kind, "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[kind] = r["peak_mb"]
        extra = ""
        if kind != "plain":
            n, b, side = _factor_bytes(kind)
            extra = f"{n} layers, factor sums {b / 2**20:.0f} MiB (largest side {side})"
        rows.append([label, f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / peaks['plain']:.2f}", extra])
    print(f"### Peak resident memory: resnet50, 224x224, batch {args.batch} (one fresh process each)\n")
    print(format_table(["process", "RSS after model + data MiB", "peak RSS MiB", "ratio to plain", "memory model"], rows, markdown=True))


def _ort_latency(models: dict, example, batches=(1, 32), repeats: int = 5, threads: int = 2, warmup: int = 2) -> dict:
    """``{name: {"1": ms, "32": ms}}``: each model exported to ONNX (BatchNorm folded, checked) and
    timed in onnxruntime with ``threads`` intra-op threads, the models' passes interleaved."""
    import statistics

    import onnxruntime as ort

    from raykfe.export import export_bytes

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    sessions = {n: ort.InferenceSession(export_bytes(m, "onnx", list(example.shape[1:]))[0], opts,
                                        providers=["CPUExecutionProvider"]) for n, m in models.items()}
    out = {n: {} for n in models}
    for b in batches:
        x = example[:1].expand(b, *example.shape[1:]).contiguous().numpy()
        times = {n: [] for n in sessions}
        for _ in range(warmup):
            for s in sessions.values():
                s.run(["logits"], {"input": x})
        for _ in range(repeats):
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s.run(["logits"], {"input": x})
                times[n].append(1000.0 * (time.perf_counter() - t0))
        for n, ts in times.items():
            out[n][str(b)] = statistics.median(ts)
    return out


def _deploy_cells(model, pruned, example, repeats: int) -> list[str]:
    """Speedups with BatchNorm folded, eager and onnxruntime (``--deploy``)."""
    from raykfe.fold import fold_batchnorms

    folded = {"base": fold_batchnorms(model)[0], "pruned": fold_batchnorms(pruned)[0]}
    eager = latency_profile(folded, example, batches=(1, 32), repeats=repeats, threads=torch.get_num_threads())
    e = {k: v["cpu"] for k, v in eager.items()}
    o = _ort_latency({"base": model, "pruned": pruned}, example, repeats=repeats, threads=torch.get_num_threads())
    return [f"{e['base'][b] / e['pruned'][b]:.2f}x" for b in ("1", "32")] + \
        [f"{o['base']['1']:.1f} / {o['pruned']['1']:.1f}", f"{o['base']['1'] / o['pruned']['1']:.2f}x",
         f"{o['base']['32']:.0f} / {o['pruned']['32']:.0f}", f"{o['base']['32'] / o['pruned']['32']:.2f}x"]


def _prune_row(arch: str, model, batches, example, method: str, repeats: int, deploy: bool = False,
               target: str = "flops:0.5"):
    t0 = time.perf_counter()
    name, _, opts = method.partition(":")  # e.g. "eigendamage:forms=three;rank=score"
    kw = {k: int(v) if v.isdigit() else v for k, v in (kv.split("=", 1) for kv in opts.split(";") if kv)}
    res = raykfe.prune(model, batches, method=name, target=target, example_input=example, **kw)
    secs = time.perf_counter() - t0
    base, pruned = count(model, example), count(res.model, example)
    prof = latency_profile({"base": model, "pruned": res.model}, example, batches=(1, 32), repeats=repeats, threads=torch.get_num_threads())
    b, p = prof["base"]["cpu"], prof["pruned"]["cpu"]
    return [arch, method, f"{human(base.macs)} -> {human(pruned.macs)}", f"{base.macs / pruned.macs:.2f}x",
            f"{base.params / pruned.params:.2f}x", f"{b['1']:.1f} / {p['1']:.1f}", f"{b['1'] / p['1']:.2f}x",
            f"{b['32']:.0f} / {p['32']:.0f}", f"{b['32'] / p['32']:.2f}x", f"{secs:.0f}"] + \
        (_deploy_cells(model, res.model, example, repeats) if deploy else [])


def arch_setup(arch: str, stat_batches: int):
    """(model in eval mode, statistics batches, one example): torchvision resnet50 at 224x224 with
    1000 classes, or a registry model (seeded) at 32x32 with 10."""
    if arch == "resnet50":
        model, size, classes = _resnet50(), 224, 1000
    else:
        torch.manual_seed(0)
        model, size, classes = build_model(arch, 10), 32, 10
    batches = _batches(stat_batches, 8, size, classes)
    return model.eval(), batches, batches[0][0][:1]


def latency(args) -> None:
    rows = []
    for arch in args.archs.split(","):
        model, batches, example = arch_setup(arch, args.stat_batches)
        for method in args.methods.split(","):
            rows.append(_prune_row(arch, model, batches, example, method, args.repeats, args.deploy, args.target))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"### Pruned latency vs MACs at {args.target} (CPU, {torch.get_num_threads()} threads, median of {args.repeats} interleaved passes)\n")
    deploy = ["folded eager b1", "folded eager b32", "ort ms b1 base / pruned", "ort speedup b1", "ort ms b32 base / pruned",
              "ort speedup b32"] if args.deploy else []
    print(format_table(["model", "method", "MACs", "MACs reduction", "params reduction", "ms b1 base / pruned", "speedup b1",
                        "ms b32 base / pruned", "speedup b32", "prune s", *deploy], rows, markdown=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=["overhead", "memory", "latency", "_child"])
    ap.add_argument("kind", nargs="?")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stat-batches", type=int, default=2)
    ap.add_argument("--archs", default="resnet50,vgg19_bn")
    ap.add_argument("--deploy", action="store_true", help="also BatchNorm folded: eager and onnxruntime speedups")
    ap.add_argument("--target", default="flops:0.5", help="the prune target of every method, e.g. latency:0.3")
    ap.add_argument("--methods", default="eigendamage,c-obd", help="comma-separated; a method may carry settings, "
                    "eigendamage:forms=three (';' between settings: eigendamage:forms=three;rank=score)")
    args = ap.parse_args()
    if args.section == "_child":
        _child(args.kind, args.batch)
    else:
        {"overhead": overhead, "memory": memory, "latency": latency}[args.section](args)


if __name__ == "__main__":
    main()
