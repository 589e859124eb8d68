"""All-reduce of K-FAC statistics across Train workers (torch.distributed: gloo on CPU, NCCL on GPU).

Only SUMS and counts travel (never averages of per-worker means). A factor is symmetric, so only
its upper triangle ``n(n+1)/2`` goes on the wire; the triangles of all layers are packed into
float64 buckets of at most ``bucket_bytes`` (one all-reduce each), then unpacked and mirrored.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist

from ..factors import LayerStats

__all__ = ["allreduce_stats", "allreduce_tensors", "gather_columns", "pack_triangles", "unpack_triangles", "GATHER"]

#: a statistic's key with this prefix is gathered (its columns concatenated over ranks), not summed
GATHER = "cat::"


def pack_triangles(stats: Mapping[str, LayerStats]) -> tuple[torch.Tensor, list]:
    """One flat float64 vector of every factor's upper triangle, then the counts; and its layout."""
    parts, layout = [], []
    for name, st in stats.items():
        for key in ("A_sum", "S_sum"):
            m = getattr(st, key)
            iu = torch.triu_indices(m.shape[0], m.shape[0], device=m.device)
            parts.append(m[iu[0], iu[1]].to(torch.float64))
            layout.append((name, key, m.shape[0]))
    parts.append(torch.tensor([float(st.count) for st in stats.values()], dtype=torch.float64,
                              device=parts[0].device if parts else "cpu"))
    return torch.cat(parts), layout


def unpack_triangles(flat: torch.Tensor, layout: list, stats: Mapping[str, LayerStats]) -> None:
    offset = 0
    for name, key, n in layout:
        size = n * (n + 1) // 2
        iu = torch.triu_indices(n, n, device=flat.device)
        m = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
        m[iu[0], iu[1]] = flat[offset:offset + size]
        m = m + m.T - torch.diag(m.diagonal())
        setattr(stats[name], key, m.to(getattr(stats[name], key).device))
        offset += size
    for st, c in zip(stats.values(), flat[offset:].tolist()):
        st.count = int(round(c))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _allreduce_flat(flat: torch.Tensor, bucket_bytes: int, device) -> torch.Tensor:
    """Sum one float64 vector over all ranks, in buckets of at most ``bucket_bytes``; on the CPU."""
    if device is not None:
        flat = flat.to(device)
    step = max(1, bucket_bytes // 8)
    for start in range(0, flat.numel(), step):
        bucket = flat[start:start + step].clone()
        dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
        flat[start:start + step] = bucket
    return flat.cpu()


def allreduce_stats(stats: Mapping[str, LayerStats], *, bucket_bytes: int = 64 << 20, device=None) -> None:
    """Sum ``stats`` over all ranks of the default process group, in place."""
    if not _distributed():
        return
    flat, layout = pack_triangles(stats)
    unpack_triangles(_allreduce_flat(flat, bucket_bytes, device), layout, stats)


def allreduce_tensors(tensors: dict[str, torch.Tensor], *, bucket_bytes: int = 64 << 20, device=None) -> dict[str, torch.Tensor]:
    """Sum a dict of tensors (sums and counts, any shapes) over all ranks; returns float64 copies
    shaped as given (the count entries come back as float64 too: round them)."""
    gathered = {n: gather_columns(t, device=device) for n, t in tensors.items() if n.startswith(GATHER)}
    tensors = {n: t for n, t in tensors.items() if not n.startswith(GATHER)}
    if not _distributed():
        return {**tensors, **gathered}
    names = list(tensors)
    flat = _allreduce_flat(torch.cat([tensors[n].detach().reshape(-1).to(torch.float64).cpu() for n in names]), bucket_bytes, device)
    out, offset = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype if t.is_floating_point() else torch.float64)
        offset += t.numel()
    return {**out, **gathered}


def gather_columns(t: torch.Tensor, *, device=None) -> torch.Tensor:
    """``[rows, cols_r]`` of every rank concatenated along the columns, in rank order (float64, CPU).

    Ranks may hold different numbers of columns: each is padded to the widest and the padding
    dropped after the all-gather (gloo and NCCL gather equal shapes only)."""
    t = t.detach().to(torch.float64)
    if not _distributed():
        return t.cpu()
    if device is not None:
        t = t.to(device)
    t = t.contiguous()
    widths = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(widths, torch.tensor([t.shape[1]], dtype=torch.int64, device=t.device))
    widest = int(max(w.item() for w in widths))
    padded = torch.zeros(t.shape[0], widest, dtype=t.dtype, device=t.device)
    padded[:, : t.shape[1]] = t
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, : int(w.item())] for p, w in zip(parts, widths)], dim=1).cpu()
