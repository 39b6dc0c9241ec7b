"""The project's exception types.

Errors a user can cause (a bad config field, a missing or corrupt checkpoint, an
architecture we do not support) raise one of these, with a message naming the field or
file and the fix. Programming errors inside the library stay ordinary exceptions.
"""


class MpqError(Exception):
    """Base class of every error mpq-jax raises on purpose."""


class ConfigError(MpqError):
    """A configuration value is missing, of the wrong type, or out of range."""


class CheckpointError(MpqError):
    """A checkpoint cannot be read or written (missing file, bad format, wrong shape)."""


class UnsupportedArchitectureError(MpqError):
    """The model's architecture is not one mpq-jax implements."""


class EvaluationError(MpqError):
    """An evaluation produced no usable number (a non-finite perplexity or score)."""
