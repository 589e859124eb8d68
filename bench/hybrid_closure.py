"""The hybrid closure on a ConvNeXt (an architecture the quality defaults were not chosen on):
EigenDamage with and without it next to torch-pruning's Magnitude, digits at 16x16.

    .venv/bin/python bench/hybrid_closure.py [--seeds 0,1] [--targets 0.5,0.7,0.9] [--epochs 30]

A small torchvision ConvNeXt (two stages of two blocks, 24 and 48 channels) is trained from
scratch on the digits train split (SGD lr 0.05, cosine, ``--epochs``), then pruned to ``flops:F``
three ways on 640 training examples: torch-pruning Magnitude (global, ratio bisected to the MACs
target, ``bench/tp_peers.py``), ``raykfe.prune(method="eigendamage")`` as shipped (the closure on:
the MLPs' hidden widths are hybrid groups) and the same with the closure off (the groups of the
depthwise convs only, i.e. before the rule: ``raykfe.hybrid.hybrid_groups(..., closure=False)``
patched in for that arm). Test accuracy % after pruning (LayerNorm only: nothing to recalibrate)
and after one epoch of the quality benchmark's fine-tuning (SGD lr 0.01, cosine). Asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402
import tp_peers as T  # noqa: E402

import raykfe  # noqa: E402
import raykfe.hybrid as H  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--targets", default="0.5,0.7,0.9")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    shipped = H.hybrid_groups
    arms = {"tp-magnitude": None, "eigendamage, closure off": False, "eigendamage (shipped: closure on)": True}
    rows = {}
    for seed in map(int, args.seeds.split(",")):
        splits = Q.load_data("digits", image_size=16, seed=seed)
        data = {n: Q.gather(s, torch.arange(len(s))) for n, s in (("train", splits.train), ("test", splits.test))}
        torch.manual_seed(seed)
        base = ConvNeXt([CNBlockConfig(24, 48, 2), CNBlockConfig(48, None, 2)], stochastic_depth_prob=0.0, num_classes=10)
        Q.train_sgd(base, *data["train"], args.epochs, Q.Recipe(lr=0.05), seed)
        base.eval()
        print(f"seed {seed}: base test accuracy {Q.evaluate(base, *data['test'])['acc']:.1f}%", file=sys.stderr, flush=True)
        batches = Q.fixed_batches(*data["train"], 640, 10_000 + seed)
        example = data["test"][0][:1]

        def measure(m):
            b0 = Q.evaluate(m, *data["test"])["acc"]
            m1 = copy.deepcopy(m)
            Q.train_sgd(m1, *data["train"], 1, Q.FINETUNE_RECIPE, 30_000 + seed)
            return b0, Q.evaluate(m1.eval(), *data["test"])["acc"]

        for frac in map(float, args.targets.split(",")):
            for arm, closure in arms.items():
                if closure is None:
                    model = T.reach_target(base, "magnitude", None, frac, example)[0]
                else:
                    H.hybrid_groups = lambda m, g, closure=closure: shipped(m, g, closure=closure)
                    try:
                        model = raykfe.prune(base, batches, target=f"flops:{frac:g}", method="eigendamage").model
                    finally:
                        H.hybrid_groups = shipped
                rows.setdefault((arm, frac), []).append(measure(model))
                print(f"seed {seed} flops:{frac:g} {arm}: {rows[(arm, frac)][-1]}", file=sys.stderr, flush=True)
    targets = [float(t) for t in args.targets.split(",")]
    print(f"Test accuracy % after pruning / after 1 epoch, mean of seeds {args.seeds}\n")
    print("| arm | " + " | ".join(f"flops:{t:g}" for t in targets) + " |")
    print("|---|" + "---|" * len(targets))
    for arm in arms:
        cells = []
        for t in targets:
            r = rows[(arm, t)]
            cells.append(f"{sum(a for a, _ in r) / len(r):.1f} / {sum(b for _, b in r) / len(r):.1f}")
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
