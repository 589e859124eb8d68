"""Training and evaluation in plain PyTorch (SGD + momentum, step or cosine rate, cross-entropy).

Tensor layouts
--------------
Loaders yield ``(x, y)`` batches with ``x`` float32 ``[B, C, H, W]`` and ``y`` int64 ``[B]``;
the model maps ``x`` to logits float32 ``[B, num_classes]``.

Epochs are numbered from 1 in the records and messages. The rate is set at every batch from the
training progress (:func:`lr_factor`): with the ``"step"`` schedule, the rate of epoch ``e``
(1-based) is ``lr * gamma ** k`` where ``k`` counts the milestones ``m <= e - 1`` (milestones are
``floor(f * epochs + 0.5)`` for each fraction ``f`` in ``TrainSettings.milestones``); with
``"cosine"`` it falls from ``lr`` to 0 over the epochs; an optional linear warm-up comes first.
The rotations of pruned KFE layers may train at their own rate (``rotation_lr`` x ``lr``).

Mode handling: :func:`train` leaves the model in train mode (validation inside it switches to
eval and back); :func:`evaluate` leaves it in eval mode.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from raykfe.errors import ConfigError, DataError, NumericalError

__all__ = ["TrainSettings", "train", "evaluate", "milestone_epochs", "run_training", "seed_everything", "state_of"]


@dataclass(frozen=True)
class TrainSettings:
    """Fine-tuning hyper-parameters.

    ``milestones`` are fractions of ``epochs`` at which the LR is multiplied by ``gamma``.
    ``batch_size`` is for the caller building the loaders (``train`` takes ready loaders).
    """

    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    batch_size: int = 64
    bn_l1: float = 0.0  # network slimming: L1 penalty on every BatchNorm scale (sparsity training)
    schedule: str = "step"  # "step": gamma at each milestone; "cosine": 1 -> 0 after the warm-up
    warmup_epochs: float = 0.0  # linear warm-up of the rate over the first epochs (fractions allowed)
    rotation_lr: float = 1.0  # the KFE rotations' rate, relative to lr (0 < x)

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, want: str) -> ConfigError:
            return ConfigError(f"finetune.{key} must be {want}, got {value!r}")

        def number(v: Any) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise bad("epochs", self.epochs, "a non-negative integer")
        if not number(self.lr) or self.lr <= 0:
            raise bad("lr", self.lr, "a positive number")
        if not number(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", self.momentum, "a number in [0, 1)")
        if not number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, "a non-negative number")
        if not number(self.bn_l1) or self.bn_l1 < 0:
            raise bad("bn_l1", self.bn_l1, "a non-negative number")
        if not number(self.gamma) or self.gamma <= 0:
            raise bad("gamma", self.gamma, "a positive number")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise bad("batch_size", self.batch_size, "a positive integer")
        if self.schedule not in ("step", "cosine"):
            raise bad("schedule", self.schedule, "'step' or 'cosine'")
        if not number(self.warmup_epochs) or self.warmup_epochs < 0:
            raise bad("warmup_epochs", self.warmup_epochs, "a non-negative number of epochs")
        if not number(self.rotation_lr) or self.rotation_lr <= 0:
            raise bad("rotation_lr", self.rotation_lr, "a positive multiple of the learning rate")
        ms = self.milestones
        if not isinstance(ms, (tuple, list)) or not all(number(f) and 0 <= f <= 1 for f in ms):
            raise bad("milestones", ms, "a list of fractions in [0, 1]")
        object.__setattr__(self, "milestones", tuple(float(f) for f in ms))


def milestone_epochs(settings: TrainSettings) -> list[int]:
    """Milestone fractions turned into epoch counts (sorted, unique, within ``1..epochs-1``)."""
    out = {int(math.floor(f * settings.epochs + 0.5)) for f in settings.milestones}
    return sorted(m for m in out if 1 <= m < settings.epochs)


#: the training stages of a job: (what the message calls it, the config key of its learning rate)
_STAGES = {"base": ("base training", "base.lr"), "sparsity": ("sparsity training", "sparsity.lr"),
           "finetune": ("fine-tuning", "finetune.lr")}


def _diverged(desc: str, epoch: int, what: str, settings: "TrainSettings", checkpointed: bool) -> NumericalError:
    """The one-line error of a diverged training stage: which stage, which epoch, the fix, and what is kept.

    Raised before the epoch's checkpoint is written, so the stage's newest checkpoint stays the last
    finite epoch's (a re-run resumes from it)."""
    stage, _, rnd = desc.partition("-")
    name, key = _STAGES.get(stage, ("training" if desc == "train" else f"training ({desc})", "lr"))
    if rnd:
        name += f" ({rnd.replace('round', 'round ')})"
    kept = ""
    if checkpointed:
        kept = (f"; the checkpoint of epoch {epoch - 1}, the last finite one, is kept" if epoch > 1
                else "; no epoch finished, so no checkpoint of this stage was written")
    return NumericalError(f"{name} diverged at epoch {epoch} ({what}): lower the learning rate ({key}={settings.lr:g}){kept}")


