"""Importance methods. Each one turns a model's statistics into per-structure scores."""

from .eigendamage import kfe_weight, entry_scores, unit_scores

__all__ = ["kfe_weight", "entry_scores", "unit_scores", "METHODS"]

#: methods registered by name (more arrive with the baselines)
METHODS = ("eigendamage",)
