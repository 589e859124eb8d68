"""Pruned-model QUALITY benchmark: raykfe's methods next to torch-pruning's criteria on digits,
test accuracy and loss after 0, 1 and 5 epochs of the SAME fine-tuning.

    PYTHONPATH=. .venv/bin/python bench/quality.py            # full (BENCHMARKS.md has its time)
    PYTHONPATH=. .venv/bin/python bench/quality.py --quick    # vgg_small, seed 0, flops 0.5 / 0.9, budgets 0 / 1
    .venv/bin/python bench/quality.py --render results/bench-quality/<stamp>.json   # tables again, no run
    .venv/bin/python bench/quality.py --resume results/bench-quality/<stamp>.json   # finish an interrupted run
    options: --archs --seeds --targets --budgets --arms --all-methods --add-arm NAME:METHOD[:k=v,...]
             --jobs (processes, default 2) --threads (per process, default 1) --image-size --prune-examples ...

(``PYTHONPATH=.`` makes a git worktree's own ``raykfe`` win over the editable install; the run prints
which ``raykfe`` it imported and records it, with its commit, in the JSON.)

A tuned arm is one entry of :data:`ARMS` (``ARMS["ed-cap0.8"] = Arm("raykfe", {"method":
"eigendamage", "max_layer_ratio": 0.8})``) or, without editing, ``--add-arm
ed-cap0.8:eigendamage:max_layer_ratio=0.8``. The work is split into (arch, seed, target) units, each
running every selected arm, on ``--jobs`` spawned processes of ``--threads`` torch threads (on the
shared 2-core machine one thread per process is several times faster than two); cells are sorted
before writing, so the JSON and the tables do not depend on the number of processes.

What is measured, per cell (architecture, seed, target F, arm, fine-tuning budget):

* the base: ``build_model(arch)`` trained on the digits train split (``load_data("digits",
  image_size=16, seed=seed)``: 1258 train / 180 val / 359 test images ``[3, 16, 16]``), SGD lr 0.05,
  momentum 0.9, wd 5e-4, batch 64, cosine, ``--base-epochs`` epochs; cached under
  ``results/bench-cache/`` keyed by arch, image size, seed, epochs and lr. The seed changes the split,
  the initialisation and the data order.
* pruning to "F of the MACs removed": a raykfe arm calls ``raykfe.prune(base, batches,
  target=f"flops:{F}", **kwargs)`` on ``--prune-examples`` (640) training examples in batches of 64 (a
  seeded draw, the same for every arm); a torch-pruning arm (``tp_peers.py``: global ranking, the
  classifier ignored) gets its importance statistics from the same examples and its global channel
  ratio bisected until the MACs removed (``raykfe.count`` on one ``[1, 3, 16, 16]`` input) lie in
  ``[F, F + 0.01]``; the ratios are cached per (arch, seed, base weights, criterion, F, examples).
  An arm that raises while pruning (e.g. an unreachable target) is recorded as "refused" with the
  one-line reason.
* BatchNorm recalibration of every model before every evaluation and before fine-tuning: running
  statistics reset, ``momentum=None`` (PyTorch's cumulative average: the mean of the batch means and
  of the batches' unbiased variances; it differs from the pooled variance by the spread of the batch
  means, 1e-4 relative in a check on vgg_small with random inputs), ``--recal-batches`` (10)
  batches of 64 training examples (a seeded draw, not the pruning examples) in train mode under
  ``no_grad``, momentum restored, eval mode. No weight changes. The base is recalibrated the same way for the loss-increase reference.
* budget 0: the pruned model after recalibration; budget E > 0: a copy of it fine-tuned E epochs
  with SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, cosine from 0.01 to 0 over the E epochs
  (stepped per batch), data order seeded by the seed alone (the same for every arm), then
  recalibrated. Each budget is its own run from the same pruned model (the schedules differ).
* reported: test accuracy % and mean test cross-entropy, MACs and parameters removed %, seconds of
  pruning (raykfe: statistics + eigen + plan + surgery, ``raykfe.prune`` end to end; torch-pruning:
  importance statistics + the whole bisection; a cached ratio reports the seconds of the run that
  found it), and for calibration the validation loss right after pruning + recalibration minus the
  base's (recalibrated the same way) next to raykfe's predicted loss increase (sum of the plan's
  ``predicted_dloss``; channel plans do not expose one).

Tables are means over the seeds; the best arm of each column (highest mean accuracy, then lowest
loss) is in bold. Raw results go to ``results/bench-quality/<stamp>.json`` (written after every
cell) and the tables to ``<stamp>.md``; progress goes to stderr. It asserts nothing.
Tensors: images float32 ``[N, 3, S, S]``, labels int64 ``[N]``, logits ``[N, 10]``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from safetensors.torch import load_file, save_file
from torch import nn

import raykfe
from raykfe.data import load_data
from raykfe.methods import METHODS
from raykfe.models import build_model
from raykfe.report import format_table
from tp_peers import CRITERIA, TOLERANCE, criterion_grads, reach_target, tp_prune  # bench/tp_peers.py

ARCHS = ("resnet32", "vgg_small", "mobilenet_small")
SEEDS = (0, 1)
TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95)
BUDGETS = (0, 1, 5)
IMAGE_SIZE = 16  # digits are 8x8: 16 keeps all their detail, 4x fewer MACs than 32, last maps 4x4
BATCH = 64
HEADLINE = "eigendamage"  # raykfe's row in the summary


@dataclass(frozen=True)
class Recipe:
    """SGD + momentum with a cosine learning rate from ``lr`` to 0 over the run (stepped per batch)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = BATCH


