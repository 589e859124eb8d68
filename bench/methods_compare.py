"""Benchmark on the digits job: every raykfe pruning method next to torch-pruning's Magnitude, Taylor
and Hessian importances, at flops 0.5 / 0.7 / 0.9, test accuracy before and after the SAME fine-tuning.

    .venv/bin/python bench/methods_compare.py [--methods eigendamage,l1,...] [--peers magnitude,taylor,hessian]
        [--targets 0.5,0.7,0.9] [--epochs 5] [--out results/bench] [--retrain]

Prints ONE markdown table (also written to ``<out>/methods.md``) and a list of notes; progress goes
to stderr; it asserts nothing.

* The base ResNet32 (``jobs/digits.yaml``'s base settings) is trained once, by a raykfe job with no
  fine-tuning, and cached as ``<out>/base-resnet32.safetensors`` (``--retrain`` trains it again).
* Every raykfe method runs as a job (``run_job``, in-process) on that base, one output directory per
  method and target (``<out>/<method>-<F>``). A finished identical job is reused, so an interrupted
  benchmark continues where it stopped; a directory holding a different job (another budget, another
  base) is overwritten.
* The torch-pruning peers (``tp.pruner.BasePruner``, global ranking, classifier ignored) run on the
  same base, data splits and example input; their channel ratio is bisected to each MACs target
  (counted with :func:`raykfe.count`), then they are fine-tuned with raykfe's trainer exactly as the
  pipeline fine-tunes (same settings, loader, shuffling seed). Their results are cached as
  ``<out>/tp-<peer>-<F>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

from raykfe.checkpoint import read_file
from raykfe.config import load_config
from raykfe.counting import count
from raykfe.data import make_loader
from raykfe.errors import StorageError
from raykfe.finetune import evaluate, train
from raykfe.methods import METHODS
from raykfe.models import build_model
from raykfe.data import job_splits
from raykfe.finetune import seed_everything
from raykfe.pipeline import run_job
from raykfe.report import format_table, human
from tp_peers import CRITERIA, MAGNITUDE_P, TOLERANCE, criterion_grads, reach_target  # bench/tp_peers.py

JOB = "jobs/digits.yaml"
PEERS = CRITERIA


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(exc: BaseException, limit: int = 100) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0].replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# base model


def base_weights(out: Path, retrain: bool) -> Path:
    """The cached base state_dict; trained by a raykfe job (base stage only matters) when missing."""
    path = out / "base-resnet32.safetensors"
    if path.is_file() and not retrain:
        return path
    uri = str(out / "base-job")
    log(f"training the base model ({JOB} base settings) in {uri}")
    t0 = time.perf_counter()
    cfg = load_config(JOB, [
        "runtime=local", "progress=false", "finetune.epochs=0", "stats.max_batches=1", f"output.uri={uri}",
        f"output.overwrite={'true' if retrain else 'false'}",
    ])
    run_job(cfg, log=log)  # its pruning/fine-tuning stages are irrelevant here (0 epochs, 1 stats batch)
    state = st_load(read_file(uri, "base.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    log(f"base model cached as {path} ({time.perf_counter() - t0:.0f} s)")
    return path


# ------------------------------------------------------------------------------------------------
# raykfe methods


def method_overrides(method: str, args) -> list[str]:
    if method == "sosp-i":
        return ["stats.max_batches=1"]
    if method == "eigendamage-iterative":
        return [f"prune.rounds={args.rounds}", f"prune.round_epochs={args.round_epochs}"]
    if method == "slimming":
        return [f"sparsity.epochs={args.sparsity_epochs}"]
    return []


def extra_epochs(cfg) -> int:
    """Training epochs a method spends beyond the shared fine-tuning budget."""
    p = cfg.prune
    if p.method == "slimming":
        return cfg.sparsity.epochs
    if METHODS[p.method].space == "kfe" and p.n_rounds > 1:
        rounds_ep = p.round_epochs if p.round_epochs is not None else cfg.finetune.epochs
        return (p.n_rounds - 1) * rounds_ep
    return 0


def job_overrides(method: str, frac: float, args, base_path: Path, tag: str) -> list[str]:
    return [
        "runtime=local", "progress=false", f"name=digits-bench-{tag}", f"model.weights={base_path}",
        f"prune.method={method}", f"prune.target=flops:{frac:g}", f"finetune.epochs={args.epochs}",
        f"output.uri={args.out / f'{method}-{frac:g}'}", "output.overwrite=false", *method_overrides(method, args),
    ]


def run_method(overrides: list[str], shared: list[str] = ()) -> dict:
    """One job; ``shared``: the method's first target's output, whose statistics (and sparsity
    training) it reuses, as a sweep's trials do (they do not depend on the target)."""
    cfg = load_config(JOB, overrides)
    try:
        res = run_job(cfg, log=log, shared=shared)
    except StorageError as exc:
        if "different job" not in str(exc):
            raise
        log(f"{cfg.output.uri} holds a different job (other budget or base): running this one over it")
        res = run_job(load_config(JOB, [*overrides, "output.overwrite=true"]), log=log, shared=shared)
    return res.metrics


