"""Measured latency as a cost: a table of layer latencies on the job's device, and the forms of a
pruned layer chosen by it (issue 14; ``prune.forms: latency``).

MACs do not say what a layer costs on a device: a 1x1 rotation costs a launch and a pass over its
activations that MACs do not count, and what that costs depends on the runtime, the threads and
the batch. The table answers "how long does this layer take in this form" from timings:

* **What is timed.** Every form of a pruned KFE layer (:data:`raykfe.plan.FORMS`, and the dense
  layer) is a chain of at most three plain layers (:func:`form_ops`): a patch-mode conv is a 1x1
  input rotation at the input's resolution, the k x k core with the layer's stride, padding and
  dilation, and a 1x1 output rotation at the output's resolution; a full-mode conv has the k x k
  geometry on its input rotation and a 1x1 core; a Linear's are Linears over the same tokens. One
  *signature* (kind, kernel, stride, padding, dilation, input size; tokens for a Linear) is one
  timed primitive whose only free parameters are its widths.
* **A grid, not every width.** Per signature, the primitive is timed on a grid of input x output
  widths, geometric from 1 to the largest width the model needs (:func:`grid_points`, 6 per axis),
  and read by bilinear interpolation: a layer's time is close to ``a + b c_in + c c_out + d c_in
  c_out`` at fixed geometry, which bilinear interpolation reproduces exactly; what it misses is
  the device's preference for some widths (``prune.round_to`` is the other half of that).
* **Kept and shared.** A table is one JSON document per (device, torch version, threads, batch)
  under ``latency.table`` (a directory or object-storage URI); a later job or sweep trial on the
  same device reads it and times only the signatures (or larger widths) it lacks.
* **What it decides.** With ``prune.forms: latency`` each pruned layer is built in the form, or
  left dense, whose predicted time is least (:class:`raykfe.plan._Evaluator`); the target (MACs,
  parameters) is still met exactly by the bisection, which counts the chosen forms' costs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = ["Geometry", "LatencyTable", "geometries", "form_ops", "grid_points", "needed_signatures", "device_key"]

GRID = 6  # points per width axis
_MEMORY: dict[str, dict] = {}  # this process's grids per table key (what a table without a URI keeps)


@dataclass(frozen=True)
class Geometry:
    """What the latency of a prunable layer's forms depends on (besides the widths)."""

    kind: str  # "conv" | "linear"
    mode: str  # KFE conv mode: "patch" | "full"
    c_in: int
    c_out: int
    kernel: tuple[int, ...] = (1, 1)
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    in_hw: tuple[int, ...] = ()
    out_hw: tuple[int, ...] = ()
    tokens: int = 1  # a Linear's positions per example

    def conv_sig(self, full_geometry: bool, at_input: bool) -> tuple:
        """The signature of a conv primitive of this layer: its own k x k geometry (read at the
        input's size), or a 1x1 at the input's or the output's size."""
        if full_geometry:
            return ("conv", *self.kernel, *self.stride, *_pad(self.padding), *self.dilation, *self.in_hw)
        hw = self.in_hw if at_input else self.out_hw
        return ("conv", 1, 1, 1, 1, 0, 0, 1, 1, *hw)


def _pad(p) -> tuple:
    return (p,) if isinstance(p, str) else tuple(p)


def geometries(model: nn.Module, metas: Mapping[str, dict]) -> dict[str, Geometry]:
    """The geometry of every layer of ``metas`` that is a plain Conv2d (groups 1) or Linear;
    layers already rebuilt or grouped are left out (their forms are chosen by MACs)."""
    out = {}
    for name, m in metas.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(mod, nn.Conv2d) and mod.groups == 1 and m.get("ranks") is None:
            out[name] = Geometry("conv", m["mode"], mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                                 tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                                 tuple(mod.dilation), tuple(m["in_shape"][1:]), tuple(m["out_shape"][1:]))
        elif isinstance(mod, nn.Linear) and m.get("ranks") is None:
            out[name] = Geometry("linear", m["mode"], mod.in_features, mod.out_features, tokens=int(m["positions"]))
    return out


