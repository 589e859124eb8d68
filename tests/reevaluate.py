"""Re-evaluating a saved model: the accuracy a job reports must be the saved model's."""

from __future__ import annotations

import torch

from raykfe.data import make_loader


@torch.no_grad()
def assert_accuracy_of(model, reported: float, split) -> None:
    """``reported`` is ``model``'s accuracy on ``split``: the same number of correct examples, up to
    the examples whose top-2 logits are so close (1e-4 relative) that another summation order
    (another thread count or BLAS) could flip them."""
    model.eval()
    correct = seen = ties = 0
    for x, y in make_loader(split, 256, shuffle=False):
        logits = model(x)
        top2 = logits.topk(2, dim=1).values
        correct += int((logits.argmax(dim=1) == y).sum())
        ties += int(((top2[:, 0] - top2[:, 1]) <= 1e-4 * top2.abs().max(dim=1).values).sum())
        seen += int(y.numel())
    assert abs(reported * seen - correct) <= ties + 1e-6, f"reported accuracy {reported} vs {correct}/{seen} re-evaluated ({ties} near ties)"
