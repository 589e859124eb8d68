"""Row sums of ``|Q|`` for ``Q = V V^T`` in blocks, never holding ``Q`` whole (SOSP-I at scale).

SOSP-I's saliency needs, per structure ``s``, ``Q_ss`` and ``sum_s' |Q_ss'|`` (:mod:`.sosp`). With
``S`` structures ``Q`` is ``S x S`` (26,000 structures: 5.4 GB in float64); its factor ``V`` is
``S x D`` with ``D <= S`` (:class:`raykfe.methods.sosp.SospIStats`). Here the rows of ``V`` are
cut into ``B`` blocks of ``block`` structures and every block pair ``I <= J`` gives
``Q_IJ = V_I V_J^T`` (``block^2`` numbers at a time): its absolute row sums go to the rows of ``I``
and its column sums to the rows of ``J``. Only ``O(S)`` numbers are kept.

Blocks pairs are independent: with Ray connected they are tasks on the cluster's CPUs (``V`` put
once in the object store), their partial sums added in the driver; otherwise they run in this
process.

A budget ``max_pairs`` below the ``B (B + 1) / 2`` pairs samples them: the ``B`` diagonal pairs
always (they hold ``Q_ss``), every off-diagonal pair independently with probability
``pi = (max_pairs - B) / (B (B - 1) / 2)`` (Poisson sampling), its contribution weighted by
``1 / pi``. That is unbiased for every row sum; its variance ``sum_J c_sJ^2 (1 - pi) / pi`` (``c_sJ``:
the row's sum over pair ``J``) is estimated without bias by ``sum_{J sampled} c_sJ^2 (1 - pi) / pi^2``,
whose square root is the reported standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["GramRows", "block_pairs", "gram_abs_rows"]


@dataclass(frozen=True)
class GramRows:
    """``rows[s] ~= sum_s' |Q_ss'|`` (exact when every pair ran), ``diag[s] = Q_ss`` (always exact),
    ``stderr[s]`` (0 when exact), and how many of the block pairs ran."""

    rows: np.ndarray
    diag: np.ndarray
    stderr: np.ndarray
    pairs: int
    total_pairs: int
    blocks: int
    block: int

    @property
    def exact(self) -> bool:
        return self.pairs == self.total_pairs

    def relative_error(self) -> float:
        """The median over structures of ``stderr / rows`` (0 when exact)."""
        if self.exact:
            return 0.0
        off = self.rows - np.abs(self.diag)
        ok = off > 0
        return float(np.median(self.stderr[ok] / off[ok])) if ok.any() else 0.0


def block_pairs(S: int, block: int, max_pairs: int | None = None, seed: int = 0) -> tuple[list[tuple[int, int, float]], int, int]:
    """``([(I, J, pi)], blocks, total pairs)``: the block pairs ``I <= J`` to compute, each with its
    inclusion probability (1 for the diagonal, and for all pairs when the budget allows)."""
    if block < 1:
        raise ConfigError(f"sosp.block={block} must be >= 1 (structures per block of Q)")
    B = max(1, math.ceil(S / block))
    total = B * (B + 1) // 2
    if max_pairs is None or max_pairs >= total:
        return [(i, j, 1.0) for i in range(B) for j in range(i, B)], B, total
    if max_pairs < B:
        raise ConfigError(
            f"sosp.max_pairs={max_pairs} is below the {B} diagonal blocks of Q ({S} structures in blocks of {block}): "
            f"use at least {B}, or a larger sosp.block"
        )
    off = B * (B - 1) // 2
    pi = (max_pairs - B) / off
    rng = np.random.default_rng(seed)
    pairs = [(i, i, 1.0) for i in range(B)]
    for i in range(B):
        take = rng.random(B - i - 1) < pi
        pairs += [(i, j, pi) for j, t in zip(range(i + 1, B), take) if t]
    return pairs, B, total


def _pair_sums(v: torch.Tensor, pairs: list[tuple[int, int, float]], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted absolute row sums and variance terms of the given block pairs: two ``[S]`` float64."""
    S = v.shape[0]
    rows = torch.zeros(S, dtype=torch.float64)
    var = torch.zeros(S, dtype=torch.float64)
    for i, j, pi in pairs:
        a, b = slice(i * block, min(S, (i + 1) * block)), slice(j * block, min(S, (j + 1) * block))
        q = (v[a] @ v[b].T).abs_()
        r = q.sum(dim=1)
        rows[a] += r / pi
        if pi < 1.0:
            var[a] += r.square() * ((1 - pi) / pi**2)
        if i != j:
            c = q.sum(dim=0)
            rows[b] += c / pi
            if pi < 1.0:
                var[b] += c.square() * ((1 - pi) / pi**2)
    return rows, var


def _remote_pair_sums(v_ref, pairs, block):
    return _pair_sums(v_ref, pairs, block)


def gram_abs_rows(v: torch.Tensor, *, block: int = 2048, max_pairs: int | None = None, seed: int = 0,
                  workers: int | None = None) -> GramRows:
    """Row sums of ``|V V^T|`` in ``block x block`` pieces (module docstring).

    ``workers``: Ray tasks to spread the pairs over (``None``: the connected cluster's CPUs when Ray
    is initialised, else 1 = this process).
    """
    v = v.detach().to(torch.float64).cpu().contiguous()
    S = v.shape[0]
    pairs, B, total = block_pairs(S, block, max_pairs, seed)
    if workers is None:
        workers = _ray_cpus()
    workers = max(1, min(int(workers), len(pairs)))
    if workers == 1:
        rows, var = _pair_sums(v, pairs, block)
    else:
        import ray

        task = ray.remote(num_cpus=1)(_remote_pair_sums)
        ref = ray.put(v)
        cost = lambda p: 1 if p[0] == p[1] else 2  # noqa: E731  (an off-diagonal pair is a full block product)
        chunks: list[list] = [[] for _ in range(workers)]
        loads = [0] * workers
        for p in sorted(pairs, key=cost, reverse=True):  # greedy balance
            k = loads.index(min(loads))
            chunks[k].append(p)
            loads[k] += cost(p)
        parts = ray.get([task.remote(ref, c, block) for c in chunks if c])
        rows = sum(p[0] for p in parts)
        var = sum(p[1] for p in parts)
    diag = v.square().sum(dim=1)
    return GramRows(rows.numpy(), diag.numpy(), var.clamp_min(0).sqrt().numpy(), len(pairs), total, B, block)


def _ray_cpus() -> int:
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # noqa: BLE001  (no Ray, or a cluster that went away: run here)
        pass
    return 1
