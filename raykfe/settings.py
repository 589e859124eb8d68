"""How the engine prunes: every choice except the method and the target, as one typed value.

:class:`PruneSettings` is what :func:`raykfe.engine.prune` takes. The API builds it from its
keyword arguments (:func:`raykfe.prune`), a job from its config (:meth:`PruneSettings.from_job`:
the ``stats`` and ``prune`` sections and the job's ``seed``), and the plan records it, so a result
says how it was made. Fields are validated on construction; an error names the field and the fix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["PruneSettings", "FISHER_TYPES", "CONV_MODES", "DEFAULT_LAYER_RATIO", "ROUND_LAYER_RATIO"]

FISHER_TYPES = ("true", "empirical")
CONV_MODES = ("patch", "full")
#: the per-layer cap of a one-pass prune, and of each round of an iterative one
DEFAULT_LAYER_RATIO = 0.95
ROUND_LAYER_RATIO = 0.5
#: a K-FAC factor side above this is not formed (8192^2 float64 = 512 MiB); the layer stays dense
MAX_FACTOR_DIM = 8192


def _bad(key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is invalid: {fix}")


@dataclass(frozen=True)
class PruneSettings:
    """Statistics, selection and surgery settings (defaults: EigenDamage as the paper runs it).

    * ``fisher``: ``"true"`` (labels sampled from the model, seeded per example) or ``"empirical"``;
    * ``conv_mode``: ``"patch"`` (1x1 input rotation) or ``"full"`` (unfolded patches);
    * ``max_layer_ratio``: no layer (channel group) loses more than this fraction of its directions
      (channels); ``None``: 0.95 in one pass, 0.5 per round of an iterative method;
    * ``include_classifier`` / ``exclude``: the final classifier and the named layers stay dense;
    * ``tolerance``: the achieved reduction is at or above the target, and within this of it when
      the units allow (``plan.summary.within_tolerance``);
    * ``freeze_rotations``: the rotations of pruned KFE layers do not train;
    * ``seed``: the Fisher's label draws; ``max_batches``: cap on each statistics pass;
    * ``max_factor_dim``: a layer with a larger K-FAC factor side stays dense;
    * ``damping``: relative Tikhonov damping of the K-FAC inverses (c-obs, kron-obs);
    * ``rounds``: prune / fine-tune rounds (``None``: the method's own, 3 for eigendamage-iterative);
    * ``round_epochs``: fine-tuning epochs between rounds (a job's ``finetune.epochs`` when None);
    * ``steps``: a one-shot method reaches the target in this many prune steps, the statistics
      re-collected on the partly pruned model between them, nothing trained (ALGORITHMS.md s. 10);
    * ``recalibrate_batches``: BatchNorm running statistics re-estimated from this many batches
      after every step's surgery (:mod:`raykfe.recalibrate`); 0 turns it off;
    * ``rank``: units ranked by predicted loss increase per unit of the target's metric saved
      (``"cost"``) or by predicted loss increase alone (``"score"``), or ``"auto"``: both, keeping the
      plan whose pruned, recalibrated model has the lower loss on the statistics data; ``None``:
      the method's default;
    * ``normalize``: ``"mean"`` divides each layer's (group's) scores by their mean before ranking,
      ``"none"`` ranks them as they are; ``None``: the method's default (:meth:`for_method`);
    * ``hybrid``: a KFE method removes whole channels of the groups coupled to depthwise / grouped
      convs, which have no KFE form (:mod:`raykfe.hybrid`), in the same ranking;
    * ``ekfac``: the KFE scores use the measured second moments of the per-example gradients in
      the eigenbasis instead of ``l_S l_A`` (:mod:`raykfe.ekfac`; a second statistics pass);
    * ``forms``: ``"cheapest"`` builds each pruned KFE layer in its cheapest exact form in the
      target's metric (three layers, or a rotation folded into the core: ALGORITHMS.md s. 11), and
      the selection counts that form; ``"three"`` keeps every pruned layer in three layers (earlier
      steps and rounds always do: the next one prunes their cores); ``"latency"`` builds each in
      the form, or leaves it dense, that is fastest by a latency table measured on
      ``latency_device`` with ``latency_threads`` threads at batch ``latency_batch``, read from and
      completed under ``latency_table`` (a directory or object-storage URI; None: kept in memory
      for this process) (:mod:`raykfe.profile`);
    * ``round_to``: every pruned KFE layer keeps a multiple of this many directions on each side
      it keeps (rounded up; the bisection removes more elsewhere): widths vector units and GEMM
      tiles like. A job's default is 1 on CPU and 8 on a GPU (BENCHMARKS.md, "round_to");
    * ``sosp_classes``: SOSP-I keeps each example's ``sosp_classes`` most probable softmax
      directions of the loss curvature (None: every class, exact); ``sosp_block``: structures per
      block of SOSP-I's pairwise matrix; ``sosp_max_pairs``: block pairs computed (None: all, exact;
      fewer: sampled, unbiased for the row sums) (:mod:`raykfe.methods.gram`);
    * ``channel_share``: a KFE method first removes this share of the target's cost by whole
      channels (``channel_method``'s ranking, its own statistics pass, BatchNorm recalibrated),
      then the rest in the eigenbasis of the narrowed model, statistics re-collected there (0: off);
    * ``progress``: progress bars on the statistics passes.
    """

    fisher: str = "true"
    conv_mode: str = "patch"
    max_layer_ratio: float | None = None
    include_classifier: bool = False
    exclude: tuple[str, ...] = ()
    tolerance: float = 0.02
    freeze_rotations: bool = False
    seed: int = 0
    max_batches: int | None = None
    max_factor_dim: int | None = MAX_FACTOR_DIM
    damping: float = 1e-3
    rounds: int | None = None
    round_epochs: int | None = None
    steps: int = 1
    recalibrate_batches: int = 10
    rank: str | None = None
    normalize: str | None = None
    hybrid: bool = True
    ekfac: bool = False
    forms: str = "cheapest"
    latency_table: str | None = None
    latency_batch: int = 32
    latency_threads: int | None = None
    latency_device: str = "cpu"
    round_to: int = 1
    sosp_classes: int | None = None
    sosp_block: int = 2048
    sosp_max_pairs: int | None = None
    channel_share: float = 0.0
    channel_method: str = "c-obd"
    progress: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        checks = [
            ("fisher", self.fisher in FISHER_TYPES, "use 'true' (sampled labels) or 'empirical'"),
            ("conv_mode", self.conv_mode in CONV_MODES, "use 'patch' or 'full'"),
            ("max_layer_ratio", self.max_layer_ratio is None or 0 < self.max_layer_ratio <= 1,
             "use a fraction in (0, 1], or None for the default"),
            ("tolerance", 0 <= self.tolerance < 1, "use a fraction, e.g. 0.02"),
            ("max_batches", self.max_batches is None or self.max_batches >= 1, "use a positive number or None for all"),
            ("max_factor_dim", self.max_factor_dim is None or self.max_factor_dim >= 1, "use a positive size or None"),
            ("damping", math.isfinite(self.damping) and self.damping > 0, "use a small positive damping, e.g. 1e-3"),
            ("rounds", self.rounds is None or self.rounds >= 1, "use 1 or more rounds, or None"),
            ("round_epochs", self.round_epochs is None or self.round_epochs >= 0, "use 0 or more epochs, or None"),
            ("steps", self.steps >= 1, "use 1 (one shot) or more steps"),
            ("recalibrate_batches", self.recalibrate_batches >= 0, "use 0 (off) or a number of batches, e.g. 10"),
            ("rank", self.rank in (None, "cost", "score", "auto"),
             "use 'cost' (loss per MAC / parameter saved), 'score', or 'auto' (the one whose pruned model fits better)"),
            ("normalize", self.normalize in (None, "none", "mean"), "use 'none' or 'mean'"),
            ("forms", self.forms in ("cheapest", "three", "latency"),
             "use 'cheapest' (each layer's cheapest exact form), 'latency' (the fastest, measured) or 'three'"),
            ("latency_batch", self.latency_batch >= 1, "use a positive batch size"),
            ("round_to", isinstance(self.round_to, int) and self.round_to >= 1, "use 1 (no rounding) or a width such as 8"),
            ("latency_threads", self.latency_threads is None or self.latency_threads >= 1, "use a positive thread count or None"),
            ("sosp_classes", self.sosp_classes is None or self.sosp_classes >= 1, "use a positive number of classes, or None for all"),
            ("sosp_block", self.sosp_block >= 1, "use a positive block size, e.g. 2048"),
            ("sosp_max_pairs", self.sosp_max_pairs is None or self.sosp_max_pairs >= 1, "use a positive number of block pairs, or None for all"),
            ("channel_share", 0 <= self.channel_share < 1, "use a fraction in [0, 1), e.g. 0.3 (0: off)"),
        ]
        for key, ok, fix in checks:
            if not ok:
                raise _bad(key, getattr(self, key), fix)

    def for_method(self, method) -> "PruneSettings":
        """These settings with every ``None`` that a method decides (``rank``, ``normalize``) set
        to the method's default (:attr:`raykfe.methods.Method.defaults`), else the global one."""
        fallback = {"rank": "score", "normalize": "none"}
        chosen = {k: method.defaults.get(k, v) for k, v in fallback.items() if getattr(self, k) is None}
        return replace(self, **chosen) if chosen else self

    def layer_ratio(self, rounds: int) -> float:
        """The per-layer cap: the setting, else 0.95 in one pass and 0.5 per round."""
        if self.max_layer_ratio is not None:
            return self.max_layer_ratio
        return DEFAULT_LAYER_RATIO if rounds == 1 else ROUND_LAYER_RATIO

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "PruneSettings":
        """The settings a plan recorded; keys this raykfe does not know are ignored (a newer plan)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items() if k in known})

    @classmethod
    def from_job(cls, cfg) -> "PruneSettings":
        """The settings of a job (:class:`raykfe.config.JobConfig`)."""
        p, s = cfg.prune, cfg.stats
        return cls(
            fisher=s.fisher, conv_mode=s.conv_mode, max_layer_ratio=p.max_layer_ratio,
            include_classifier=p.include_classifier, exclude=tuple(p.exclude), tolerance=p.tolerance,
            freeze_rotations=p.freeze_rotations, seed=cfg.seed, max_batches=s.max_batches,
            max_factor_dim=s.max_factor_dim, damping=p.damping, rounds=p.rounds, round_epochs=p.round_epochs,
            steps=p.steps, recalibrate_batches=p.recalibrate_batches, rank=p.rank, normalize=p.normalize, hybrid=p.hybrid,
            ekfac=p.ekfac, forms=p.forms, latency_table=cfg.latency.table,
            latency_batch=cfg.latency.batch or max(cfg.latency.batches), latency_threads=cfg.latency.threads,
            latency_device="cuda" if str(cfg.device).startswith("cuda") else "cpu",
            round_to=p.round_to or (8 if str(cfg.device).startswith("cuda") else 1),
            sosp_classes=cfg.sosp.classes, sosp_block=cfg.sosp.block, sosp_max_pairs=cfg.sosp.max_pairs,
            channel_share=p.channel_share, channel_method=p.channel_method, progress=cfg.progress,
        )