BASE_RECIPE = Recipe(lr=0.05)
FINETUNE_RECIPE = Recipe(lr=0.01)


@dataclass(frozen=True)
class Arm:
    """One pruning recipe. ``kind="raykfe"``: ``raykfe.prune(base, batches, target=..., **kwargs)``,
    ``kwargs`` holding ``method`` and any extra keyword (a "tuned" arm: ``max_layer_ratio=0.8``, ...).
    ``kind="tp"``: torch-pruning with criterion ``kwargs["criterion"]`` (``tp_peers.CRITERIA``)."""

    kind: str
    kwargs: dict = field(default_factory=dict)


def _builtin_arms() -> dict[str, Arm]:
    arms = {name: Arm("raykfe", {"method": name}) for name, info in METHODS.items() if info.rounds == 1}
    if "sosp-i" in arms:  # one JVP per channel per example: one batch of 64 keeps it to minutes
        arms["sosp-i"] = Arm("raykfe", {"method": "sosp-i", "max_batches": 1})
    arms.update({f"tp-{c}": Arm("tp", {"criterion": c}) for c in CRITERIA})
    return arms


#: every arm by name; add tuned ones here (or with --add-arm) and select them with --arms
ARMS: dict[str, Arm] = _builtin_arms()
DEFAULT_ARMS = ("eigendamage", "l1", "c-obd", "kron-obs", "sosp-h", "tp-magnitude", "tp-taylor", "tp-hessian")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 220) -> str:
    text = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0].replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------
# data, training, recalibration, evaluation