def _first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer holding NaN/Inf, else None."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name.removeprefix("module.")
    return None


def _batches(
    loader: Iterable, device: torch.device
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device), y.to(device)


def lr_factor(settings: TrainSettings, progress: float) -> float:
    """The learning rate's multiplier at ``progress`` epochs into training (a float: epoch e, batch
    i of n is ``e - 1 + i / n``): a linear warm-up over the first ``warmup_epochs`` (from
    1/(1 + warmup batches) of the rate, never 0), then ``gamma`` at each milestone (``"step"``) or a
    cosine from 1 to 0 over the rest (``"cosine"``)."""
    w = settings.warmup_epochs
    if w > 0 and progress < w:
        return max(progress / w, 1e-3)
    if settings.schedule == "cosine":
        span = max(settings.epochs - w, 1e-12)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress - w, 0.0) / span, 1.0)))
    return settings.gamma ** sum(1 for m in milestone_epochs(settings) if m <= int(progress))


def _param_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """SGD parameter groups: the rotations of pruned KFE layers at ``rotation_lr`` x the rate, the
    rest at the rate (one group when they are equal)."""
    from .surgery import rotations as rotations_of

    rotations = {id(p) for m in model.modules() for sub in rotations_of(m) for p in sub.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters: unfreeze some before training")
    rot = [p for p in params if id(p) in rotations]
    if settings.rotation_lr == 1.0 or not rot:
        return [{"params": params, "scale": 1.0}]
    return [{"params": [p for p in params if id(p) not in rotations], "scale": 1.0},
            {"params": rot, "scale": settings.rotation_lr}]


def train(
    model: nn.Module,
    train_loader: Iterable,
    settings: TrainSettings,
    *,
    val_loader: Iterable | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "train",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    before_epoch: Callable[[int], None] | None = None,
    checkpoint: Callable[[int, nn.Module, torch.optim.Optimizer, list[dict[str, Any]]], None] | None = None,
    history: list[dict[str, Any]] | None = None,
    eval_module: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with SGD; returns one record per epoch. (Long: the epoch loop keeps
    its resume, divergence, validation and checkpoint rules in their order, in one place.)

    The rate of every batch is ``lr * lr_factor(...)`` (:func:`lr_factor`; KFE rotations times
    ``rotation_lr``), so a resumed run (``start_epoch`` epochs done, ``history`` their records,
    ``optimizer_state`` the momentum) continues exactly where it stopped. ``before_epoch(epoch)``
    runs before each epoch (e.g. to reshuffle a shard) and ``checkpoint(epoch, model, optimizer,
    records)`` after it. ``eval_module`` is validated instead of ``model`` (the plain module inside
    a DDP wrapper).

    Each record is ``{"epoch": int (1-based), "loss": float (mean train loss), "train_acc": float,
    "val_acc": float | None, "lr": float (the rate at the epoch's first batch)}``; ``on_epoch`` is
    called with it after each epoch.

    Raises:
        NumericalError: the training loss or, at the end of an epoch, a weight became NaN/Inf (the
            message names the stage ``desc``, the epoch and the fix; that epoch is not checkpointed).
        DataError: the train loader yielded no batch.
    """
    from tqdm import tqdm

    device = torch.device(device)
    model.to(device)
    groups = _param_groups(model, settings)
    optimizer = torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    if optimizer_state is not None:  # resuming: the momentum buffers (the rate follows from the epoch)
        optimizer.load_state_dict(optimizer_state)
        for group, mine in zip(optimizer.param_groups, groups):
            group["scale"] = mine["scale"]
    records: list[dict[str, Any]] = list(history or [])
    model.train()
    bar = tqdm(range(start_epoch + 1, settings.epochs + 1), desc=desc, disable=None if progress else True, leave=False,  # bars on a terminal only
               initial=start_epoch, total=settings.epochs)
    for epoch in bar:
        if before_epoch is not None:
            before_epoch(epoch)
        record = _epoch(model, train_loader, optimizer, settings, epoch, device, desc, checkpoint is not None)
        bad = _first_non_finite(model)
        if bad is not None:  # finite losses, but the last steps left NaN/Inf weights: never checkpoint them
            raise _diverged(desc, epoch, f"{bad} became NaN/Inf", settings, checkpoint is not None)
        if val_loader is not None:
            record["val_acc"] = evaluate(eval_module or model, val_loader, device=device)["accuracy"]
            model.train()
        records.append(record)
        bar.set_postfix({"loss": f"{record['loss']:.4f}", **({"val_acc": f"{record['val_acc']:.4f}"} if val_loader else {})})
        if progress and bar.disable:  # not a terminal (a log file): a plain line per epoch instead of the bar
            val = f" val_acc {record['val_acc']:.4f}" if val_loader is not None else ""
            print(f"[{desc}] epoch {epoch}/{settings.epochs} loss {record['loss']:.4f}{val} lr {record['lr']:.3g}",
                  file=sys.stderr, flush=True)
        if checkpoint is not None:
            checkpoint(epoch, model, optimizer, records)
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    return records


def _epoch(model, loader, optimizer, settings: TrainSettings, epoch: int, device, desc: str, checkpointed: bool) -> dict:
    """One epoch of SGD with the rate of each batch set from :func:`lr_factor`."""
    bn_scales = [
        m.weight for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
    ] if settings.bn_l1 > 0 else []
    n = len(loader) if hasattr(loader, "__len__") else 0
    loss_sum, correct, seen, first_lr = 0.0, 0, 0, None
    for i, (x, y) in enumerate(_batches(loader, device)):
        factor = lr_factor(settings, epoch - 1 + (i / n if n else 0.0))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * factor * group.get("scale", 1.0)
        first_lr = settings.lr * factor if first_lr is None else first_lr
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise _diverged(desc, epoch, f"loss {loss.item()}", settings, checkpointed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for g in bn_scales:  # subgradient of bn_l1 * |gamma| (Liu et al. 2017, network slimming)
            if g.grad is not None:
                g.grad.add_(torch.sign(g.detach()), alpha=settings.bn_l1)
        optimizer.step()
        k = int(y.numel())
        loss_sum += float(loss.detach()) * k
        correct += int((logits.detach().argmax(dim=1) == y).sum())
        seen += k
    if seen == 0:
        raise DataError("the training loader yielded no batches: check the train split size")
    return {"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen, "val_acc": None, "lr": first_lr}


def evaluate(
    model: nn.Module, loader: Iterable, *, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Accuracy in [0, 1] and mean cross-entropy of ``model`` over ``loader``.

    The model is put in eval mode and left there.

    Raises:
        DataError: the loader yielded no examples.
    """
    device = torch.device(device)
    model.to(device)
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in _batches(loader, device):
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += int(y.numel())
    if seen == 0:
        raise DataError("cannot evaluate on an empty loader: check the split size")
    return {"accuracy": correct / seen, "loss": loss_sum / seen}


# ------------------------------------------------------------------------------------------------
# a training stage of a job: checkpointed every epoch, resumed from the newest checkpoint
# ------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state_dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_training(
    model: nn.Module,
    train_loader,
    settings: TrainSettings,
    stage: str,
    store=None,
    *,
    val_loader=None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    chief: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    seed: int | None = None,
) -> list[dict]:
    """:func:`train` with a checkpoint per epoch under ``store`` (a :class:`raykfe.stages.StageStore`;
    written by the chief only) and a resume from the newest one. Shared by the in-process backend
    and the Ray Train workers.

    ``seed``: before epoch ``e`` torch's global RNG (augmentation, dropout) and the loader's
    shuffling generator are seeded from ``(seed, e)`` only, so an epoch run after a resume from
    the checkpoint of epoch ``e - 1`` is the same as in an uninterrupted run."""
    from .stages import optimizer_from_tensors, optimizer_to_tensors

    start, opt_state, history = 0, None, []
    ckpt = store.load_checkpoint(stage) if store is not None else None
    if ckpt is not None:
        start, tensors, meta = ckpt
        unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state = optimizer_from_tensors(tensors, meta)
        history = meta["history"]
        if start >= settings.epochs:
            return history

    def checkpoint(epoch, m, optimizer, records):
        if chief and store is not None:
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            tensors = {f"model.{k}": v for k, v in unwrap(m).state_dict().items()} | opt_tensors
            store.save_checkpoint(stage, epoch, tensors, {**opt_meta, "history": records})

    def epoch_start(epoch: int) -> None:
        if seed is not None:
            torch.manual_seed(seed * 100003 + epoch)
            gen = getattr(train_loader, "generator", None)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(seed * 100003 + epoch)
        if before_epoch is not None:
            before_epoch(epoch)

    return train(
        model, train_loader, settings, val_loader=val_loader, device=device, progress=progress, desc=stage,
        start_epoch=start, optimizer_state=opt_state, history=history, before_epoch=epoch_start,
        checkpoint=checkpoint, on_epoch=on_epoch, eval_module=unwrap(model),
    )
