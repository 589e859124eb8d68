"""User-facing errors.

Every error a user can cause (a bad config, a missing data root, an unknown name) is a
:class:`RaykfeError` whose message is ONE line naming the problem and the fix. The CLI prints
``raykfe: error: <message>`` and exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations

__all__ = ["RaykfeError", "ConfigError", "UnreachableTarget", "DataError", "NumericalError", "StorageError"]


class RaykfeError(Exception):
    """Base class: a one-line message that names the problem and the fix."""


class ConfigError(RaykfeError):
    """A job config or API argument is invalid (unknown key, bad type, bad value)."""


class UnreachableTarget(ConfigError):
    """No plan meets the target (every eligible unit removed falls short); callers that search over
    targets (``latency:F``'s correction) catch this and nothing else."""


class DataError(RaykfeError):
    """A dataset cannot be found or read (missing root, empty split)."""


class NumericalError(RaykfeError):
    """Something became NaN/Inf: a layer's inputs or outputs in the statistics pass or a K-FAC factor
    (the message names the layer), or a training stage diverged (it names the stage, the epoch and
    the learning rate to lower; the diverged epoch is never checkpointed)."""


class StorageError(RaykfeError):
    """An output URI cannot be read or written, or holds no complete result."""
