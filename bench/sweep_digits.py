"""The digits sweep (jobs/digits-sweep.yaml: targets flops 0.3..0.9, two learning rates) run twice on
a local Ray cluster: statistics shared by all trials (the default), then recomputed in every trial
(``sweep.share_statistics=false``), to show what sharing saves. Both runs share one trained base.

    .venv/bin/python bench/sweep_digits.py [key=value ...]

Prints a markdown table of wall times and copies the shared run's front plot to
bench/figures/digits-sweep-front.png (referenced from BENCHMARKS.md). Asserts nothing.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from raykfe.config import load_config
from raykfe.report import format_table
from raykfe.sweep import run_sweep


def main() -> None:
    overrides = [a for a in sys.argv[1:] if "=" in a]
    root = Path("results/bench-sweep")
    rows = []
    for label, share in (("statistics shared (default)", "true"), ("statistics recomputed per trial", "false")):
        out = root / ("shared" if share == "true" else "per-trial")
        base = root / "base"  # one trained base for both runs (and for re-runs of this benchmark)
        shutil.rmtree(out, ignore_errors=True)
        if base.exists():
            shutil.copytree(base, out / "shared" / "base")
        cfg = load_config("jobs/digits-sweep.yaml", ["progress=false", f"sweep.share_statistics={share}", f"output.uri={out}", *overrides])
        t0 = time.perf_counter()
        summary = run_sweep(cfg, log=lambda m: print(m, file=sys.stderr))
        wall = time.perf_counter() - t0
        if not base.exists():
            shutil.copytree(out / "shared" / "base", base)
        rows.append([label, summary["trials"], summary["done"], summary["stopped"], f"{summary['prepare_seconds']:.0f}",
                     f"{summary['tune_seconds']:.0f}", f"{wall:.0f}"])
        print(f"{label}: {wall:.0f} s", file=sys.stderr)
    print(format_table(["run", "trials", "finished", "stopped by ASHA", "driver s (base + statistics)", "Tune s (trials)", "wall s"],
                       rows, markdown=True))
    print()
    print((root / "shared" / "trials.md").read_text())
    print((root / "shared" / "front.md").read_text())
    Path("bench/figures").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "shared" / "front.png", "bench/figures/digits-sweep-front.png")


if __name__ == "__main__":
    main()
