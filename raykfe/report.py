"""Reports: per-layer rows of a plan, the job table, plain-text / markdown tables, the layer plot.

Nothing here computes anything a plan or a job's metrics do not already hold.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "layer_table", "human", "plot_layers", "plan_report", "flag_bottlenecks", "job_table",
           "latency_table", "BOTTLENECK_SHARE"]

#: a layer is flagged as an architectural bottleneck when it is among the least-pruned tenth
BOTTLENECK_SHARE = 0.1


def _row(layer: str, action: str, kept_in="-", kept_out="-", params=None, dense_params=None, macs=None, dense_macs=None,
         predicted_dloss=None, removed=None, note: str = "") -> dict:
    return {"layer": layer, "action": action, "kept_in": kept_in, "kept_out": kept_out, "params": params,
            "dense_params": dense_params, "macs": macs, "dense_macs": dense_macs, "predicted_dloss": predicted_dloss,
            "removed": removed, "note": note}


def plan_report(plan) -> list[dict]:
    """One row per weight layer of ``plan`` (:class:`raykfe.plan.Plan`): what was removed, with
    ``removed`` the fraction of the layer's structures (eigen-directions, or output channels) that
    went, its parameters and MACs after / before, the predicted loss increase (``None`` when the
    method's scores are not in loss units), and the least-pruned tenth of the pruned layers flagged
    as bottlenecks (SOSP's analysis: layers a method refuses to shrink are where the architecture
    is too narrow)."""
    rows = []
    for name, lp in plan.layers.items():
        kfe = lp.action == "kfe"
        rows.append(_row(
            name, lp.action, f"{lp.r_in}/{lp.d_in}" if kfe else "-", f"{lp.r_out}/{lp.d_out}" if kfe else "-", lp.params,
            lp.dense_params, lp.macs, lp.dense_macs, lp.predicted_dloss,
            1.0 - (lp.r_in + lp.r_out) / (lp.d_in + lp.d_out) if kfe else 0.0,
            "; ".join(x for x in (lp.reason, f"form {lp.form}" if kfe and lp.form != "three" else "") if x),
        ))
    for name, c in plan.channels.items():
        rows.append(_row(name, "channels" if c.kept < c.total else "kept", "-", f"{c.kept}/{c.total}", c.params,
                         c.dense_params, c.macs, c.dense_macs, c.predicted_dloss, 1.0 - c.kept / c.total if c.total else 0.0))
    rows += [_row(name, "dense", note=reason) for name, reason in plan.skipped.items()]
    flag_bottlenecks(rows)
    return rows


def flag_bottlenecks(rows: list[dict], share: float = BOTTLENECK_SHARE) -> list[str]:
    """Mark (in ``note``) and return the least-pruned ``share`` of the rows that have a ``removed``
    (with every row tied with the last one: the layers of one residual stream go together)."""
    cand = [r for r in rows if r.get("removed") is not None]
    if len(cand) < 2:
        return []
    k = max(1, int(round(share * len(cand))))
    cut = sorted(r["removed"] for r in cand)[k - 1]
    flagged = [r for r in cand if r["removed"] <= cut + 1e-12]  # ties (e.g. one residual stream) all count
    for r in flagged:
        r["note"] = ("bottleneck (least pruned); " + r["note"]).rstrip("; ")
    return [r["layer"] for r in flagged]


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
         human(r["dense_params"]), human(r["macs"]), human(r["dense_macs"]),
         "-" if r.get("predicted_dloss") is None else f"{r['predicted_dloss']:.3g}", r["note"]]
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


def latency_table(latency: dict, *, markdown: bool = False) -> str:
    """Base vs pruned latency per device and batch size, with the measured speedup."""
    rows = []
    for dev, per_batch in latency["base"].items():
        for b, ms in per_batch.items():
            pm = latency["pruned"][dev][b]
            rows.append([f"{dev} ({latency['threads']} threads)" if dev == "cpu" else dev, b, f"{ms:.2f}", f"{pm:.2f}", f"{ms / pm:.2f}x"])
    return format_table(["device", "batch", "base ms", "pruned ms", "speedup"], rows, markdown=markdown)


def job_table(metrics: dict, *, markdown: bool = False) -> str:
    """Base vs pruned: accuracy, params, MACs, reductions, how the plan was made (its settings
    that matter for the method), and the time of each stage."""
    b, p = metrics["base"], metrics["pruned"]
    rows = [
        ["base", f"{100 * b['test_acc']:.2f}", "-", human(b["params"]), human(b["macs"]), "-", "-"],
        [
            f"{metrics['method']} {metrics['target']}",
            f"{100 * p['test_acc']:.2f}",
            f"{100 * p['test_acc_before_finetune']:.2f}",
            human(p["params"]),
            human(p["macs"]),
            f"{100 * metrics['params_reduction']:.1f}%",
            f"{100 * metrics['macs_reduction']:.1f}%",
        ],
    ]
    table = format_table(
        ["model", "test acc %", "before FT %", "params", "MACs", "params removed", "MACs removed"], rows, markdown=markdown
    )
    if metrics.get("settings"):
        table += "\n\n" + ", ".join(f"{k}: {v}" for k, v in metrics["settings"].items())
    q = metrics.get("quality") or {}
    if "measured_dloss" in q:
        pred = "-" if q.get("predicted_dloss") is None else f"{q['predicted_dloss']:.3g}"
        table += (f"\nright after pruning (BatchNorm recalibrated): validation loss {q['val_loss_pruned']:.4f} (base "
                  f"{q['val_loss_base']:.4f}), accuracy {100 * q['val_acc_pruned']:.2f}%; loss increase measured "
                  f"{q['measured_dloss']:.3g}, predicted by the scores {pred}")
    if "latency_target" in q:
        t = q["latency_target"]
        table += (f"\nlatency target: measured {t['base_ms']:.2f} ms -> {t['pruned_ms']:.2f} ms at batch {t['batch']} on "
                  f"{t['device']} ({t['threads']} threads), {100 * t['measured']:.1f}% removed (the latency table "
                  f"predicted {100 * t['predicted']:.1f}%; {len(t['probes'])} plan(s) timed)")
        asked = float(str(metrics["target"]).partition(":")[2] or 0)
        if t["measured"] < asked:
            table += (f"; target {metrics['target']} missed: the layers' forms cannot save more of this model's time at this "
                      "batch (most of it is elsewhere); lower the target or use flops:F")
    if metrics.get("latency"):
        table += "\n\n" + latency_table(metrics["latency"], markdown=markdown)
    t = metrics.get("timings", {})
    times = format_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in t.items()], markdown=markdown)
    reused = metrics.get("reused_stages") or []
    note = f"\n\nreused from an earlier run: {', '.join(reused)}" if reused else ""
    for stage, epoch in (metrics.get("resumed_from_epoch") or {}).items():
        note += f"\n{stage} resumed after epoch {epoch}"
    return table + "\n\n" + times + note
