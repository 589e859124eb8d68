"""Plain-text tables for the terminal and markdown files (no extra dependency)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "layer_table", "human", "plot_layers"]


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


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def layer_table(report: Sequence[dict], *, markdown: bool = False) -> str:
    headers = ["layer", "action", "kept in", "kept out", "removed", "params", "dense", "MACs", "dense MACs", "pred. dL", "note"]
    rows = [
        [r["layer"], r["action"], r["kept_in"], r["kept_out"], _pct(r.get("removed")), human(r["params"]),
         human(r["dense_params"]), human(r["macs"]), human(r["dense_macs"]), f"{r['predicted_dloss']:.3g}", r["note"]]
        for r in report
    ]
    return format_table(headers, rows, markdown=markdown)


def plot_layers(report: Sequence[dict], title: str) -> bytes:
    """A PNG bar chart of the fraction of each layer removed, bottlenecks in a second colour."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report if r.get("removed") is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 3.6))
    colours = ["tab:red" if "bottleneck" in str(r.get("note", "")) else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [100 * r["removed"] for r in rows], color=colours)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("removed (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title + "  (red: least pruned = bottleneck)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
