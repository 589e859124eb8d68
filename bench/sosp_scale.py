"""SOSP-I at scale (issue 17 part 1): time and peak memory against the number of structures S,
the softmax directions kept per example, and the sampled estimate of Q's row sums.

    .venv/bin/python bench/sosp_scale.py models   [--archs a,b] [--size 224] [--batch 8] [--classes 10]
    .venv/bin/python bench/sosp_scale.py classes  [--arch mobilenet_v3_small] [--size 64] [--batch 8]
    .venv/bin/python bench/sosp_scale.py sampling [--arch resnet50] [--size 224] [--batch 8] [--classes 10]
    .venv/bin/python bench/sosp_scale.py digits

``models``: each torchvision architecture (1000 classes, random weights: no download) in a fresh
child process (peak RSS is per process): one plain training step on the batch (for scale), one
forward-mode JVP along one structure (what the former SOSP-I paid S times per batch), then
``raykfe.prune(model, [batch], method="sosp-i", target="flops:0.5", sosp_classes=K)``: the
statistics pass, Q's row sums in blocks, the plan. ``classes``: the plan and scores for K softmax
directions per example against every class (exact). ``sampling``: the exact row sums of |Q|
against sampled block pairs, the measured error against the reported one, and the plan's overlap.
Images are seeded Gaussian noise: the figures measure cost, not accuracy. Prints markdown tables;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

LISTED = "resnext50_32x4d,mnasnet0_5,mobilenet_v3_small,googlenet,efficientnet_v2_s,resnet50"


def _data(batch: int, size: int, classes: int = 1000):
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))]


def _model(arch: str):
    import torch

    from raykfe.models import build_model

    torch.manual_seed(0)
    return build_model(arch, 1000).eval()


def child_models(arch: str, size: int, batch: int, classes: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, jvp

    import raykfe
    from raykfe.channels import ChannelGraph
    from raykfe.methods.sosp import structure_owner

    torch.set_num_threads(threads)
    model = _model(arch)
    data = _data(batch, size)
    x, y = data[0]
    with torch.no_grad():
        model(x)  # warm-up: the first call pays one-off costs
    model.train()
    t0 = time.perf_counter()
    out = model(x)
    F.cross_entropy(out[0] if isinstance(out, tuple) else out, y).backward()  # GoogLeNet trains with auxiliary heads
    step = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    model.eval()
    owner, _, S = structure_owner(model, ChannelGraph(model, x[:1]))
    name, ids = next(iter(owner.items()))  # the forward-mode cost: one JVP of the batch along one structure
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangent = params[name] * (ids == ids.max()).to(params[name].dtype).reshape(-1, *([1] * (params[name].dim() - 1)))
    t0 = time.perf_counter()
    with torch.no_grad():
        jvp(lambda w: functional_call(model, {**params, name: w}, (x,)), (params[name],), (tangent,))
    one_jvp = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(model, data, method="sosp-i", target="flops:0.5", sosp_classes=classes, recalibrate_batches=1)
    total = time.perf_counter() - t0
    s = res.plan.summary
    return {"arch": arch, "S": S, "step_s": step, "jvp_s": one_jvp, "total_s": total, "timings": res.timings,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "achieved": s.achieved, "within": s.within_tolerance}


def child_classes(arch: str, size: int, batch: int, ks: list[int], threads: int) -> dict:
    import numpy as np
    import torch

    from raykfe.channels import ChannelGraph
    from raykfe.methods.sosp import sosp_i_rows, sosp_i_stats, structure_owner

    torch.set_num_threads(threads)
    model = _model(arch)
    data = _data(batch, size)
    owner, _, S = structure_owner(model, ChannelGraph(model, data[0][0][:1]))
    out = {"arch": arch, "S": S, "rows": []}
    scores = {}
    for k in ks:
        t0 = time.perf_counter()
        st = sosp_i_stats(model, data, owner, S, classes=k)
        secs = time.perf_counter() - t0
        scores[k] = sosp_i_rows(st)[0]
        out["rows"].append({"k": k, "seconds": secs, "share": st.share()})
    ref = scores[max(ks)]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    low = set(np.argsort(ref)[: S // 2])  # the half a global ranking would remove first
    for r in out["rows"]:
        s = scores[r["k"]]
        r["spearman"] = float(np.corrcoef(rank(s), rank(ref))[0, 1])
        r["overlap"] = len(low & set(np.argsort(s)[: S // 2])) / len(low)
    return out


def child_sampling(arch: str, size: int, batch: int, classes: int, threads: int) -> dict:
    import numpy as np
    import torch

    from raykfe.channels import ChannelGraph
    from raykfe.methods.gram import gram_abs_rows
    from raykfe.methods.sosp import sosp_i_stats, structure_owner

    torch.set_num_threads(threads)
    model = _model(arch)
    data = _data(batch, size)
    owner, _, S = structure_owner(model, ChannelGraph(model, data[0][0][:1]))
    st = sosp_i_stats(model, data, owner, S, classes=classes)
    block = 512
    t0 = time.perf_counter()
    exact = gram_abs_rows(st.v, block=block, workers=1)
    out = {"arch": arch, "S": S, "D": int(st.v.shape[1]), "blocks": exact.blocks, "pairs": exact.total_pairs,
           "exact_s": time.perf_counter() - t0, "rows": []}
    off = exact.rows - np.abs(exact.diag)
    low = set(np.argsort(exact.rows)[: S // 2])
    for share in (0.5, 0.25, 0.1):
        budget = exact.blocks + int(share * (exact.total_pairs - exact.blocks))
        t0 = time.perf_counter()
        est = gram_abs_rows(st.v, block=block, max_pairs=budget, seed=1, workers=1)
        secs = time.perf_counter() - t0
        actual = np.abs(est.rows - exact.rows)[off > 0] / off[off > 0]
        out["rows"].append({"share": share, "pairs": est.pairs, "seconds": secs,
                            "reported": est.relative_error(), "measured_median": float(np.median(actual)),
                            "overlap": len(low & set(np.argsort(est.rows)[: S // 2])) / len(low)})
    for workers in (1, 2):  # the exact row sums as Ray tasks on 1 and 2 workers
        import ray

        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            t0 = time.perf_counter()
            gram_abs_rows(st.v, block=block, workers=workers)
            out[f"ray_{workers}_s"] = time.perf_counter() - t0
        finally:
            ray.shutdown()
    return out


def child_digits(threads: int) -> dict:
    """raykfe's resnet32 (10 classes), one batch of 128 at 32x32: reverse against forward mode."""
    import numpy as np
    import torch

    from raykfe.channels import ChannelGraph
    from raykfe.methods.sosp import sosp_i_rows, sosp_i_stats, structure_owner
    from raykfe.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    (x, y), = _data(128, 32, classes=10)
    owner, _, S = structure_owner(model, ChannelGraph(model, x[:1]))
    out = {"S": S}
    scores = {}
    for mode in ("reverse", "forward"):
        t0 = time.perf_counter()
        st = sosp_i_stats(model, [(x, y)], owner, S, mode=mode)
        out[mode] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores[mode] = sosp_i_rows(st)[0]
        out[mode + "_rows"] = time.perf_counter() - t0
    out["rel_diff"] = float(np.abs(scores["reverse"] - scores["forward"]).max() / np.abs(scores["forward"]).max())
    return out


