"""Which fine-tuning recipe keeps what pruning kept? One epoch of raykfe's own trainer
(:func:`raykfe.finetune.train`, what a job runs) from a pruned, BatchNorm-recalibrated model, for
several recipes, on the quality benchmark's models and data (:mod:`bench.quality`: digits at
16x16, the cached bases).

    PYTHONPATH=. .venv/bin/python bench/finetune_recipe.py [--archs vgg_small,resnet32] [--seeds 0,1]
        [--targets 0.8,0.9] [--method eigendamage] [--prune k=v,...]

Per (arch, seed, target): the model is pruned once (``raykfe.prune``, the method's defaults plus
``--prune``), then each recipe fine-tunes a copy for ONE epoch (batch 64, momentum 0.9, wd 5e-4,
the data order from the seed) and the copy is recalibrated (BatchNorm, as a job does after
fine-tuning). Reported: test accuracy before (recalibrated) and after the epoch, and the change;
a recipe "never loses" when the change is >= 0 in every cell. Asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import raykfe  # noqa: E402
from raykfe.finetune import TrainSettings, train  # noqa: E402
from raykfe.recalibrate import recalibrate  # noqa: E402
from raykfe.report import format_table  # noqa: E402

import quality as Q  # noqa: E402

#: name -> TrainSettings keywords (epochs=1, batch 64, momentum 0.9, wd 5e-4 for all)
RECIPES = {
    "lr 0.01 constant": dict(lr=0.01),
    "lr 0.01 cosine": dict(lr=0.01, schedule="cosine"),
    "lr 0.003 cosine": dict(lr=0.003, schedule="cosine"),
    "lr 0.01 cosine, warm-up 0.3": dict(lr=0.01, schedule="cosine", warmup_epochs=0.3),
    "lr 0.01 cosine, rotations x0.1": dict(lr=0.01, schedule="cosine", rotation_lr=0.1),
    "lr 0.01 cosine, warm-up 0.3, rotations x0.1": dict(lr=0.01, schedule="cosine", warmup_epochs=0.3, rotation_lr=0.1),
    "lr 0.003 cosine, warm-up 0.3, rotations x0.1": dict(lr=0.003, schedule="cosine", warmup_epochs=0.3, rotation_lr=0.1),
}


def loader(x: torch.Tensor, y: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = len(y) // Q.BATCH * Q.BATCH
    return [(x[perm[k:k + Q.BATCH]], y[perm[k:k + Q.BATCH]]) for k in range(0, n, Q.BATCH)]


def one_cell(setup: Q.Setup, frac: float, method: str, extra: dict) -> dict[str, tuple[float, float]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(setup.base, setup.prune_batches, method=method, target=f"flops:{frac:g}", **extra)
    pruned = res.model
    recalibrate(pruned, setup.recal, len(setup.recal))
    before = Q.evaluate(pruned, *setup.data["test"])["acc"]
    out = {}
    for name, kw in RECIPES.items():
        model = copy.deepcopy(pruned)
        torch.manual_seed(setup.seed)
        train(model, loader(*setup.data["train"], setup.seed), TrainSettings(epochs=1, batch_size=Q.BATCH, **kw),
              progress=False)
        recalibrate(model, setup.recal, len(setup.recal))
        out[name] = (before, Q.evaluate(model, *setup.data["test"])["acc"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="vgg_small,resnet32,mobilenet_small")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--targets", default="0.8,0.9")
    ap.add_argument("--method", default="eigendamage")
    ap.add_argument("--prune", default="", help="extra raykfe.prune keywords, k=v,... (values as JSON)")
    ap.add_argument("--cache", type=Path, default=Path("results/bench-cache"))
    args = ap.parse_args(argv)
    extra = Q.parse_arm(f"x:{args.method}:{args.prune}")[1].kwargs
    extra.pop("method")
    opts = argparse.Namespace(image_size=Q.IMAGE_SIZE, base_epochs=20, prune_examples=640, recal_batches=10, cache=args.cache)
    torch.set_num_threads(1)
    rows, worst = [], {r: 0.0 for r in RECIPES}
    cells = [(a, int(s), float(t)) for a in args.archs.split(",") for s in args.seeds.split(",") for t in args.targets.split(",")]
    results = {}
    for arch, seed, frac in cells:
        setup = Q.make_setup(arch, seed, opts)
        results[(arch, seed, frac)] = one_cell(setup, frac, args.method, extra)
        Q.log(f"[{arch} seed {seed} flops:{frac:g}] done")
    for name in RECIPES:
        deltas = [results[c][name][1] - results[c][name][0] for c in cells]
        worst[name] = min(deltas)
        rows.append([name, *(f"{results[c][name][0]:.1f} -> {results[c][name][1]:.1f}" for c in cells),
                     f"{sum(deltas) / len(deltas):+.1f}", f"{min(deltas):+.1f}"])
    heads = ["recipe (1 epoch)", *(f"{a} s{s} {f:g}" for a, s, f in cells), "mean change", "worst change"]
    print(f"{args.method} {args.prune or '(defaults)'}: test accuracy % before (recalibrated) -> after one epoch "
          "(recalibrated)\n")
    print(format_table(heads, rows, markdown=True))


if __name__ == "__main__":
    main()
