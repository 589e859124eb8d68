"""Exhaustive checks of a prefix-of-sorted-scores selection rule (plan.select, ChannelGraph.select).

The rule: sort the eligible units by score and remove the k lowest, k the smallest count whose
reduction meets the target. With ``n`` eligible units (``n`` small), every subset is a bitmask
``m`` in ``[0, 2**n)`` (bit ``u`` set: unit ``u`` removed) and the caller supplies ``red[m]``, the
reduction of the target's metric when exactly those units go, computed independently of the code
under test. :func:`check_prefix_rule` then asserts, exhaustively:

(a) the chosen set meets the target: ``red[chosen] >= target``;
(b) it is the prefix of the score order of its size k, and no shorter prefix meets the target;
(c) optimality, in the sense the rule actually has. The k lowest scores trivially have the lowest
    TOTAL score among all subsets of size k (meeting the target or not). The rule does NOT
    minimise the total score over all subsets meeting the target (that is a knapsack problem: a
    unit that saves more cost can be worth a higher score). What it does give, whenever the
    reduction is monotone under inclusion (removing more units never makes the model larger,
    checked here on every subset and every added unit), is a minimal THRESHOLD: no subset meeting
    the target has a smaller largest score, and every subset meeting the target with the same
    largest score is contained in the chosen one. (Proof: a subset S meeting the target with
    largest score s lies in the prefix P(s) of all units scored <= s, which meets the target by
    monotonicity, so P(s) contains the smallest meeting prefix, the chosen one.)
"""

from __future__ import annotations

import numpy as np


def all_subsets(n: int) -> np.ndarray:
    """``[2**n, n]`` bool: row m has bit u of m in column u."""
    m = np.arange(1 << n, dtype=np.int64)
    return ((m[:, None] >> np.arange(n)) & 1).astype(bool)


def mask_of(units) -> int:
    return int(sum(1 << int(u) for u in units))


def check_prefix_rule(scores: np.ndarray, red: np.ndarray, chosen: int, target: float, what: str = "") -> int:
    """Assert (a)-(c) of the module docstring for the bitmask ``chosen``; return its size k.

    ``scores`` ``[n]`` distinct unit scores, ``red`` ``[2**n]`` reductions by subset bitmask."""
    n = scores.size
    assert np.unique(scores).size == n, f"{what}: the oracle needs distinct scores"
    assert red.shape == (1 << n,)
    subsets = all_subsets(n)
    # monotone under inclusion: adding any unit to any subset never lowers the reduction
    for u in range(n):
        without = np.nonzero(~subsets[:, u])[0]
        drop = red[without] - red[without | (1 << u)]
        assert (drop <= 0).all(), f"{what}: adding unit {u} lowers the reduction by {drop.max():.3g}: cost not monotone"
    order = np.argsort(scores)
    prefix = [mask_of(order[:j]) for j in range(n + 1)]
    k = bin(chosen).count("1")
    # (a)
    assert red[chosen] >= target, f"{what}: chosen reduction {red[chosen]:.6f} < target {target:.6f}"
    # (b)
    assert chosen == prefix[k], f"{what}: the {k} removed units are not the {k} lowest-scored eligible ones"
    shorter = [j for j in range(k) if red[prefix[j]] >= target]
    assert not shorter, f"{what}: the prefix of {shorter[0]} units already meets {target:.6f} ({red[prefix[shorter[0]]]:.6f}), chose {k}"
    # (c) lowest total among size-k subsets; minimal largest score among all subsets meeting the target
    total = subsets @ scores
    sizes = subsets.sum(axis=1)
    meets = red >= target
    assert total[sizes == k].min() >= total[chosen] - 1e-12 * abs(total[chosen]), f"{what}: a size-{k} subset has a lower total score"
    largest = np.where(subsets, scores[None, :], -np.inf).max(axis=1)
    assert largest[meets].min() == largest[chosen], (
        f"{what}: a subset meeting the target has largest score {largest[meets].min():.6g} < {largest[chosen]:.6g}"
    )
    ties = np.nonzero(meets & (largest == largest[chosen]))[0]
    assert all((int(m) & ~chosen) == 0 for m in ties), f"{what}: a subset at the same threshold is not inside the chosen one"
    return k