def gather(split, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 3, S, S], y [n])`` of the examples ``idx`` of a split."""
    items = [split[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def fixed_batches(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` examples of a seeded permutation, in batches of :data:`BATCH`."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return [(x[perm[k : k + BATCH]], y[perm[k : k + BATCH]]) for k in range(0, len(perm), BATCH)]


def train_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, recipe: Recipe, seed: int) -> float:
    """Train in place (batches of ``recipe.batch_size``, last partial batch dropped, order from
    ``seed``), cosine learning rate to 0 over ``epochs``; returns seconds. Leaves eval mode."""
    t0 = time.perf_counter()
    steps = len(y) // recipe.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for k in range(steps):
            idx = perm[k * recipe.batch_size : (k + 1) * recipe.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss {float(loss)})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running mean / variance as the exact average over ``batches``
    (train mode, ``momentum=None``), then restore each momentum and leave eval mode. Weights untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """``{"acc": %, "loss": mean cross-entropy}`` in eval mode."""
    model.eval()
    logits = torch.cat([model(x[k : k + 256]) for k in range(0, len(y), 256)])
    return {"acc": 100.0 * float((logits.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(logits, y))}


# ------------------------------------------------------------------------------------------------
# one (arch, seed): data, base model, shared statistics


@dataclass
class Setup:
    arch: str
    seed: int
    data: dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (x, y)
    base: nn.Module
    example: torch.Tensor  # [1, 3, S, S]
    prune_batches: list[tuple[torch.Tensor, torch.Tensor]]
    recal: list[torch.Tensor]
    base_info: dict
    cache_dir: Path
    grads: dict = field(default_factory=dict)  # tp criterion -> (grads, seconds)


def base_model(arch: str, seed: int, data, args) -> tuple[nn.Module, dict]:
    """The trained base (from the cache when there) and its record."""
    key = f"base-{arch}-s{args.image_size}-seed{seed}-e{args.base_epochs}-lr{BASE_RECIPE.lr:g}"
    path, meta_path = args.cache / f"{key}.safetensors", args.cache / f"{key}.json"
    torch.manual_seed(seed)
    model = build_model(arch, 10)
    if path.is_file() and meta_path.is_file():
        model.load_state_dict(load_file(str(path)))
        meta = json.loads(meta_path.read_text())
    else:
        log(f"[{arch} seed {seed}] training the base, {args.base_epochs} epochs")
        secs = train_sgd(model, *data["train"], args.base_epochs, BASE_RECIPE, seed)
        args.cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        meta = {"train_seconds": secs, "epochs": args.base_epochs, "recipe": BASE_RECIPE.__dict__}
        meta_path.write_text(json.dumps(meta, indent=1))
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return model.eval(), meta


def make_setup(arch: str, seed: int, args) -> Setup:
    splits = load_data("digits", image_size=args.image_size, seed=seed)
    data = {name: gather(s, torch.arange(len(s))) for name, s in
            (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    base, meta = base_model(arch, seed, data, args)
    prune_batches = fixed_batches(*data["train"], args.prune_examples, 10_000 + seed)
    recal = [x for x, _ in fixed_batches(*data["train"], args.recal_batches * BATCH, 20_000 + seed)]
    example = data["test"][0][:1]
    counts = raykfe.count(base, example)
    calibrated = recalibrate_bn(copy.deepcopy(base), recal)
    meta.update(params=counts.params, macs=counts.macs, test=evaluate(base, *data["test"]),
                val=evaluate(base, *data["val"]), val_recalibrated=evaluate(calibrated, *data["val"]),
                test_recalibrated=evaluate(calibrated, *data["test"]),
                sizes={k: len(v[1]) for k, v in data.items()})
    return Setup(arch, seed, data, base, example, prune_batches, recal, meta, args.cache)


# ------------------------------------------------------------------------------------------------
# arms


@dataclass
class Pruned:
    model: nn.Module
    seconds: float
    predicted_dloss: float | None = None  # raykfe's predicted loss increase, where the plan gives one
    info: dict = field(default_factory=dict)


def prune_raykfe(setup: Setup, arm: Arm, frac: float, tp_cache: dict) -> Pruned:
    """``raykfe.prune`` end to end; the predicted loss increase is the sum of its steps' (the plan's
    record; None for methods whose scores are not in loss units)."""
    t0 = time.perf_counter()
    kwargs, base, target, info = dict(arm.kwargs), setup.base, frac, {}
    first = kwargs.pop("first", None)
    if first:  # "METHOD@SHARE": that method removes SHARE of the target's MACs first, this arm the rest
        method, _, share = str(first).partition("@")
        part = float(share) * frac
        if method.startswith("tp-"):
            grads, _ = tp_grads(setup, method[3:], setup.cache_dir)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = reach_target(setup.base, method[3:], grads, part, setup.example)[0]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = raykfe.prune(setup.base, setup.prune_batches, target=f"flops:{part:g}", method=method).model
        left = raykfe.count(base, setup.example).macs / setup.base_info["macs"]
        target = 1 - (1 - frac) / left
        info["first"] = {"method": method, "removed": 1 - left}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = raykfe.prune(base, setup.prune_batches, target=f"flops:{target:g}", **kwargs)
    secs = time.perf_counter() - t0
    steps = [s.get("predicted_dloss") for s in res.plan.steps]  # None: the method's scores are not in loss units
    predicted = float(sum(steps)) if steps and None not in steps else None
    achieved = res.plan.summary.achieved
    return Pruned(res.model, secs, predicted, {**info, "timings": res.timings, "plan_achieved": achieved})


def tp_grads(setup: Setup, criterion: str, cache_dir: Path) -> tuple[Any, float]:
    """The criterion's gradient statistics on the pruning examples (with the seconds they took), once
    per base: kept in memory and under ``cache_dir`` (every target of a base reads the same)."""
    if criterion not in setup.grads:
        stem = cache_dir / f"tp-grads-{setup.base_info['sha256'][:16]}-{criterion}-n{len(setup.prune_batches)}x{BATCH}"
        st, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if criterion == "magnitude":
            setup.grads[criterion] = (None, 0.0)
        elif st.is_file() and meta.is_file():
            setup.grads[criterion] = (load_file(str(st)), json.loads(meta.read_text())["seconds"])
        else:
            t0 = time.perf_counter()
            grads = criterion_grads(setup.base, criterion, setup.prune_batches)
            secs = time.perf_counter() - t0
            save_file({k: v.contiguous() for k, v in grads.items()}, str(st) + f".{os.getpid()}.tmp")
            os.replace(str(st) + f".{os.getpid()}.tmp", st)
            write_json(meta, {"seconds": secs})
            setup.grads[criterion] = (grads, secs)
    return setup.grads[criterion]


def prune_tp(setup: Setup, arm: Arm, frac: float, tp_cache: dict) -> Pruned:
    """torch-pruning, global ratio bisected to the MACs target (or taken from the ratio cache)."""
    criterion = arm.kwargs["criterion"]
    grads, grad_secs = tp_grads(setup, criterion, setup.cache_dir)
    key = "|".join([setup.arch, f"seed{setup.seed}", setup.base_info["sha256"][:16], criterion, f"{frac:g}",
                    f"n{len(setup.prune_batches)}x{BATCH}", f"tol{TOLERANCE:g}", tp.__version__])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if key in tp_cache:
            hit = tp_cache[key]
            model = tp_prune(setup.base, criterion, grads, hit["ratio"], setup.example)
            return Pruned(model, hit["seconds"], None, {**hit, "cached": True})
        t0 = time.perf_counter()
        model, ratio, achieved, trials = reach_target(setup.base, criterion, grads, frac, setup.example)
    hit = {"ratio": ratio, "achieved": achieved, "trials": trials, "seconds": grad_secs + time.perf_counter() - t0}
    tp_cache[key] = hit
    return Pruned(model, hit["seconds"], None, {**hit, "cached": False})


PRUNERS = {"raykfe": prune_raykfe, "tp": prune_tp}


# ------------------------------------------------------------------------------------------------
# one cell: prune, recalibrate, evaluate, fine-tune per budget


def measure_budgets(setup: Setup, model: nn.Module, budgets) -> dict[str, dict]:
    """Test accuracy / loss after each budget; each budget > 0 fine-tunes its own copy of ``model``."""
    out = {}
    for b in budgets:
        m = model if b == 0 else copy.deepcopy(model)
        torch.manual_seed(setup.seed)
        secs = train_sgd(m, *setup.data["train"], b, FINETUNE_RECIPE, 30_000 + setup.seed) if b else 0.0
        recalibrate_bn(m, setup.recal)
        out[str(b)] = {**evaluate(m, *setup.data["test"]), "ft_seconds": secs}
    return out


def run_cell(setup: Setup, name: str, arm: Arm, frac: float, budgets, tp_cache: dict) -> dict:
    rec: dict[str, Any] = {"arch": setup.arch, "seed": setup.seed, "target": frac, "arm": name, "kind": arm.kind,
                           "kwargs": arm.kwargs}
    try:
        pruned = PRUNERS[arm.kind](setup, arm, frac, tp_cache)
    except Exception as exc:  # noqa: BLE001 - an arm that cannot prune gets a cell, not a stop
        return {**rec, "status": "refused", "reason": one_line(exc)}
    raw = evaluate(pruned.model, *setup.data["test"])  # straight out of the pruner, BatchNorm statistics as left
    model = recalibrate_bn(pruned.model, setup.recal)
    counts = raykfe.count(model, setup.example)
    val = evaluate(model, *setup.data["val"])
    rec.update(
        status="ok", prune_seconds=pruned.seconds, predicted_dloss=pruned.predicted_dloss, info=pruned.info,
        params=counts.params, macs=counts.macs,
        macs_removed=100.0 * (1 - counts.macs / setup.base_info["macs"]),
        params_removed=100.0 * (1 - counts.params / setup.base_info["params"]),
        test_no_recal=raw, val_pruned=val, actual_dloss=val["loss"] - setup.base_info["val_recalibrated"]["loss"],
    )
    try:
        rec["budgets"] = measure_budgets(setup, model, budgets)
    except Exception as exc:  # noqa: BLE001
        rec.update(status="failed", reason=one_line(exc))
    return rec


def describe(rec: dict) -> str:
    head = f"[{rec['arch']} seed {rec['seed']}] {rec['arm']} flops:{rec['target']:g}"
    if rec["status"] != "ok":
        return f"{head}: {rec['status']}: {rec['reason']}"
    accs = " / ".join(f"{v['acc']:.1f}" for v in rec["budgets"].values())
    ft = sum(v["ft_seconds"] for v in rec["budgets"].values())
    return (f"{head}: {rec['macs_removed']:.1f}% MACs removed, test acc at budgets {'/'.join(rec['budgets'])}: "
            f"{accs} (prune {rec['prune_seconds']:.1f} s, fine-tune {ft:.1f} s)")


# ------------------------------------------------------------------------------------------------
# tables (from the JSON alone, so that --render needs no run)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def aggregate(cells: list[dict], arch: str, arm: str, target: float, budget: str | None = None) -> dict:
    """Means over the seeds of one (arch, arm, target[, budget]): ``n`` cells, ``ok`` usable ones."""
    recs = [c for c in cells if c["arch"] == arch and c["arm"] == arm and c["target"] == target]
    ok = [c for c in recs if c["status"] == "ok" and (budget is None or budget in c.get("budgets", {}))]
    out: dict[str, Any] = {"n": len(recs), "ok": len(ok), "status": recs[0]["status"] if recs and not ok else "ok"}
    if ok and budget is not None:
        out["acc"] = _mean([c["budgets"][budget]["acc"] for c in ok])
        out["loss"] = _mean([c["budgets"][budget]["loss"] for c in ok])
    if ok:
        for k in ("macs_removed", "params_removed", "prune_seconds", "actual_dloss"):
            out[k] = _mean([c[k] for c in ok])
        out["no_recal_acc"] = _mean([c["test_no_recal"]["acc"] for c in ok])
        out["val_acc_pruned"] = _mean([c["val_pruned"]["acc"] for c in ok])
        preds = [c["predicted_dloss"] for c in ok if c.get("predicted_dloss") is not None]
        out["predicted_dloss"] = _mean(preds) if len(preds) == len(ok) else None
    return out


def _partial(a: dict) -> str:
    return "" if a["ok"] == a["n"] else f" ({a['ok']}/{a['n']} seeds)"


def acc_cell(a: dict, best: bool) -> str:
    if a["n"] == 0:
        return "-"
    if a["ok"] == 0:
        return a["status"]
    text = f"{a['acc']:.1f} / {a['loss']:.3f}"
    return (f"**{text}**" if best else text) + _partial(a)


def winner(aggs: dict[str, dict]) -> str | None:
    """The arm with the highest mean accuracy (then lowest loss) among those with every seed done."""
    full = [(a["acc"], -a["loss"], arm) for arm, a in aggs.items() if a["n"] and a["ok"] == a["n"]]
    return max(full)[2] if full else None


def dims(res: dict) -> tuple[list[str], list[str], list[float], list[str]]:
    cells, o = res["cells"], res["meta"]["options"]
    order = lambda key, pref: [v for v in pref if any(c[key] == v for c in cells)]  # noqa: E731
    return (order("arch", o["archs"]), order("arm", o["arms"]), order("target", o["targets"]),
            [str(b) for b in o["budgets"]])


def accuracy_tables(res: dict) -> list[str]:
    archs, arms, targets, budgets = dims(res)
    out = []
    for arch in archs:
        for b in budgets:
            aggs = {t: {arm: aggregate(res["cells"], arch, arm, t, b) for arm in arms} for t in targets}
            wins = {t: winner(aggs[t]) for t in targets}
            rows = [[arm] + [acc_cell(aggs[t][arm], wins[t] == arm) for t in targets] for arm in arms]
            heads = ["arm"] + [f"flops:{t:g}" for t in targets]
            what = "BatchNorm recalibration only" if b == "0" else f"{b} epoch{'s' * (b != '1')} of fine-tuning"
            out.append(f"**{arch}, budget {b}** ({what}): test accuracy % / test loss, mean of the seeds\n\n"
                       + format_table(heads, rows, markdown=True))
    return out


def per_arch_tables(res: dict, title: str, cell, budget: str | None = None) -> list[str]:
    """One table per architecture, a row per arm, a column per target: ``cell(aggregate)`` where
    every cell of the column ran, its status otherwise; ``title`` follows ``**arch**: ``."""
    archs, arms, targets, _ = dims(res)
    out = []
    for arch in archs:
        rows = []
        for arm in arms:
            aggs = [aggregate(res["cells"], arch, arm, t, budget) for t in targets]
            rows.append([arm, *(a["status"] if a["ok"] == 0 else cell(a) for a in aggs)])
        out.append(f"**{arch}**: {title}\n\n" + format_table(["arm"] + [f"flops:{t:g}" for t in targets], rows, markdown=True))
    return out


def cost_tables(res: dict) -> list[str]:
    return per_arch_tables(res, "MACs removed % / params removed % / seconds of pruning", lambda a: (
        f"{a['macs_removed']:.1f} / {a['params_removed']:.1f} / {a['prune_seconds']:.1f}" + _partial(a)))


def summary_table(res: dict) -> str | None:
    """Per (arch, target, budget): the best torch-pruning criterion vs raykfe's headline arm."""
    archs, arms, targets, budgets = dims(res)
    peers = [a for a in arms if res["arms"][a]["kind"] == "tp"]
    if HEADLINE not in arms or not peers:
        return None
    rows = []
    for arch in archs:
        for t in targets:
            for b in budgets:
                best = winner({p: aggregate(res["cells"], arch, p, t, b) for p in peers})
                ed = aggregate(res["cells"], arch, HEADLINE, t, b)
                tp_text, gap = "-", "-"
                if best is not None:
                    pa = aggregate(res["cells"], arch, best, t, b)
                    tp_text = f"{best}: {pa['acc']:.1f} / {pa['loss']:.3f}"
                    if ed["ok"] == ed["n"] and ed["n"]:
                        gap = f"{ed['acc'] - pa['acc']:+.1f}"
                rows.append([arch, f"{t:g}", b, tp_text, acc_cell(ed, False), gap])
    heads = ["arch", "flops", "budget (epochs)", "best torch-pruning: acc / loss", f"{HEADLINE}: acc / loss",
             f"gap ({HEADLINE} - tp, points)"]
    return format_table(heads, rows, markdown=True)


