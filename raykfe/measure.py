"""Statistics of the parameter-coordinate methods, as flat tensor dicts of SUMS (plus ``count``).

One function, :func:`measure`, runs in the driver (in-process backend) or on every Ray Train worker
over its shard; because every entry is a sum over examples, the workers' dicts are all-reduced by
plain summation (:func:`raykfe.distributed.collective.allreduce_tensors`) and the result equals
the single-process one. ``kind``:

* ``diag-fisher`` -- :func:`raykfe.methods.obs.collect_diag_fisher` (C-OBD) of ``spec["layers"]``;
* ``sosp-h`` -- :func:`raykfe.methods.sosp.sosp_h_stats`: gradient sum and ONE Gauss-Newton-vector
  product per batch, for the structures of ``spec["owner"]``;
* ``sosp-i`` -- :func:`raykfe.methods.sosp.sosp_i_stats`: the pairwise products of all structures.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["MEASURES", "measure", "owner_from_lists", "owner_to_lists"]

MEASURES = ("diag-fisher", "sosp-h", "sosp-i")


def owner_to_lists(owner: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: [int(i) for i in v.tolist()] for k, v in owner.items()}


def owner_from_lists(owner: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.long) for k, v in owner.items()}


def measure(
    kind: str,
    model: nn.Module,
    batches: Iterable,
    spec: dict,
    *,
    fisher: str = "true",
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``kind`` statistics of ``model`` over ``batches`` as a flat dict of sums (see module doc)."""
    if kind == "diag-fisher":
        from .methods.obs import collect_diag_fisher

        return collect_diag_fisher(
            model, batches, layers=spec["layers"], fisher=fisher, seed=seed, max_batches=max_batches, progress=progress
        ).to_tensors()
    if kind == "sosp-h":
        from .methods.sosp import sosp_h_stats

        return sosp_h_stats(model, batches, owner_from_lists(spec["owner"]), max_batches=max_batches, progress=progress).to_tensors()
    if kind == "sosp-i":
        from .methods.sosp import sosp_i_stats

        return sosp_i_stats(
            model, batches, owner_from_lists(spec["owner"]), spec["n_structures"], max_batches=max_batches, progress=progress
        ).to_tensors()
    raise ConfigError(f"statistics kind {kind!r} is not known: use one of {', '.join(MEASURES)}")
