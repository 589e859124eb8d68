"""K-FAC statistics kept as (sum, count) so that shards merge associatively.

For one prunable layer (layout in :mod:`raykfe.layers`):

* ``A_sum = sum_n (1/T_n) sum_t a~_{n,t} a~_{n,t}^T``   ``[d_in, d_in]`` (patch mode also ``/k^2``,
  summing over kernel offsets), float64;
* ``S_sum = sum_n sum_t Ds_{n,t} Ds_{n,t}^T``             ``[d_out, d_out]``, float64;
* ``count = N``, the number of examples seen.

The mean factors are ``A = A_sum / count`` and ``S = S_sum / count``, and ``F_layer ~= S (x) A``.
Merging adds sums and counts (never averages of per-shard means), so
``merge(stats(shard_1), ..., stats(shard_k)) == stats(concatenated shards)`` up to float rounding.

That holds for the true Fisher only when every example keeps its own label draw, i.e. its global
index (:mod:`raykfe.capture`). Statistics collected with implicit indices (batches without a third
element: ``first_index`` + the position in the stream) record them in ``meta["index_ranges"]``
(sorted, disjoint ``[start, stop)`` pairs), and merging refuses shards whose ranges overlap: they
would reuse the same label draws. Statistics from ``(x, y, idx)`` batches have no such entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .errors import ConfigError

__all__ = ["LayerStats", "merge_stats", "stats_to_tensors", "stats_from_tensors", "merge_index_ranges"]

#: the ``meta`` key of the implicit example indices a shard covers (see the module docstring)
INDEX_RANGES = "index_ranges"


def merge_index_ranges(a: list | None, b: list | None) -> list | None:
    """The union of two shards' implicit ``[start, stop)`` index ranges; a one-line ConfigError when
    they overlap (the shards drew the same labels). ``None`` (explicit indices) merges with anything."""
    if not a or not b:
        return [list(r) for r in (a or b)] if (a or b) else None
    out: list[list[int]] = []
    for start, stop in sorted([list(map(int, r)) for r in [*a, *b]]):
        if out and start < out[-1][1]:
            raise ConfigError(
                f"cannot merge statistics shards that both cover the implicit example indices "
                f"[{start}, {min(stop, out[-1][1])}): they reuse the same sampled labels; pass (x, y, idx) "
                "batches with global example indices, or collect each shard with first_index= its offset"
            )
        if out and start == out[-1][1]:
            out[-1][1] = stop
        else:
            out.append([start, stop])
    return out


@dataclass
class LayerStats:
    """The K-FAC statistics of one layer. ``meta`` holds the layer's geometry (JSON-able) and, for
    implicit example indices, the ``"index_ranges"`` covered (module docstring)."""

    A_sum: torch.Tensor
    S_sum: torch.Tensor
    count: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def A(self) -> torch.Tensor:
        """Mean input factor ``E[a~ a~^T]`` (float64)."""
        return self.A_sum / max(self.count, 1)

    @property
    def S(self) -> torch.Tensor:
        """Mean output-gradient factor ``E[sum_t Ds Ds^T]`` (float64)."""
        return self.S_sum / max(self.count, 1)

    def add_batch(self, a_sum: torch.Tensor | None, s_sum: torch.Tensor | None, n: int) -> None:
        if a_sum is not None:
            self.A_sum += a_sum.to(self.A_sum.device, torch.float64)
        if s_sum is not None:
            self.S_sum += s_sum.to(self.S_sum.device, torch.float64)
        self.count += n

    def merge(self, other: "LayerStats") -> "LayerStats":
        if self.A_sum.shape != other.A_sum.shape or self.S_sum.shape != other.S_sum.shape:
            raise ValueError(
                f"cannot merge statistics of shapes A{tuple(self.A_sum.shape)}/S{tuple(self.S_sum.shape)}"
                f" and A{tuple(other.A_sum.shape)}/S{tuple(other.S_sum.shape)}: different layers or conv_mode"
            )
        meta = dict(self.meta)
        ranges = merge_index_ranges(self.meta.get(INDEX_RANGES), other.meta.get(INDEX_RANGES))
        meta.pop(INDEX_RANGES, None)
        if ranges is not None:
            meta[INDEX_RANGES] = ranges
        return LayerStats(self.A_sum + other.A_sum, self.S_sum + other.S_sum, self.count + other.count, meta)

    @classmethod
    def zeros(cls, d_in: int, d_out: int, meta: dict | None = None, device=None) -> "LayerStats":
        return cls(
            torch.zeros(d_in, d_in, dtype=torch.float64, device=device),
            torch.zeros(d_out, d_out, dtype=torch.float64, device=device),
            0,
            dict(meta or {}),
        )


def merge_stats(shards: Iterable[Mapping[str, LayerStats]]) -> dict[str, LayerStats]:
    """Merge per-shard statistics (same layers in every shard) into one mapping; shards with
    overlapping implicit example indices are refused (:func:`merge_index_ranges`)."""
    out: dict[str, LayerStats] = {}
    for shard in shards:
        for name, st in shard.items():
            out[name] = st if name not in out else out[name].merge(st)
    return out


def stats_to_tensors(stats: Mapping[str, LayerStats]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten to (tensors for safetensors, JSON metadata) for storage."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for name, st in stats.items():
        tensors[f"{name}::A_sum"] = st.A_sum.detach().cpu().contiguous()
        tensors[f"{name}::S_sum"] = st.S_sum.detach().cpu().contiguous()
        meta[name] = {"count": st.count, "meta": st.meta}
    return tensors, meta


def stats_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict[str, LayerStats]:
    return {
        name: LayerStats(tensors[f"{name}::A_sum"], tensors[f"{name}::S_sum"], int(m["count"]), dict(m["meta"]))
        for name, m in meta.items()
    }
