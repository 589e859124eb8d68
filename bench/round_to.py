"""Does rounding kept widths up to a multiple of N pay on this device? (``prune.round_to``)

For the layer shapes a pruned KFE layer runs (a 3x3 core r -> r and a 1x1 rotation C -> r, at a
few resolutions), times width w and width ceil_N(w) for every w in a range, and reports how often
the rounded-up layer (more MACs) is at least as fast as the unrounded one, and the mean time
ratio. Rounding pays when the rounded layer is faster despite its extra MACs.

    .venv/bin/python bench/round_to.py --threads 2 --batches 1,32 --n 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raykfe.plan import rounded  # noqa: E402
from raykfe.report import format_table  # noqa: E402


@torch.no_grad()
def time_conv(c_in: int, c_out: int, k: int, hw: int, batch: int, repeats: int) -> float:
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False).eval()
    x = torch.randn(batch, c_in, hw, hw)
    conv(x)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        conv(x)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--widths", default="17-40", help="kept widths r tried, e.g. 17-40")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lo, hi = (int(v) for v in args.widths.split("-"))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name, k, hw, full in (("3x3 core r->r", 3, 28, None), ("3x3 core r->r", 3, 14, None),
                                  ("1x1 rotation 256->r", 1, 28, 256), ("1x1 rotation 256->r", 1, 14, 256)):
            faster, ratios = 0, []
            for w in range(lo, hi + 1):
                up = rounded(w, 10_000, args.n)
                if up == w:
                    continue
                ci = full or w
                t_w = time_conv(ci, w, k, hw, batch, args.repeats)
                t_up = time_conv(full or up, up, k, hw, batch, args.repeats)
                faster += t_up <= t_w
                ratios.append(t_up / t_w)
            macs = statistics.mean(rounded(w, 10_000, args.n) ** (1 if full else 2) / w ** (1 if full else 2)
                                   for w in range(lo, hi + 1) if rounded(w, 10_000, args.n) != w)
            rows.append([f"{name} @{hw}", batch, f"{faster}/{len(ratios)}", f"{statistics.mean(ratios):.3f}",
                         f"{macs:.3f}"])
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    print(f"### round_to={args.n} on CPU, {args.threads} threads: widths {lo}-{hi} not a multiple of {args.n}, "
          f"each against its round-up (median of {args.repeats})\n")
    print(format_table(["layer", "batch", "rounded up at least as fast", "mean time ratio rounded / exact",
                        "mean MACs ratio"], rows, markdown=True))


if __name__ == "__main__":
    main()
