"""Join a Ray cluster or start a local one."""

from __future__ import annotations

import logging
import os
import socket

import ray

from ..errors import ConfigError

__all__ = ["connect", "cluster_cpus"]


def connect(address: str | None = None, num_cpus: int | None = None, *, log_to_driver: bool = True) -> str:
    """Connect once per process: ``address`` (``ray.address``), else ``RAY_ADDRESS`` (set by
    ``ray job submit``), else a new local cluster with ``num_cpus`` logical CPUs (default
    ``max(4, cores)``: on 2 cores a Tune trial plus its Train workers would otherwise deadlock)."""
    if ray.is_initialized():
        return "connected"
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if log_to_driver else logging.ERROR  # quiet: raykfe's lines only (ray.verbose)
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver, logging_level=level)
            return address
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=log_to_driver, logging_level=level)
        return "local"
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address!r} ({str(exc).splitlines()[0]}): check ray.address / RAY_ADDRESS or start it with 'ray start --head'") from None
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot start or join Ray ({str(exc).splitlines()[0]}): check ray.address / RAY_ADDRESS") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a ``host:port`` GCS address does not answer (ray.init
    would retry for a long time)."""
    if "://" in address and not address.startswith("ray://"):
        return  # e.g. http:// dashboard addresses are for the Jobs CLI, not ray.init
    hostport = address.split("://", 1)[-1]
    if hostport in ("auto", "local") or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} ({exc}): check ray.address / RAY_ADDRESS, "
            "or start it with 'ray start --head'"
        ) from None


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))