def recalibration_tables(res: dict) -> list[str]:
    """Test accuracy straight out of the pruner vs after BatchNorm recalibration (budget 0)."""
    return per_arch_tables(
        res, "test accuracy % straight out of the pruner -> after BatchNorm recalibration",
        lambda a: f"{a['no_recal_acc']:.1f} -> {a['acc']:.1f}" if "acc" in a else f"{a['no_recal_acc']:.1f}", budget="0")


def calibration_tables(res: dict) -> list[str]:
    """Predicted (raykfe, where exposed) vs actual validation-loss increase right after pruning."""
    def cell(a):
        pred = "-" if a.get("predicted_dloss") is None else f"{a['predicted_dloss']:.3g}"
        return f"{pred} / {a['actual_dloss']:.3g}" + _partial(a)

    return per_arch_tables(res, "predicted / actual increase of the validation loss after pruning + recalibration "
                                "(nats; predicted: sum of the plan's `predicted_dloss`, '-' where the result gives none)", cell)


def refusals(res: dict) -> list[str]:
    seen: dict[tuple, set] = {}
    for c in res["cells"]:
        if c["status"] != "ok":
            seen.setdefault((c["arch"], c["arm"], c["status"], c["reason"]), set()).add(f"{c['target']:g}")
    return [f"{arch} / {arm} at flops {', '.join(sorted(ts))}: {st}: {reason}"
            for (arch, arm, st, reason), ts in seen.items()]