# ------------------------------------------------------------------------------------------------
# torch-pruning peers


def peer_gradients(base, peer: str, splits, cfg, hessian_examples: int) -> dict[str, torch.Tensor] | None:
    """What the importance reads from ``param.grad``, computed once on the base (eval mode), keyed by
    parameter name (:mod:`tp_peers`): taylor, the mean cross-entropy gradient over the whole train
    split (the statistics batches); hessian, the mean of squared per-example gradients over the first
    ``hessian_examples`` train examples, on one torch thread (on this shared 2-core machine, 2 threads
    on batch-of-one passes ran ~20x slower)."""
    batches = make_loader(splits.train, cfg.stats.batch_size, shuffle=False)
    if peer != "hessian":
        return criterion_grads(base, peer, batches)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return criterion_grads(base, peer, batches, hessian_examples)
    finally:
        torch.set_num_threads(threads)


def run_peer(peer: str, frac: float, args, base, base_sha: str, splits, cfg, example, grad_cache: dict) -> dict:
    ident = {
        "peer": peer, "target": frac, "base_sha256": base_sha, "epochs": args.epochs, "tolerance": TOLERANCE,
        "magnitude_p": MAGNITUDE_P, "hessian_examples": args.hessian_examples, "torch_pruning": tp.__version__,
        "finetune": dataclasses.asdict(cfg.finetune),
    }
    cache = args.out / f"tp-{peer}-{frac:g}.json"
    if cache.is_file() and not args.retrain:
        stored = json.loads(cache.read_text())
        if stored.get("identity") == json.loads(json.dumps(ident)):
            log(f"{cache} holds this run's result; reusing it")
            return stored["metrics"]
    t0 = time.perf_counter()
    if peer not in grad_cache:
        grad_cache[peer] = (peer_gradients(base, peer, splits, cfg, args.hessian_examples), time.perf_counter() - t0)
    grads, t_stats = grad_cache[peer]
    t0 = time.perf_counter()
    model, ratio, achieved, trials = reach_target(base, peer, grads, frac, example)
    t_search = time.perf_counter() - t0
    test = make_loader(splits.test, 256, shuffle=False)
    before = evaluate(model, test)["accuracy"]
    log(f"tp {peer} flops:{frac:g}: channel ratio {ratio:.4f} -> {100 * achieved:.2f}% fewer MACs ({trials} trials); "
        f"fine-tuning {cfg.finetune.epochs} epochs")
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    train(model, make_loader(splits.train, cfg.finetune.batch_size, shuffle=True, seed=cfg.seed + 1, drop_last=True),
          cfg.finetune.settings(), val_loader=make_loader(splits.val, 256, shuffle=False), progress=False)
    t_ft = time.perf_counter() - t0
    after = evaluate(model, test)["accuracy"]
    b, p = count(base, example), count(model, example)
    metrics = {
        "pruned": {"test_acc_before_finetune": before, "test_acc": after, "params": p.params, "macs": p.macs},
        "macs_reduction": 1 - p.macs / b.macs, "params_reduction": 1 - p.params / b.params,
        "pruning_ratio": ratio, "trials": trials,
        "timings": {"statistics": t_stats, "search": t_search, "finetune": t_ft},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"identity": ident, "metrics": metrics}, indent=1))
    return metrics


# ------------------------------------------------------------------------------------------------
# table


def pruning_seconds(metrics: dict) -> float:
    """Seconds from the base to the pruned model at the target (statistics, eigen, plan / search);
    training stages (sparsity, fine-tuning between rounds or after) are not counted."""
    t = metrics.get("timings", {})
    return sum(t.get(k, 0.0) for k in ("statistics", "eigen", "plan", "search"))


