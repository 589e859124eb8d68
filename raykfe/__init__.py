"""raykfe: second-order structured pruning (EigenDamage and friends), in one process or on Ray.

The pipeline, one module per stage::

    model + batches
      -> capture / factors   K-FAC statistics (sum, count) per layer          collect_factors()
      -> eigen               Kronecker-factored eigenbasis per layer
      -> methods             EigenDamage scores of every eigen-direction
      -> plan                global threshold for a params/flops/directions target
      -> surgery             rotation -> core -> rotation, a new smaller model     prune()
      -> finetune            SGD fine-tuning, evaluation
      -> checkpoint          plan (JSON) + weights (safetensors), rebuilt on load  save() / load()
"""

from .capture import collect_factors
from .checkpoint import load, save
from .counting import Counts, count
from .errors import ConfigError, DataError, NumericalError, RaykfeError, StorageError
from .factors import LayerStats, merge_stats
from .plan import Plan, parse_target
from .pruning import PruneResult, prune

__all__ = [
    "collect_factors",
    "prune",
    "count",
    "save",
    "load",
    "PruneResult",
    "Plan",
    "LayerStats",
    "Counts",
    "merge_stats",
    "parse_target",
    "RaykfeError",
    "ConfigError",
    "DataError",
    "NumericalError",
    "StorageError",
]

__version__ = "0.1.0"