def render(res: dict) -> str:
    m = res["meta"]
    o = m["options"]
    bases = "; ".join(
        f"{arch} {_mean([b['test']['acc'] for b in bs]):.2f}% ({bs[0]['params']} params, {bs[0]['macs']} MACs)"
        for arch, bs in group_bases(res).items())
    parts = [
        f"Digits at {o['image_size']}x{o['image_size']}, seeds {', '.join(map(str, o['seeds']))}, "
        f"{o['prune_examples']} pruning examples, BatchNorm recalibration on {o['recal_batches']}x{BATCH} examples; "
        f"fine-tuning SGD lr {FINETUNE_RECIPE.lr:g}, momentum {FINETUNE_RECIPE.momentum:g}, wd "
        f"{FINETUNE_RECIPE.weight_decay:g}, batch {BATCH}, cosine. Base test accuracy (mean of seeds): {bases}. "
        f"Test split: {m.get('test_size', '?')} images (one image = {100 / max(1, m.get('test_size', 1)):.2f} points). "
        f"torch-pruning {m['torch_pruning']}, torch {m['torch']}, raykfe {commits(m)}; "
        f"wall time {m.get('wall_seconds', 0) / 60:.1f} min, CPU time "
        f"{'unknown' if m.get('cpu_seconds') is None else format(m['cpu_seconds'] / 60, '.1f') + ' min'} ({timing(m)}).",
        "### Test accuracy / loss", *accuracy_tables(res),
    ]
    summary = summary_table(res)
    if summary:
        parts += [f"### Summary: best torch-pruning criterion vs {HEADLINE} (defaults)", summary]
    parts += ["### Reductions achieved and pruning time", *cost_tables(res),
              "### What the recalibration does (budget 0)", *recalibration_tables(res),
              "### Calibration: predicted vs actual loss increase", *calibration_tables(res)]
    notes = refusals(res)
    if notes:
        parts += ["### Refused or failed cells", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"


def commits(meta: dict) -> str:
    """The raykfe commit(s) the results were measured with (one per run segment, repeats dropped)."""
    seen = [s.get("raykfe_commit") for s in meta.get("segments", [])] + [meta["raykfe_commit"]]
    return " + ".join(dict.fromkeys(c for c in seen if c))


def timing(meta: dict) -> str:
    segs = meta.get("segments", [])
    def load(v) -> str:
        return "?" if not v else f"{v[0]:.1f}"

    text = "; ".join(f"{s['jobs']} process(es) x {s['threads']} thread(s), {s['wall_seconds'] / 60:.1f} min"
                     f"{' (interrupted)' if s.get('open') else ''}, machine load average {load(s['load_average_start'])}"
                     f" -> {load(s['load_average_end'])}" for s in segs)
    return (f"{len(segs)} segments: " if len(segs) > 1 else "") + text


def group_bases(res: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for key, b in res["bases"].items():
        out.setdefault(key.split("|")[0], []).append(b)
    return out


# ------------------------------------------------------------------------------------------------
# driver


def parse_arm(spec: str) -> tuple[str, Arm]:
    """``NAME:METHOD[:key=value,...]`` -> a raykfe arm (values read as JSON, else kept as strings)."""
    parts = spec.split(":", 2)
    single = [m for m, info in METHODS.items() if info.rounds == 1]  # raykfe.prune refuses the others
    if len(parts) < 2 or not parts[0] or parts[1] not in single:
        raise ValueError(f"--add-arm {spec!r}: use NAME:METHOD[:key=value,...] with METHOD one of {', '.join(single)}")
    kwargs: dict[str, Any] = {"method": parts[1]}
    for item in filter(None, (parts[2] if len(parts) == 3 else "").split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return parts[0], Arm("raykfe", kwargs)


def csv(text: str, kind=str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="vgg_small, seed 0, flops 0.5 / 0.9, budgets 0 / 1")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS), help="fractions of the MACs removed")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="fine-tuning epochs (0: recalibration only)")
    ap.add_argument("--arms", default=None, help=f"comma-separated, from: {', '.join(ARMS)} (default: {','.join(DEFAULT_ARMS)})")
    ap.add_argument("--all-methods", action="store_true", help="every arm of ARMS (all single-pass raykfe methods)")
    ap.add_argument("--add-arm", action="append", default=[], metavar="NAME:METHOD[:k=v,...]",
                    help="a tuned raykfe arm, e.g. ed-cap0.8:eigendamage:max_layer_ratio=0.8 (repeatable; selected too)")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    ap.add_argument("--base-epochs", type=int, default=20)
    ap.add_argument("--prune-examples", type=int, default=640)
    ap.add_argument("--recal-batches", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2, help="processes, each taking one (arch, seed, target) at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: fastest on the shared 2 cores)")
    ap.add_argument("--cache", type=Path, default=Path("results/bench-cache"))
    ap.add_argument("--out", type=Path, default=Path("results/bench-quality"))
    ap.add_argument("--resume", type=Path, default=None,
                    help="a results JSON to continue: its finished (arch, seed, target) units are kept, the rest run")
    ap.add_argument("--render", type=Path, default=None, help="print the tables of a results JSON, run nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.archs, args.seeds, args.targets, args.budgets = "vgg_small", "0", "0.5,0.9", "0,1"
    for spec in args.add_arm:
        try:
            name, arm = parse_arm(spec)
        except ValueError as exc:
            ap.error(str(exc))
        ARMS[name] = arm
    names = list(ARMS) if args.all_methods else csv(args.arms) if args.arms else list(DEFAULT_ARMS)
    names += [s.split(":", 1)[0] for s in args.add_arm if s.split(":", 1)[0] not in names]
    bad = [n for n in names if n not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {', '.join(bad)}: choose from {', '.join(ARMS)} or add one with --add-arm")
    args.arm_names = names
    args.archs, args.seeds = csv(args.archs), csv(args.seeds, int)
    args.targets, args.budgets = csv(args.targets, float), sorted(set(csv(args.budgets, int)))
    return args


def code_version() -> str:
    root = Path(raykfe.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def new_results(args) -> dict:
    opts = {k: getattr(args, k) for k in ("archs", "seeds", "targets", "budgets", "image_size", "base_epochs",
                                          "prune_examples", "recal_batches", "jobs", "threads")}
    meta = {"command": " ".join(sys.argv), "options": {**opts, "arms": args.arm_names},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "raykfe_file": raykfe.__file__,
            "raykfe_commit": code_version(), "torch": torch.__version__, "torch_pruning": tp.__version__,
            "base_recipe": BASE_RECIPE.__dict__, "finetune_recipe": FINETUNE_RECIPE.__dict__, "tolerance": TOLERANCE}
    return {"meta": meta, "arms": {n: {"kind": ARMS[n].kind, "kwargs": ARMS[n].kwargs} for n in args.arm_names},
            "bases": {}, "cells": []}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")


def base_task(task) -> tuple[str, dict]:
    """Train (or load) one base and measure it."""
    arch, seed, args = task
    info = make_setup(arch, seed, args).base_info
    log(f"[{arch} seed {seed}] base: test {info['test']['acc']:.2f}% (loss {info['test']['loss']:.4f}), "
        f"{info['params']} params, {info['macs']} MACs")
    return f"{arch}|{seed}", info


def unit_task(task) -> tuple[int, list[dict], dict]:
    """Every arm at one (arch, seed, target); returns the cells and the new torch-pruning ratios."""
    index, arch, seed, frac, arms, args, tp_cache = task
    setup = make_setup(arch, seed, args)
    cache = dict(tp_cache)
    cells = []
    for name, arm in arms.items():
        cells.append(run_cell(setup, name, arm, frac, args.budgets, cache))
        log(describe(cells[-1]))
    return index, cells, {k: v for k, v in cache.items() if k not in tp_cache}


def mapper(args):
    """``imap_unordered`` of a pool of ``args.jobs`` spawned processes (``map`` in this process for 1)."""
    if args.jobs <= 1:
        _worker_init(args.threads)
        return map, None
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(args.jobs, initializer=_worker_init, initargs=(args.threads,))
    return pool.imap_unordered, pool


#: options a resumed run must share with the results it continues
SAME_SETTINGS = ("budgets", "image_size", "base_epochs", "prune_examples", "recal_batches")


def resumed(args, res: dict) -> set[tuple]:
    """Copy into ``res`` the finished units of ``args.resume`` (every selected arm done, with the same
    kwargs and settings); returns their ``(arch, seed, target)``."""
    old = json.loads(args.resume.read_text())
    differ = [k for k in SAME_SETTINGS if old["meta"]["options"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"quality.py: error: {args.resume} was run with other {', '.join(differ)}: run without --resume")
    units: dict[tuple, list[dict]] = {}
    for c in old["cells"]:
        if (c["arch"] in args.archs and c["seed"] in args.seeds and c["target"] in args.targets
                and c["arm"] in res["arms"] and old["arms"].get(c["arm"]) == res["arms"][c["arm"]]):
            units.setdefault((c["arch"], c["seed"], c["target"]), []).append(c)
    done = {u: cells for u, cells in units.items() if len(cells) == len(args.arm_names)}
    res["cells"] = sorted((c for cells in done.values() for c in cells), key=cell_order(args))
    segs = old["meta"].get("segments") or ([{
        "wall_seconds": old["meta"]["wall_seconds"], "cpu_seconds": old["meta"].get("cpu_seconds"),
        "open": "finished" not in old["meta"],
        "load_average_start": old["meta"].get("load_average_start"), "load_average_end": old["meta"].get("load_average_end"),
        "jobs": old["meta"]["options"].get("jobs", 1), "threads": old["meta"]["options"]["threads"],
        "raykfe_commit": old["meta"].get("raykfe_commit"),
    }] if "wall_seconds" in old["meta"] else [])
    res["meta"]["segments"] = [{k: v for k, v in s.items() if k != "current"} for s in segs]
    log(f"resuming {args.resume}: {len(done)} (arch, seed, target) unit(s) done, {len(res['cells'])} cells kept")
    return set(done)


def finish_segment(res: dict, t0: float, load_start, final: bool) -> None:
    """Record this run's wall time and (``final``: once the workers have exited) CPU time in
    ``segments`` (one per run or resumption; an interrupted one counts up to its last finished unit
    and its CPU time is unknown), and the totals."""
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage) if final else None
    seg = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds": cpu, "open": not final,
           "load_average_start": load_start, "load_average_end": os.getloadavg(),
           "jobs": res["meta"]["options"]["jobs"], "threads": res["meta"]["options"]["threads"],
           "raykfe_commit": res["meta"]["raykfe_commit"]}
    segs = res["meta"].setdefault("segments", [])
    if segs and segs[-1].get("open") and segs[-1].get("current"):
        segs.pop()
    segs.append({**seg, "current": True})
    cpus = [s["cpu_seconds"] for s in segs]
    res["meta"].update(wall_seconds=sum(s["wall_seconds"] for s in segs),
                       cpu_seconds=None if None in cpus else sum(cpus))


def run(args) -> dict:
    res = new_results(args)
    done = resumed(args, res) if args.resume else set()
    path = args.resume or args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    tp_path = args.cache / "tp-ratios.json"
    tp_cache = json.loads(tp_path.read_text()) if tp_path.is_file() else {}
    log(f"raykfe from {raykfe.__file__} ({res['meta']['raykfe_commit']}); {args.jobs} process(es) x "
        f"{args.threads} thread(s); results -> {path}")
    t0, load_start = time.perf_counter(), os.getloadavg()
    imap, pool = mapper(args)
    try:
        res["bases"] = dict(imap(base_task, [(a, s, args) for a in args.archs for s in args.seeds]))
        res["meta"]["test_size"] = next(iter(res["bases"].values()))["sizes"]["test"]
        arms = {n: ARMS[n] for n in args.arm_names}
        cheap = sorted(args.archs, key=lambda a: res["bases"][f"{a}|{args.seeds[0]}"]["macs"])
        todo = [(a, s, t) for a in cheap for t in args.targets for s in args.seeds if (a, s, t) not in done]
        for _, cells, new in imap(unit_task, [(i, a, s, t, arms, args, tp_cache) for i, (a, s, t) in enumerate(todo)]):
            res["cells"] = sorted(res["cells"] + cells, key=cell_order(args))
            tp_cache.update(new)
            finish_segment(res, t0, load_start, final=False)
            write_json(path, res)
            write_json(tp_path, tp_cache)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    finish_segment(res, t0, load_start, final=True)
    for seg in res["meta"]["segments"]:
        seg.pop("current", None)
    res["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(path, res)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; raw results: {path}")
    res["meta"]["json"] = str(path)
    return res


def cell_order(args):
    """Cells sorted as the options list them (arch, seed, target, arm): the JSON is the same for any
    number of processes."""
    pos = {k: {v: i for i, v in enumerate(getattr(args, k))} for k in ("archs", "seeds", "targets", "arm_names")}
    return lambda c: (pos["archs"][c["arch"]], pos["seeds"][c["seed"]], pos["targets"][c["target"]],
                      pos["arm_names"][c["arm"]])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    res = run(args)
    text = render(res)
    Path(res["meta"]["json"]).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
