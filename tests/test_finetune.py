"""Tests for raykfe.finetune: learning, LR schedule, divergence, evaluation, mode handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from raykfe.data import load_data, make_loader
from raykfe.errors import ConfigError, RaykfeError
from raykfe.finetune import TrainSettings, evaluate, milestone_epochs, train
from raykfe.models import build_model


def _linear_problem(n: int = 64, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs in 4-d; x: [n, 4], y: [n]."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 4, generator=gen) + 3.0 * (2 * y[:, None] - 1).float()
    return TensorDataset(x, y)


@pytest.mark.slow
def test_training_learns_synthetic_data() -> None:
    torch.manual_seed(0)
    splits = load_data("synthetic", synthetic_size=400, num_classes=4, image_size=16, seed=0)
    model = build_model("vgg_tiny", 4)
    test_loader = make_loader(splits.test, 64, shuffle=False)
    before = evaluate(model, test_loader)["accuracy"]
    seen: list[dict] = []
    records = train(
        model,
        make_loader(splits.train, 32, shuffle=True, seed=0),
        TrainSettings(epochs=3, lr=0.05),
        val_loader=make_loader(splits.val, 64, shuffle=False),
        progress=False,
        on_epoch=seen.append,
    )
    after = evaluate(model, test_loader)
    assert after["accuracy"] >= 0.8  # chance is 0.25
    assert after["accuracy"] > before + 0.3
    assert records == seen
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert set(records[0]) == {"epoch", "loss", "train_acc", "val_acc", "lr"}
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0 for r in records)


def test_lr_schedule_steps_at_milestones() -> None:
    loader = make_loader(_linear_problem(), 16, shuffle=True)
    settings = TrainSettings(epochs=8, lr=0.1, milestones=(0.5, 0.75), gamma=0.1)
    assert milestone_epochs(settings) == [4, 6]
    records = train(nn.Linear(4, 2), loader, settings, progress=False)
    lrs = [r["lr"] for r in records]
    want = [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    assert lrs == pytest.approx(want)
    assert all(r["val_acc"] is None for r in records)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    loader = make_loader(_linear_problem(), 16, shuffle=True)
    train(nn.Linear(4, 2), loader, TrainSettings(2, 0.1), val_loader=loader, desc="ft-test")
    err = capsys.readouterr().err
    assert "ft-test" in err and "val_acc" in err
    train(nn.Linear(4, 2), loader, TrainSettings(2, 0.1), progress=False)
    assert capsys.readouterr().err == ""


def test_milestone_rounding() -> None:
    # fractions map to round-half-up epoch indices; 0 and >= epochs never trigger
    assert milestone_epochs(TrainSettings(epochs=5, lr=0.1, milestones=(0.5, 0.7))) == [3, 4]
    assert milestone_epochs(TrainSettings(epochs=4, lr=0.1, milestones=(0.0, 1.0, 0.5))) == [2]
    assert milestone_epochs(TrainSettings(epochs=1, lr=0.1)) == []
    assert milestone_epochs(TrainSettings(epochs=10, lr=0.1, milestones=())) == []


def test_only_trainable_parameters_are_updated() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainable = model[2].weight.detach().clone()
    loader = make_loader(_linear_problem(), 16, shuffle=True)
    train(model, loader, TrainSettings(2, 0.1), progress=False)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, trainable)


def test_divergence_raises() -> None:
    torch.manual_seed(0)
    splits = load_data("synthetic", synthetic_size=64, num_classes=4, image_size=8, seed=0)
    model = build_model("vgg_tiny", 4)
    with pytest.raises(RaykfeError) as info:
        train(
            model,
            make_loader(splits.train, 16, shuffle=True),
            TrainSettings(epochs=5, lr=1e8),
            progress=False,
        )
    msg = str(info.value)
    assert "diverged at epoch" in msg and "learning rate" in msg and "\n" not in msg


def test_evaluate_matches_hand_computation() -> None:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        model.bias.zero_()
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -2.0], [1.0, 1.5], [0.5, 0.2]])
    y = torch.tensor([0, 1, 2, 0, 2])
    # logits rows: [2,0,-2] [0,3,-3] [-1,-2,3] [1,1.5,-2.5] [0.5,0.2,-0.7]
    # predictions 0, 1, 2, 1, 0 -> 3 of 5 correct
    logits = [[2, 0, -2], [0, 3, -3], [-1, -2, 3], [1, 1.5, -2.5], [0.5, 0.2, -0.7]]
    losses = [
        math.log(sum(math.exp(v) for v in row)) - row[int(t)] for row, t in zip(logits, y)
    ]
    loader = make_loader(TensorDataset(x, y), 2, shuffle=False)  # uneven last batch
    result = evaluate(model, loader)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["loss"] == pytest.approx(sum(losses) / 5, rel=1e-6)


def test_modes_are_left_tidy() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    loader = make_loader(_linear_problem(), 16, shuffle=False)
    model.eval()
    train(model, loader, TrainSettings(1, 0.01), val_loader=loader, progress=False)
    assert model.training and all(m.training for m in model.modules())
    evaluate(model, loader)
    assert not any(m.training for m in model.modules())


def test_evaluate_no_grad_and_zero_epochs() -> None:
    model = nn.Linear(4, 2)
    loader = make_loader(_linear_problem(), 16, shuffle=False)
    before = model.weight.detach().clone()
    assert train(model, loader, TrainSettings(epochs=0, lr=0.1), progress=False) == []
    assert torch.equal(model.weight, before)
    evaluate(model, loader)
    assert model.weight.grad is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": -1, "lr": 0.1},
        {"epochs": 2, "lr": 0.0},
        {"epochs": 2, "lr": float("nan")},
        {"epochs": 2, "lr": 0.1, "milestones": (1.5,)},
        {"epochs": 2, "lr": 0.1, "momentum": 1.0},
        {"epochs": 2, "lr": 0.1, "batch_size": 0},
    ],
)
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TrainSettings(**kwargs)


def test_settings_are_frozen_and_hashable() -> None:
    s = TrainSettings(epochs=2, lr=0.1, milestones=[0.5])  # type: ignore[arg-type]
    assert s.milestones == (0.5,)
    assert hash(s) == hash(TrainSettings(epochs=2, lr=0.1, milestones=(0.5,)))
    with pytest.raises(AttributeError):
        s.lr = 1.0  # type: ignore[misc]


def test_cosine_and_warmup_rates() -> None:
    from raykfe.finetune import lr_factor

    cos = TrainSettings(epochs=4, lr=0.1, schedule="cosine")
    assert lr_factor(cos, 0.0) == 1.0 and lr_factor(cos, 4.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(cos, 2.0) == pytest.approx(0.5) and lr_factor(cos, 1.0) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    warm = TrainSettings(epochs=4, lr=0.1, schedule="cosine", warmup_epochs=1.0)
    assert [lr_factor(warm, t) for t in (0.25, 0.5, 1.0)] == pytest.approx([0.25, 0.5, 1.0])
    assert lr_factor(warm, 2.5) == pytest.approx(0.5)  # the cosine spans the 3 epochs after the warm-up
    assert lr_factor(warm, 0.0) > 0.0  # a first step at rate 0 would be wasted
    step = TrainSettings(epochs=4, lr=0.1, milestones=(0.5,), gamma=0.1)
    assert [lr_factor(step, t) for t in (0.0, 1.99, 2.0, 3.5)] == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_rotations_train_at_their_own_rate_and_a_resume_continues_the_schedule() -> None:
    """With ``rotation_lr=0.1`` one SGD step (no momentum, no decay) moves the rotations of a
    pruned KFE layer by exactly a tenth of what it moves them at ``rotation_lr=1``; a run resumed
    after epoch 1 ends with the weights of an uninterrupted one (the rate follows the progress)."""
    import copy
    from collections import OrderedDict

    from raykfe.surgery import KFELinear

    torch.manual_seed(0)
    layer = KFELinear(OrderedDict(rot_in=nn.Linear(6, 3), core=nn.Linear(3, 2, bias=False), rot_out=nn.Linear(2, 4)))
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
    moved = {}
    for r in (1.0, 0.1):
        m = copy.deepcopy(net)
        train(m, data, TrainSettings(epochs=1, lr=0.5, momentum=0.0, weight_decay=0.0, rotation_lr=r), progress=False)
        moved[r] = {n: (p - q).detach() for (n, p), (_, q) in zip(m.named_parameters(), net.named_parameters())}
    for n in moved[1.0]:
        scale = 0.1 if n.startswith("0.rot_") else 1.0
        torch.testing.assert_close(moved[0.1][n], scale * moved[1.0][n], rtol=1e-5, atol=1e-7)
    settings = TrainSettings(epochs=3, lr=0.2, schedule="cosine", warmup_epochs=0.5, weight_decay=0.0)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(3)]
    whole, part = copy.deepcopy(net), copy.deepcopy(net)
    train(whole, batches, settings, progress=False)
    saved = {}
    train(part, batches, TrainSettings(**{**settings.__dict__, "epochs": 3}), progress=False,
          checkpoint=lambda e, m, opt, rec: saved.setdefault(e, (copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()), list(rec))))
    resumed = copy.deepcopy(net)
    resumed.load_state_dict(saved[1][0])
    train(resumed, batches, settings, progress=False, start_epoch=1, optimizer_state=saved[1][1], history=saved[1][2])
    for a, b in zip(resumed.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