def cells(result) -> list[str]:
    if isinstance(result, BaseException):
        return [f"failed: {one_line(result)}", "-"]
    p = result["pruned"]
    return [f"{100 * p['test_acc_before_finetune']:.1f} / {100 * p['test_acc']:.1f}",
            f"{100 * result['macs_reduction']:.1f} / {100 * result['params_reduction']:.1f}"]


def row(name: str, extra: str, results: dict, targets: list[float]) -> list[str]:
    out = [name, extra]
    for f in targets:
        out += cells(results[f])
    secs = ["-" if isinstance(results[f], BaseException) else f"{pruning_seconds(results[f]):.0f}" for f in targets]
    return out + [" / ".join(secs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="raykfe methods (comma-separated; '' for none)")
    ap.add_argument("--peers", default=",".join(PEERS), help="torch-pruning importances: magnitude,taylor,hessian ('' for none)")
    ap.add_argument("--targets", default="0.5,0.7,0.9", help="fractions of the MACs to remove")
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning budget of every method (epochs)")
    ap.add_argument("--rounds", type=int, default=3, help="eigendamage-iterative: prune.rounds")
    ap.add_argument("--round-epochs", type=int, default=2, help="eigendamage-iterative: prune.round_epochs")
    ap.add_argument("--sparsity-epochs", type=int, default=5, help="slimming: sparsity.epochs")
    ap.add_argument("--hessian-examples", type=int, default=256, help="tp GroupHessian: per-example gradients")
    ap.add_argument("--out", type=Path, default=Path("results/bench"), help="cache and job directory")
    ap.add_argument("--retrain", action="store_true", help="train the base model again (and redo every row)")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    targets = [float(f) for f in args.targets.split(",") if f]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}: choose from {', '.join(PEERS)}")

    base_path = base_weights(args.out, args.retrain)
    base_sha = sha256_of(base_path)
    cfg = load_config(JOB, ["runtime=local", "progress=false", f"finetune.epochs={args.epochs}"])
    splits = job_splits(cfg.data, cfg.seed)
    example = splits.test[0][0][None]  # the pipeline's example input: 1x3x32x32
    base = build_model(cfg.model.name, splits.num_classes, width=cfg.model.width)
    base.load_state_dict(load_file(str(base_path)))
    base_acc = evaluate(base, make_loader(splits.test, 256, shuffle=False))["accuracy"]
    base_counts = count(base, example)
    base.eval()
    log(f"base: {base_path} (sha256 {base_sha[:12]}), test accuracy {100 * base_acc:.2f}%")

    rows = []
    for m in methods:
        results = {}
        try:
            extra = str(extra_epochs(load_config(JOB, job_overrides(m, targets[0], args, base_path, base_sha[:12]))))
        except Exception:  # noqa: BLE001 - an invalid override fails in the cells below
            extra = "-"
        for f in targets:
            log(f"--- {m} flops:{f:g}")
            t0 = time.perf_counter()
            try:
                first = str(args.out / f"{m}-{targets[0]:g}")
                results[f] = run_method(job_overrides(m, f, args, base_path, base_sha[:12]), [] if f == targets[0] or m == "eigendamage-iterative" else [first])  # rounds are target-specific
                log(f"--- {m} flops:{f:g} done in {time.perf_counter() - t0:.0f} s")
            except Exception as exc:  # noqa: BLE001 - a failing method gets a cell, not a stop
                results[f] = exc
                log(f"--- {m} flops:{f:g} FAILED: {one_line(exc, 300)}")
        rows.append(row(m, extra, results, targets))

    grad_cache: dict = {}
    for peer in peers:
        results = {}
        for f in targets:
            log(f"--- tp {peer} flops:{f:g}")
            t0 = time.perf_counter()
            try:
                results[f] = run_peer(peer, f, args, base, base_sha, splits, cfg, example, grad_cache)
                log(f"--- tp {peer} flops:{f:g} done in {time.perf_counter() - t0:.0f} s")
            except Exception as exc:  # noqa: BLE001
                results[f] = exc
                log(f"--- tp {peer} flops:{f:g} FAILED: {one_line(exc, 300)}")
        rows.append(row(PEERS[peer], "0", results, targets))

    headers = ["method", "extra epochs"]
    for f in targets:
        headers += [f"{f:g} before/after FT %", f"{f:g} MACs/params removed %"]
    headers.append("pruning s (" + " / ".join(f"{f:g}" for f in targets) + ")")
    ft = cfg.finetune
    n_train, n_val, n_test = len(splits.train), len(splits.val), len(splits.test)
    title = (f"Digits job ({cfg.model.name} on scikit-learn digits at {cfg.data.image_size}x{cfg.data.image_size}, "
             f"{n_train} train / {n_val} val / {n_test} test): base test accuracy {100 * base_acc:.2f}% "
             f"({human(base_counts.params)} params, {human(base_counts.macs)} MACs); every row fine-tuned "
             f"{ft.epochs} epochs (SGD lr {ft.lr:g}, momentum {ft.momentum:g}, wd {ft.weight_decay:g}, "
             f"batch {ft.batch_size}, lr x{ft.gamma:g} at {', '.join(f'{m:g}' for m in ft.milestones)} of the epochs).")
    notes = [
        "Cells \"F before/after FT %\": test accuracy of the pruned model right after pruning and after the shared "
        "fine-tuning budget, for the target of removing the fraction F of the MACs. \"MACs/params removed %\": the "
        "achieved reductions (MACs counted by `raykfe.count` on one 32x32 input). \"pruning s\": seconds from the base "
        "to the pruned model (statistics + eigendecomposition + plan for raykfe; importance statistics + ratio "
        "bisection for torch-pruning), training excluded; times of a reused result are those of the run that made it.",
        "\"extra epochs\": training beyond the shared budget. eigendamage-iterative: "
        f"prune.rounds={args.rounds} with prune.round_epochs={args.round_epochs} fine-tuning epochs between rounds "
        f"({(args.rounds - 1) * args.round_epochs} epochs); slimming: sparsity.epochs={args.sparsity_epochs} epochs "
        "of L1 sparsity training on the BatchNorm scales before pruning (its \"before FT\" is after that training).",
        "sosp-i: stats.max_batches=1 (one batch of 128 train examples): its statistics cost one Jacobian-vector "
        "product per channel per example. Every other raykfe method uses the whole train split for its statistics.",
        "raykfe rows: `run_job` on `jobs/digits.yaml` with `model.weights=<cached base>`, the job's other settings "
        "unchanged (true Fisher, patch-mode K-FAC for EigenDamage, prune.max_layer_ratio 0.95).",
        f"torch-pruning {tp.__version__} rows: `tp.pruner.BasePruner` (MetaPruner is its alias), global_pruning=True, "
        "fc in ignored_layers, importances with their default group reduction and normalizer (mean, mean); the global "
        f"channel ratio is bisected until the MACs reduction lies in [F, F + {TOLERANCE:g}]. No per-layer cap: "
        "torch-pruning skips a group whose channels would all go. Magnitude: `GroupMagnitudeImportance(p="
        f"{MAGNITUDE_P})` (group L2 norm, tp's default).",
        "tp Taylor: `GroupTaylorImportance` on the mean cross-entropy gradient (true labels) over the whole train "
        "split in batches of 128 (raykfe's statistics batches), model in eval mode.",
        f"tp GroupHessian: the mean of squared per-example gradients (true labels, eval mode) over the first "
        f"{args.hessian_examples} train examples, one example per backward as documented (run on 1 torch thread: batch-of-one passes were ~20x slower on 2 threads of this shared machine). Accumulated by parameter "
        "name instead of `accumulate_grad`, which in torch-pruning 1.6 keeps only the last example (it checks "
        "`name not in self._accu_grad` on a dict keyed by parameter); the importance then reads it from `param.grad`.",
        "The torch-pruning models are fine-tuned with `raykfe.finetune.train` and the pipeline's settings, loader and "
        "shuffling seed (seed + 1), after `seed_everything(seed)`, and evaluated on the same test split.",
        "A cell \"failed: ...\" is a method that raised at that target; the other cells still ran.",
        f"{n_test} test images: one image is {100 / n_test:.2f} points.",
    ]
    table = format_table(headers, rows, markdown=True)
    text = title + "\n\n" + table + "\n\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.md").write_text(text)
    log(f"table written to {args.out / 'methods.md'}")


if __name__ == "__main__":
    main()
