"""raykfe: second-order structured pruning (EigenDamage and friends), in one process or on Ray.

The pipeline, one module per stage::

    model + batches
      -> capture / factors   K-FAC statistics (sum, count) per layer          collect_factors()
      -> eigen               Kronecker-factored eigenbasis per layer
      -> methods             scores of eigen-directions or channels (a registry of methods)
      -> plan                global selection for a params/flops/directions target
      -> surgery / channels  rotation -> core -> rotation, or coupled channel slices removed
                             (the engine runs the steps above once, for the API, jobs and sweeps)   prune()
      -> finetune            SGD fine-tuning, evaluation
      -> checkpoint          plan (JSON) + weights (safetensors), rebuilt on load  save() / load()

    plan -> its bottlenecks -> widen   channel groups grown (a widths spec, JSON), trained and pruned
                                       again against a uniform widening of the same MACs   Widths, `raykfe widen`
"""

from .api import prune
from .capture import collect_factors
from .checkpoint import load, save
from .counting import Counts, count
from .engine import PruneResult
from .errors import ConfigError, DataError, NumericalError, RaykfeError, StorageError
from .factors import LayerStats, merge_stats
from .plan import Plan, parse_target
from .settings import PruneSettings
from .widen import Widths

__all__ = [
    "collect_factors",
    "prune",
    "count",
    "save",
    "load",
    "PruneResult",
    "PruneSettings",
    "Plan",
    "LayerStats",
    "Counts",
    "merge_stats",
    "parse_target",
    "Widths",
    "RaykfeError",
    "ConfigError",
    "DataError",
    "NumericalError",
    "StorageError",
]

__version__ = "0.1.0"