def _run(part: str, **kw) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", part, json.dumps(kw)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], **kw}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        fn = {"models": child_models, "classes": child_classes, "sampling": child_sampling, "digits": child_digits}[sys.argv[2]]
        print(json.dumps(fn(**json.loads(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["models", "classes", "sampling", "digits"])
    ap.add_argument("--archs", default=LISTED)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ks", default="1,3,10,30,100,1000")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.part == "models":
        print("| model | S | train step | one JVP | forward mode (S JVPs), est. | statistics + Q row sums | total | peak RSS | flops removed |")
        print("|---|---|---|---|---|---|---|---|---|")
        for arch in a.archs.split(","):
            r = _run("models", arch=arch, size=a.size or 224, batch=a.batch, classes=a.classes, threads=a.threads)
            if "error" in r:
                print(f"| {arch} | error: {r['error']} |", flush=True)
                continue
            t = r["timings"]
            print(f"| {arch} | {r['S']} | {r['step_s']:.2f} s | {r['jvp_s']:.2f} s | {r['S'] * r['jvp_s'] / 3600:.1f} h | "
                  f"{t.get('statistics', 0.0):.1f} s | {r['total_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB | "
                  f"{100 * r['achieved']:.1f}% ({'within' if r['within'] else 'NOT within'} tolerance) |", flush=True)
    elif a.part == "digits":
        r = _run("digits", threads=a.threads)
        print(r if "error" in r else
              f"resnet32, S={r['S']}, one batch of 128: reverse mode {r['reverse']:.1f} s, forward mode {r['forward']:.1f} s, "
              f"scores' max relative difference {r['rel_diff']:.1e}; row sums {r['reverse_rows']:.2f} s")
    elif a.part == "classes":
        r = _run("classes", arch=a.arch or "mobilenet_v3_small", size=a.size or 64, batch=a.batch,
                 ks=[int(k) for k in a.ks.split(",")], threads=a.threads)
        if "error" in r:
            print(r)
            return
        print(f"{r['arch']}, S={r['S']}; reference: every class (k={max(int(k) for k in a.ks.split(','))})")
        print("| k | stats pass | trace(H) kept | Spearman vs exact | lower half shared |")
        print("|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['k']} | {row['seconds']:.1f} s | {100 * row['share']:.1f}% | {row['spearman']:.3f} | {100 * row['overlap']:.1f}% |")
    else:
        r = _run("sampling", arch=a.arch or "resnet50", size=a.size or 224, batch=a.batch, classes=a.classes, threads=a.threads)
        if "error" in r:
            print(r)
            return
        print(f"{r['arch']}: S={r['S']}, factor of {r['D']} columns, {r['blocks']} blocks of 512, {r['pairs']} pairs; "
              f"exact {r['exact_s']:.1f} s; as Ray tasks: 1 worker {r['ray_1_s']:.1f} s, 2 workers {r['ray_2_s']:.1f} s")
        print("| off-diagonal pairs sampled | pairs | time | reported rel. s.e. (median) | measured rel. error (median) | lower half shared |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {100 * row['share']:.0f}% | {row['pairs']} | {row['seconds']:.1f} s | {100 * row['reported']:.1f}% | "
                  f"{100 * row['measured_median']:.1f}% | {100 * row['overlap']:.1f}% |")


if __name__ == "__main__":
    main()