def form_ops(g: Geometry, r_in: int, r_out: int, form: str) -> list[tuple[tuple, int, int]]:
    """The primitives ``(signature, c_in, c_out)`` that ``form`` runs, keeping ``r_in`` input and
    ``r_out`` output directions (``form="dense"``: the layer as it is)."""
    r_in, r_out = max(1, int(r_in)), max(1, int(r_out))
    if g.kind == "linear":
        sig = ("linear", g.tokens)
        A = B = C = K = sig
    else:
        patch = g.mode == "patch"
        K = g.conv_sig(True, True)  # the layer's own geometry
        A = g.conv_sig(not patch, True)  # input rotation: 1x1 at the input (patch), k x k (full)
        B = g.conv_sig(patch, False)  # core: k x k (patch), 1x1 at the output (full)
        C = g.conv_sig(False, False)  # output rotation: 1x1 at the output
    if form == "dense":
        return [(K, g.c_in, g.c_out)]
    if form == "three":
        return [(A, g.c_in, r_in), (B, r_in, r_out), (C, r_out, g.c_out)]
    if form == "fold_out":
        return [(A, g.c_in, r_in), (B, r_in, g.c_out)]
    if form == "fold_in":
        return [(K, g.c_in, r_out), (C, r_out, g.c_out)]
    raise ConfigError(f"layer form {form!r} is not known")


def needed_signatures(geos: Mapping[str, Geometry]) -> dict[tuple, tuple[int, int]]:
    """Every signature the forms of ``geos`` can run, with the largest input / output widths."""
    need: dict[tuple, tuple[int, int]] = {}
    for g in geos.values():
        for form in ("dense", "three", "fold_out", "fold_in"):
            for sig, ci, co in form_ops(g, g.c_in, g.c_out, form):
                a, b = need.get(sig, (1, 1))
                need[sig] = (max(a, ci), max(b, co))
    return need


def grid_points(largest: int, n: int = GRID) -> list[int]:
    """Geometric widths from 1 to ``largest`` (at most ``n``, both ends included)."""
    if largest <= n:
        return list(range(1, largest + 1))
    return sorted({int(round(largest ** (i / (n - 1)))) for i in range(n)} | {1, largest})


def device_key(device: str, threads: int, batch: int) -> str:
    """The file a table lives in: the device (CPU model or GPU name), torch's version, threads and
    batch; timings from another device or runtime are never mixed in."""
    dev = torch.device(device)
    if dev.type == "cuda":
        what = torch.cuda.get_device_name(dev)
    else:
        what = _cpu_name()
    tag = hashlib.sha256(f"{what}|{platform.machine()}".encode()).hexdigest()[:10]
    return f"latency-{dev.type}-{tag}-torch{torch.__version__.split('+')[0]}-{threads}t-b{batch}.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _sig_key(sig: tuple) -> str:
    return ",".join(str(x) for x in sig)


