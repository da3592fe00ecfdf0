"""One hierarchy for the failures a user can fix.

Every error a person can act on (a config value, an input file, a checkpoint, a stale or corrupt
shard, a resource limit) derives from :class:`LayerscopeError`.  The CLI prints those as one line,
``layerscope: error: <message>``, and exits with the subclass's ``exit_code``; anything else is a
bug and keeps its traceback.  Leaf modules import from here, never from the planner, so no import
runs back up the data flow (models -> probes -> stats -> merge -> CLI).

Exit codes are distinct so a wrapper (the Snakemake rule, a SLURM epilogue) can tell a bad input,
which a retry with more memory cannot fix, from a resource failure, which it can.
"""

from __future__ import annotations

__all__ = [
    "LayerscopeError",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "ShardError",
    "ResourceError",
    "WriteError",
    "USER_ERROR_CODES",
]


class LayerscopeError(Exception):
    """Base of user-facing failures; the message is one line naming the field or file."""

    exit_code: int = 2
    retryable: bool = False  # would more memory or time help?


class ConfigError(LayerscopeError, ValueError):
    """A bad config value; the message names the field (``config field a.b.c: ...``)."""

    exit_code = 2


class DataError(LayerscopeError, ValueError):
    """Bad dataset input (missing file, malformed list/caption line); the message names the file."""

    exit_code = 3


class ModelLoadError(LayerscopeError, RuntimeError):
    """Weights or model files that cannot be loaded; the message names the file and config field."""

    exit_code = 4


class ShardError(LayerscopeError):
    """A shard that cannot be merged: corrupt, incomplete, foreign or mismatched."""

    exit_code = 5


class ResourceError(LayerscopeError, RuntimeError):
    """Out of accelerator/host memory or time: more resources (a retry) may help."""

    exit_code = 6
    retryable = True


class WriteError(LayerscopeError, OSError):
    """An output could not be written (disk full, permissions); the temporary file was removed."""

    exit_code = 7
    retryable = True


USER_ERROR_CODES = frozenset(c.exit_code for c in (ConfigError, DataError, ModelLoadError, ShardError))
