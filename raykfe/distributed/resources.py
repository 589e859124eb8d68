"""Fail fast when a job asks Ray for resources the cluster does not have and cannot get.

Ray queues a request it cannot place (a Train worker group asking for GPUs on a CPU-only cluster,
more workers than the cluster's CPUs) and waits forever, printing autoscaler warnings; a user sees
a hang. Before a Train run or the eigen actors start, :func:`check_job` compares what the job asks
for with what the cluster has and what its autoscaler may add:

* **What the job asks for** (:func:`job_demands`): ``ray.workers`` Train workers of
  ``{CPU: ray.cpus_per_worker, GPU: 1 if ray.use_gpu}`` (placed together: Train reserves them as one
  placement group, spread over nodes as they fit), and at least one eigendecomposition actor of
  ``{CPU: ray.actor_cpus, GPU: ray.actor_gpus}`` (the pool sizes itself to the cluster); a sweep
  adds one trial of ``{CPU: sweep.cpus_per_trial, GPU: sweep.gpus_per_trial}``. The stages run one
  after the other, so each demand is checked on its own.
* **What the cluster has**: the total resources of each alive node (``ray.nodes()``); a demand fits
  when its bundles pack onto the nodes' totals (first fit, largest bundle first). Totals, not what
  is free now: a busy cluster frees up, a missing resource never appears.
* **What it can get**: the autoscaler's per-resource maxima from its cluster config
  (:func:`autoscaler_limits`; none without an autoscaler). A demand beyond them, or any demand
  without an autoscaler, fails at once with one line naming the key to change (exit 2, nothing
  written); a demand within them waits up to ``ray.resource_wait_s`` for nodes to join, asking
  the autoscaler for them and printing a progress line, then fails the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import ConfigError

__all__ = ["Demand", "job_demands", "packs", "shortfall", "autoscaler_limits", "check_job"]

_SHOWN = ("CPU", "GPU")


@dataclass(frozen=True)
class Demand:
    """``count`` bundles of ``shape`` that must be placed together; ``what`` names them for the
    user and ``keys`` are the config keys that change them, per resource."""

    what: str
    count: int
    shape: Mapping[str, float]
    keys: Mapping[str, str]

    def describe(self) -> str:
        shape = ", ".join(f"{k}: {_num(v)}" for k, v in self.shape.items() if v > 0 or k in _SHOWN)
        return f"{self.count} {self.what} x {{{shape}}}"


def _num(v: float) -> str:
    return f"{v:g}"


def job_demands(cfg, *, sweep: bool = False) -> list[Demand]:
    """The Ray requests of a job config (:class:`raykfe.config.JobConfig`), one per stage kind:
    Train workers and eigen actors when it runs on Ray (``runtime: ray``), and a Tune trial for a
    sweep (whose trials run their jobs in-process)."""
    rc = cfg.ray
    out = [] if cfg.runtime != "ray" else [
        Demand("Train workers" if rc.workers != 1 else "Train worker", rc.workers,
               {"CPU": rc.cpus_per_worker, "GPU": 1.0 if rc.use_gpu else 0.0},
               {"CPU": "ray.workers / ray.cpus_per_worker", "GPU": "ray.use_gpu=false"}),
        Demand("eigen actor", 1, {"CPU": rc.actor_cpus, "GPU": rc.actor_gpus},
               {"CPU": "ray.actor_cpus", "GPU": "ray.actor_gpus=0"}),
    ]
    if sweep:
        out.append(Demand("sweep trial", 1, {"CPU": cfg.sweep.cpus_per_trial, "GPU": cfg.sweep.gpus_per_trial},
                          {"CPU": "sweep.cpus_per_trial", "GPU": "sweep.gpus_per_trial=0"}))
    return out


def packs(demand: Demand, nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether ``demand``'s bundles fit on the nodes' resources together (first fit; bundles are
    identical, so first fit is exact for one resource kind and a sound test for several)."""
    free = [dict(n) for n in nodes]
    need = {k: float(v) for k, v in demand.shape.items() if v > 0}
    for _ in range(demand.count):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def shortfall(demand: Demand, totals: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """``{resource: (asked in all, what totals has)}`` for each resource the totals lack."""
    out = {}
    for k, v in demand.shape.items():
        if v > 0 and demand.count * v > totals.get(k, 0.0) + 1e-9:
            out[k] = (demand.count * v, float(totals.get(k, 0.0)))
    return out


def autoscaler_limits() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may provide; ``{}`` when an autoscaler
    runs but its limits are unknown; None without an autoscaler (a fixed cluster)."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: a Ray without it is treated as reporting no config
        limits = None
    if limits is not None:
        return {k: float(v) for k, v in limits.items()}
    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # a cluster-launcher head node
        return {}
    return None


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _error(demand: Demand, nodes, limits) -> ConfigError:
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    short = shortfall(demand, totals)
    if short:
        has = ", ".join(f"{k}: {_num(h)}" for k, (_, h) in short.items())
    else:  # enough in total, but the bundles do not fit on the nodes as they are
        short = {k: v for k, v in demand.shape.items() if v > 0}
        has = ", ".join(f"{k}: {_num(max((n.get(k, 0.0) for n in nodes), default=0.0))} on its largest node"
                        for k in short)
    scaler = "no autoscaler" if limits is None else "and its autoscaler cannot add them in time"
    keys = " or ".join(dict.fromkeys(demand.keys.get(k, k) for k in short))
    return ConfigError(f"the job asks for {demand.describe()} but the cluster has {has} ({scaler}): "
                       f"change {keys}, or run on a cluster with those resources")


def _reachable(demand: Demand, limits: Mapping[str, float]) -> bool:
    """Within the autoscaler's maxima (a resource its node types lack: 0; unknown maxima: assume
    it can)."""
    if not limits:
        return True
    return not any(demand.count * v > limits.get(k, 0.0) + 1e-9 for k, v in demand.shape.items() if v > 0)


def check_job(cfg, *, sweep: bool = False, log: Callable[[str], None] = print, nodes: Callable[[], list] = _alive_nodes,
              limits: Callable[[], dict | None] = autoscaler_limits, sleep: Callable[[float], None] = time.sleep,
              poll_s: float = 5.0) -> None:
    """Raise :class:`ConfigError` (one line, the key to change) for a demand of ``cfg`` the cluster
    cannot meet; with an autoscaler, wait up to ``cfg.ray.resource_wait_s`` for it first."""
    wait_s = float(getattr(cfg.ray, "resource_wait_s", 0.0))
    for demand in job_demands(cfg, sweep=sweep):
        current = nodes()
        if packs(demand, current):
            continue
        scaler = limits()
        if scaler is None or not _reachable(demand, scaler):
            raise _error(demand, current, scaler)
        _request(demand)
        waited, last = 0.0, -60.0
        while not packs(demand, current):
            if waited >= wait_s:
                raise _error(demand, current, scaler)
            if waited - last >= 30.0:
                log(f"raykfe: waiting for the autoscaler to add nodes for {demand.describe()} "
                    f"({waited:.0f} of {wait_s:.0f} s, ray.resource_wait_s)")
                last = waited
            sleep(poll_s)
            waited += poll_s
            current = nodes()


def _request(demand: Demand) -> None:
    """Ask the autoscaler for the bundles now (it would otherwise wait for the placement group)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in demand.shape.items() if v > 0}] * demand.count)
    except Exception:  # best effort: the placement group itself asks the autoscaler too
        pass