def _primitive(sig: tuple, c_in: int, c_out: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The timed module and its input's shape (without the batch)."""
    if sig[0] == "linear":
        return nn.Linear(c_in, c_out, bias=False), (sig[1], c_in)
    kh, kw, sh, sw = sig[1:5]
    rest = sig[5:]
    if isinstance(rest[0], str):  # padding "same" / "valid"
        pad, rest = rest[0], rest[1:]
    else:
        pad, rest = tuple(rest[:2]), rest[2:]
    dil, hw = tuple(rest[:2]), tuple(rest[2:])
    return nn.Conv2d(c_in, c_out, (kh, kw), (sh, sw), pad, dil, bias=False), (c_in, *hw)


@dataclass
class LatencyTable:
    """Timings of primitives on one device, thread count and batch: per signature, a grid of
    widths and the median milliseconds of one forward pass at each point."""

    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    repeats: int = 5
    grids: dict[str, dict] = field(default_factory=dict)  # sig key -> {"c_in": [...], "c_out": [...], "ms": [[...]]}
    measured: int = 0  # primitives timed by this process (0: everything came from storage)

    # -- reading ---------------------------------------------------------------------------------

    def ms(self, sig: tuple, c_in: int, c_out: int) -> float:
        """Bilinear interpolation of the grid at (c_in, c_out), clamped to the grid's ends."""
        g = self.grids[_sig_key(sig)]
        xs, ys, z = np.asarray(g["c_in"], float), np.asarray(g["c_out"], float), np.asarray(g["ms"], float)
        i, tx = _bracket(xs, c_in)
        j, ty = _bracket(ys, c_out)
        i2, j2 = min(i + 1, len(xs) - 1), min(j + 1, len(ys) - 1)
        return float((1 - tx) * (1 - ty) * z[i, j] + tx * (1 - ty) * z[i2, j] + (1 - tx) * ty * z[i, j2] + tx * ty * z[i2, j2])

    def layer_ms(self, g: Geometry, r_in: int, r_out: int, form: str) -> float:
        return sum(self.ms(sig, ci, co) for sig, ci, co in form_ops(g, r_in, r_out, form))

    def covers(self, sig: tuple, c_in: int, c_out: int) -> bool:
        g = self.grids.get(_sig_key(sig))
        return g is not None and g["c_in"][-1] >= c_in and g["c_out"][-1] >= c_out

    # -- measuring -------------------------------------------------------------------------------

    def ensure(self, need: Mapping[tuple, tuple[int, int]], progress: bool = False,
               log: Callable[[str], None] | None = None) -> int:
        """Time every signature of ``need`` the table lacks (or covers only to smaller widths);
        returns how many primitives were timed."""
        todo = {}
        for s, (a, b) in need.items():
            if not self.covers(s, a, b):  # re-timed to the larger widths of the old grid and the need
                old = self.grids.get(_sig_key(s))
                todo[s] = (max(a, old["c_in"][-1]), max(b, old["c_out"][-1])) if old else (a, b)
        if not todo:
            return 0
        points = sum(len(grid_points(a)) * len(grid_points(b)) for a, b in todo.values())
        if log:
            log(f"raykfe: timing {len(todo)} layer shapes ({points} width pairs) on {self.device}, "
                f"{self.threads} thread(s), batch {self.batch}")
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=points, desc="latency table", leave=False, disable=None)  # None: bars on a terminal only
        try:
            for sig, (a, b) in todo.items():
                xs, ys = grid_points(a), grid_points(b)
                ms = []
                for ci in xs:
                    ms.append([])
                    for co in ys:
                        ms[-1].append(self._time(sig, ci, co))
                        if bar is not None:
                            bar.update()
                self.grids[_sig_key(sig)] = {"c_in": xs, "c_out": ys, "ms": ms}
        finally:
            torch.set_num_threads(old)
            if bar is not None:
                bar.close()
        self.measured += points
        return points

    @torch.no_grad()
    def _time(self, sig: tuple, c_in: int, c_out: int) -> float:
        dev = torch.device(self.device)
        mod, shape = _primitive(sig, c_in, c_out)
        mod = mod.to(dev).eval()
        x = torch.randn(self.batch, *shape, device=dev)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
        mod(x)  # warm-up (allocations, kernel choice)
        sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            mod(x)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    # -- storage ---------------------------------------------------------------------------------

    def key(self) -> str:
        return device_key(self.device, self.threads, self.batch)

    def to_json(self) -> str:
        return json.dumps({"format": 1, "device": self.device, "threads": self.threads, "batch": self.batch,
                           "repeats": self.repeats, "grids": self.grids}, indent=1, sort_keys=True)

    @classmethod
    def load(cls, uri: str | None, device: str, threads: int, batch: int, repeats: int = 5) -> "LatencyTable":
        """The stored table for this device / threads / batch under ``uri`` (empty when none is
        there yet, or when ``uri`` is None)."""
        table = cls(device, threads, batch, repeats)
        table.grids = dict(_MEMORY.get(table.key(), {}))
        if uri:
            from .storage import open_uri

            loc = open_uri(uri)
            if loc.exists(table.key()):
                try:
                    doc = json.loads(loc.read_bytes(table.key()))
                except ValueError:
                    raise ConfigError(f"{uri}/{table.key()} is not a latency table (not JSON): delete it or point latency.table elsewhere") from None
                table.grids.update(doc.get("grids", {}))
        return table

    def save(self, uri: str | None) -> None:
        """Merge into the stored table (another job may have added signatures meanwhile)."""
        _MEMORY[self.key()] = dict(self.grids)
        if not uri:
            return
        stored = LatencyTable.load(uri, self.device, self.threads, self.batch)
        for k, g in stored.grids.items():
            mine = self.grids.get(k)
            if mine is None or (g["c_in"][-1] > mine["c_in"][-1] and g["c_out"][-1] >= mine["c_out"][-1]) \
                    or (g["c_in"][-1] >= mine["c_in"][-1] and g["c_out"][-1] > mine["c_out"][-1]):
                self.grids[k] = g  # theirs covers more widths
        from .storage import open_uri

        open_uri(uri).write_bytes(self.key(), self.to_json().encode())


