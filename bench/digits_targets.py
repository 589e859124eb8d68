"""Benchmark on the digits job: base accuracy; EigenDamage at flops 0.5 / 0.7 / 0.9 before and after
fine-tuning; parameters and MACs removed; the statistics pass vs a plain forward+backward.

    .venv/bin/python bench/digits_targets.py [--targets 0.5,0.7,0.9] [key=value ...]

Prints figures (markdown tables); it asserts nothing. The statistics overhead is the time of
``collect_factors`` over the stats batches divided by the time of a plain training step
(forward, cross-entropy, backward with weight gradients) over the same batches, best of 3 runs.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import raykfe
from raykfe.config import load_config
from raykfe.data import load_data, make_loader
from raykfe.finetune import evaluate, train
from raykfe.models import build_model
from raykfe.finetune import seed_everything
from raykfe.report import format_table, human


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.5,0.7,0.9")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config("jobs/digits.yaml", ["progress=false", *args.overrides])
    seed_everything(cfg.seed)
    d = cfg.data
    splits = load_data(d.name, image_size=d.image_size, seed=cfg.seed, val_fraction=d.val_fraction, test_fraction=d.test_fraction)
    val = make_loader(splits.val, 256, shuffle=False)
    test = make_loader(splits.test, 256, shuffle=False)
    model = build_model(cfg.model.name, splits.num_classes, width=cfg.model.width)
    t0 = time.perf_counter()
    train(model, make_loader(splits.train, cfg.base.batch_size, shuffle=True, seed=cfg.seed, drop_last=True),
          cfg.base.settings(), val_loader=val, progress=False)
    base_time = time.perf_counter() - t0
    base_acc = evaluate(model, test)["accuracy"]
    print(f"config: {cfg.model.name} on {d.name}, base {cfg.base.epochs} epochs ({base_time:.0f} s), "
          f"finetune {cfg.finetune.epochs} epochs lr {cfg.finetune.lr}; torch threads {torch.get_num_threads()}")
    print(f"base test accuracy: {100 * base_acc:.2f}%\n")

    batches = list(make_loader(splits.train, cfg.stats.batch_size, shuffle=False))

    def stats_pass():
        raykfe.collect_factors(model, batches, fisher=cfg.stats.fisher, conv_mode=cfg.stats.conv_mode)

    def plain_pass():
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    stats_pass(), plain_pass()  # warm-up
    t_stats, t_plain = best_of(stats_pass), best_of(plain_pass)
    print(format_table(
        ["pass over the train split", "seconds (best of 3)"],
        [["plain forward+backward (train mode, weight grads)", f"{t_plain:.2f}"],
         [f"statistics (fisher={cfg.stats.fisher}, {cfg.stats.conv_mode})", f"{t_stats:.2f}"],
         ["ratio statistics / plain", f"{t_stats / t_plain:.2f}"]], markdown=True))
    print()

    stats = raykfe.collect_factors(model, batches, fisher=cfg.stats.fisher, conv_mode=cfg.stats.conv_mode, seed=cfg.seed)
    rows = []
    for frac in [float(f) for f in args.targets.split(",")]:
        target = f"flops:{frac:g}"
        res = raykfe.prune(model, batches, target=target, stats=stats, conv_mode=cfg.stats.conv_mode,
                           max_layer_ratio=cfg.prune.max_layer_ratio)
        before = evaluate(res.model, test)["accuracy"]
        t0 = time.perf_counter()
        train(res.model, make_loader(splits.train, cfg.finetune.batch_size, shuffle=True, seed=cfg.seed + 1, drop_last=True),
              cfg.finetune.settings(), val_loader=val, progress=False)
        ft_time = time.perf_counter() - t0
        after = evaluate(res.model, test)["accuracy"]
        plan = res.plan
        rows.append([target, f"{100 * before:.2f}", f"{100 * after:.2f}", f"{100 * (after - base_acc):+.2f}",
                     f"{human(plan.params)} ({100 * plan.params_reduction:.1f}%)",
                     f"{human(plan.macs)} ({100 * plan.macs_reduction:.1f}%)", f"{ft_time:.0f}"])
        print(f"done {target}", file=sys.stderr)
    print(format_table(["EigenDamage", "test acc before FT %", "after FT %", "vs base (pp)", "params (removed)",
                        "MACs (removed)", "FT seconds"],
                       [["base", "-", f"{100 * base_acc:.2f}", "-", human(raykfe.count(model, batches[0][0][:1]).params), human(raykfe.count(model, batches[0][0][:1]).macs), "-"], *rows],
                       markdown=True))


if __name__ == "__main__":
    main()
