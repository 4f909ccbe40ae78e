"""Typed errors. Each subclasses a builtin so callers that catch ``ValueError``/``TypeError`` keep working."""


class MoRAError(Exception):
    """Base class of every error raised by mora_dist."""


class MoRAConfigError(MoRAError, ValueError):
    """A configuration value cannot work; the message names the field, the value and the fix."""


class NoMatchingModuleError(MoRAError, ValueError):
    """A ``target_modules`` entry matched no module of the model."""


class AdapterLoadError(MoRAError, ValueError):
    """An adapter file does not fit the model it is loaded into (module path and both shapes are named)."""


class ShardingError(MoRAError, ValueError):
    """A layer shape cannot be split across the tensor-parallel ranks as asked."""