def _bracket(xs: np.ndarray, x: float) -> tuple[int, float]:
    """The grid cell of ``x`` (index of its left end) and the position in it, clamped."""
    if x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, 0.0
    i = int(np.searchsorted(xs, x, side="right") - 1)
    return i, float((x - xs[i]) / (xs[i + 1] - xs[i]))


def table_for(model: nn.Module, metas: Mapping[str, dict], *, uri: str | None, device: str = "cpu",
              threads: int | None = None, batch: int = 1, repeats: int = 5, progress: bool = False,
              log: Callable[[str], None] | None = None) -> tuple[LatencyTable, dict[str, Geometry]]:
    """The latency table covering every form of ``metas``' layers, read from ``uri`` and completed
    by timing what it lacks (then stored back), with the layers' geometries."""
    threads = threads or torch.get_num_threads()
    if batch < 1 or threads < 1 or repeats < 1:
        raise ConfigError(f"latency table: batch {batch}, threads {threads} and repeats {repeats} must be positive")
    geos = geometries(model, metas)
    table = LatencyTable.load(uri, device, threads, batch, repeats)
    if table.ensure(needed_signatures(geos), progress=progress, log=log) or uri is None:
        table.save(uri)
    return table, geos


_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


def profile_job(cfg, log: Callable[[str], None] = print) -> str:
    """``raykfe profile``: the latency table of a job's model on its device, threads and batch,
    read from ``latency.table`` and completed there, and a per-layer view of it (no data is
    read: latency depends on the shapes only). Returns the report text."""
    from .capture import layer_metas, prunable_layers
    from .widen import job_model
    from .plan import allowed_forms
    from .report import format_table
    from .settings import PruneSettings

    s = PruneSettings.from_job(cfg)
    classes = cfg.data.num_classes or _CLASSES.get(cfg.data.name, 1000)
    model = job_model(cfg, classes).eval()
    example = torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size)
    adapters, _ = prunable_layers(model, example, conv_mode=s.conv_mode, include_classifier=s.include_classifier,
                                  exclude=s.exclude, max_factor_dim=s.max_factor_dim)
    metas = layer_metas(model, example, adapters)
    table, geos = table_for(model, metas, uri=s.latency_table, device=s.latency_device, threads=s.latency_threads,
                            batch=s.latency_batch, progress=cfg.progress, log=log)
    rows = []
    for name, g in geos.items():
        half = (max(1, g.c_in // 2), max(1, g.c_out // 2))
        forms = allowed_forms(metas[name])
        ms = {f: table.layer_ms(g, *half, f) for f in ("dense", *forms)}
        best = min(ms, key=ms.get)
        rows.append([name, f"{g.c_in}->{g.c_out}" + (f" k{g.kernel[0]} s{g.stride[0]} @{g.in_hw[-1]}" if g.kind == "conv" else ""),
                     f"{ms['dense']:.3f}", *(f"{ms[f]:.3f}" if f in ms else "-" for f in ("three", "fold_out", "fold_in")), best])
    head = (f"latency table {table.key()} ({'stored under ' + s.latency_table if s.latency_table else 'not stored: set latency.table'}); "
            f"{table.measured} width pairs timed now, {len(table.grids)} layer shapes in all\n"
            "predicted ms of each layer at batch {b}, dense and in each form keeping half of its directions:\n\n").format(b=table.batch)
    return head + format_table(["layer", "shape", "dense", "three", "fold_out", "fold_in", "fastest"], rows)
