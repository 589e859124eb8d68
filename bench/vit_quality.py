"""Pruned-model quality on a small ViT (issue 15): every raykfe method next to torch-pruning's own
ViT pruning, digits at 16x16, the same MACs and the same fine-tuning.

    .venv/bin/python bench/vit_quality.py [--seeds 0] [--targets 0.5,0.8] [--methods ...]
                                          [--tp magnitude,taylor] [--base-epochs 100]

* The base: torchvision ``VisionTransformer(image_size=16, patch_size=4, num_layers=4,
  num_heads=4, hidden_dim=128, mlp_dim=512)`` (16 tokens + the class token), trained from scratch
  on the digits train split with AdamW (lr 1e-3, weight decay 0.05, batch 64, cosine, ``--base-epochs``),
  cached under ``results/bench-cache/``. No BatchNorm: nothing to recalibrate.
* raykfe: ``raykfe.prune(base, batches, method=m, target=f"flops:{F}")`` on 640 training examples
  (the model's ``nn.MultiheadAttention`` become raykfe's ``Attention``: KFE methods prune the
  projections, channel methods the heads and the MLP widths).
* torch-pruning 1.6 as its own torchvision example prunes a ViT: ``MetaPruner`` on the
  ``nn.MultiheadAttention`` model, global ranking, channels rounded to the number of heads, the
  classification head ignored, ``hidden_dim`` reset after the step; its global ratio bisected
  until the MACs removed lie in ``[F, F + 0.01]``. MACs are counted the same way for every arm:
  ``raykfe.count`` on the model with its attention converted (Conv / Linear layers, the
  attention's q / k / v / out projections included, not its two matmuls).
* Then the quality benchmark's fine-tuning (SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64,
  cosine) for 1 epoch, the same data order for every arm. Test accuracy % / loss after 0 and 1
  epochs. Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
import tp_peers as T  # noqa: E402

import raykfe  # noqa: E402
from raykfe.attention import convert_attention  # noqa: E402

#: sosp-i runs one JVP per structure (2,064 here) per example: its statistics see 2 batches of 64
METHODS = "eigendamage,c-obd,c-obs,kron-obd,kron-obs,sosp-h,sosp-i:max_batches=2,l1"


def vit() -> nn.Module:
    return VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=512,
                             num_classes=10)


def train_adamw(model: nn.Module, x, y, epochs: int, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = len(y) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for k in range(steps):
            idx = perm[k * 64:(k + 1) * 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def macs(model: nn.Module, example) -> int:
    m = copy.deepcopy(model)
    convert_attention(m)
    return raykfe.count(m, example).macs


def tp_vit(base: nn.Module, criterion: str, grads, ratio: float, example) -> nn.Module:
    model = copy.deepcopy(base).eval()
    if grads is not None:
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(model, example, importance=T.importance(criterion), global_pruning=True,
                                  pruning_ratio=ratio, ignored_layers=[model.heads], round_to=4, num_heads=heads)
    pruner.step()
    model.hidden_dim = model.conv_proj.out_channels
    model.zero_grad(set_to_none=True)
    return model


def tp_reach(base, criterion, grads, frac, example):
    base_macs = macs(base, example)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(24):
        ratio = (lo + hi) / 2
        try:
            model = tp_vit(base, criterion, grads, ratio, example)
            got = 1 - macs(model, example) / base_macs
        except Exception:  # a ratio torch-pruning cannot apply: treat as too much
            hi = ratio
            continue
        if got >= frac and (best is None or got < best[1]):
            best = (model, got)
        if frac <= got <= frac + 0.01:
            break
        lo, hi = (ratio, hi) if got < frac else (lo, ratio)
    if best is None:
        raise RuntimeError(f"torch-pruning reached no ratio removing {frac:g} of the MACs")
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--targets", default="0.5,0.8")
    ap.add_argument("--methods", default=METHODS, help="comma-separated; a method may carry integer options: sosp-i:max_batches=2")
    ap.add_argument("--tp", default="magnitude,taylor")
    ap.add_argument("--base-epochs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("results/bench-cache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    targets = [float(t) for t in args.targets.split(",")]
    arms = [f"tp-{c}" for c in args.tp.split(",") if c] + args.methods.split(",")
    cells: dict[tuple, list] = {}
    bases = []
    for seed in map(int, args.seeds.split(",")):
        splits = Q.load_data("digits", image_size=16, seed=seed)
        data = {n: Q.gather(s, torch.arange(len(s))) for n, s in (("train", splits.train), ("test", splits.test))}
        torch.manual_seed(seed)
        base = vit()
        key = args.cache / f"base-vit4x128-s16-seed{seed}-e{args.base_epochs}-adamw.safetensors"
        if key.is_file():
            base.load_state_dict(load_file(str(key)))
        else:
            t0 = time.perf_counter()
            train_adamw(base, *data["train"], args.base_epochs, seed)
            args.cache.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(key) + ".tmp")
            os.replace(str(key) + ".tmp", key)
            print(f"seed {seed}: base trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        base.eval()
        acc = Q.evaluate(base, *data["test"])
        bases.append(acc["acc"])
        print(f"seed {seed}: base test accuracy {acc['acc']:.1f}%", file=sys.stderr, flush=True)
        batches = Q.fixed_batches(*data["train"], 640, 10_000 + seed)
        example = data["test"][0][:1]
        grads = {c: T.criterion_grads(base, c, batches) for c in args.tp.split(",") if c}

        def measure(m):
            b0 = Q.evaluate(m, *data["test"])
            m1 = copy.deepcopy(m)
            Q.train_sgd(m1, *data["train"], 1, Q.FINETUNE_RECIPE, 30_000 + seed)
            b1 = Q.evaluate(m1.eval(), *data["test"])
            return b0["acc"], b0["loss"], b1["acc"], b1["loss"]

        for frac in targets:
            for arm in arms:
                t0 = time.perf_counter()
                try:
                    if arm.startswith("tp-"):
                        model, got = tp_reach(base, arm[3:], grads[arm[3:]], frac, example)
                    else:
                        name, _, opts = arm.partition(":")
                        kw = {k: int(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
                        res = raykfe.prune(base, batches, method=name, target=f"flops:{frac:g}", **kw)
                        model, got = res.model, res.plan.macs_reduction
                except Exception as exc:  # a refusal is a result
                    cells.setdefault((arm, frac), []).append(None)
                    print(f"seed {seed} flops:{frac:g} {arm}: refused: {str(exc).splitlines()[0][:160]}", file=sys.stderr, flush=True)
                    continue
                r = measure(model.eval())
                cells.setdefault((arm, frac), []).append(r)
                print(f"seed {seed} flops:{frac:g} {arm}: {100 * got:.1f}% MACs removed in {time.perf_counter() - t0:.0f} s, "
                      f"acc {r[0]:.1f} -> {r[2]:.1f}", file=sys.stderr, flush=True)
    print(f"ViT (patch 4, 4 layers, 128 wide, 4 heads) on digits 16x16, base test accuracy "
          f"{sum(bases) / len(bases):.1f}% (seeds {args.seeds}); test accuracy % / loss, mean of the seeds\n")
    head = " | ".join(f"flops:{t:g}, {b}" for t in targets for b in ("0 epochs", "1 epoch"))
    print(f"| arm | {head} |")
    print("|---|" + "---|" * (2 * len(targets)))
    for arm in arms:
        row = []
        for t in targets:
            rs = cells.get((arm, t), [])
            if not rs or any(r is None for r in rs):
                row += ["refused", "refused"]
                continue
            mean = [sum(r[i] for r in rs) / len(rs) for i in range(4)]
            row += [f"{mean[0]:.1f} / {mean[1]:.3f}", f"{mean[2]:.1f} / {mean[3]:.3f}"]
        print(f"| {arm} | " + " | ".join(row) + " |")
    print("\n" + json.dumps({f"{a}|{t}": v for (a, t), v in cells.items()}))


if __name__ == "__main__":
    main()
