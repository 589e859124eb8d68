"""Fault injection for raykfe's reliability tests, and nothing else.

A test sets ``RAYKFE_FAULT_INJECT=stage:rank:after:marker-file`` in the driver's environment; the
Ray backend hands the parsed spec to its Train workers, and the worker of that ``rank`` exits hard
(``os._exit``) ONCE, after ``after`` batches (statistics) or epochs (training) of ``stage``,
leaving ``marker-file`` behind so that the restarted worker does not fail again. Without the
variable every call here is a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FAULT_ENV", "test_fault_from_env", "inject_test_fault"]

FAULT_ENV = "RAYKFE_FAULT_INJECT"


def test_fault_from_env() -> dict | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    stage, rank, after, marker = spec.split(":", 3)
    return {"stage": stage, "rank": int(rank), "after": int(after), "marker": marker}


def inject_test_fault(fault: dict | None, stage: str, rank: int, step: int) -> None:
    if not fault or fault.get("stage") != stage or int(fault.get("rank", -1)) != rank or step != int(fault.get("after", 0)):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed {stage} rank {rank} after {step}\n")
    os._exit(1)
