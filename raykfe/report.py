"""Plain-text tables for the terminal and markdown files (no extra dependency)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "layer_table", "human"]


def human(n: float | int | None) -> str:
    """12345678 -> '12.35M'."""
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if n == int(n) else f"{n:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence], *, markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if markdown:
        lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
        return "\n".join(lines)
    sep = "  "
    lines = [sep.join(c.ljust(w) for c, w in zip(cells[0], widths)), sep.join("-" * w for w in widths)]
    lines += [sep.join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)


def layer_table(report: Sequence[dict], *, markdown: bool = False) -> str:
    headers = ["layer", "action", "kept in", "kept out", "params", "dense", "MACs", "dense MACs", "pred. dL", "note"]
    rows = [
        [r["layer"], r["action"], r["kept_in"], r["kept_out"], human(r["params"]), human(r["dense_params"]),
         human(r["macs"]), human(r["dense_macs"]), f"{r['predicted_dloss']:.3g}", r["note"]]
        for r in report
    ]
    return format_table(headers, rows, markdown=markdown)
