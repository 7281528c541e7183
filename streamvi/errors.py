"""One exception hierarchy for streamvi.

Every error that is about *input* carries a short machine-readable ``reason``
(used as the ``reason`` label of ``streamvi_messages_rejected_total`` and in the
dead-letter file) and a human sentence that names the key or position, what was
wrong and what to do.
"""
from __future__ import annotations


class StreamviError(Exception):
    """Base class of every error streamvi raises on purpose."""


class ConfigError(StreamviError):
    """A configuration value (file key, flag, environment variable) is unusable."""


class InputError(StreamviError):
    """Input data was rejected.

    Parameters
    ----------
    reason
        Short snake_case label, stable across versions (metrics label value).
    message
        Human-readable explanation naming the key/position and the fix.
    """

    reason: str = "invalid"

    def __init__(self, message: str, *, reason: str | None = None, key: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.key = key


class WireError(InputError):
    """A wire message (DESIGN.md section 3) could not be accepted."""

    reason = "malformed"


class MalformedMessageError(WireError):
    """Not decodable as a msgpack map, or larger than the configured limit."""

    reason = "malformed_msgpack"


class SchemaError(WireError):
    """Unknown ``schema`` name or unsupported ``version``."""

    reason = "unknown_schema"


class MissingKeyError(WireError):
    """A required key is absent."""

    reason = "missing_key"


class FieldTypeError(WireError):
    """A value has the wrong type, array dtype or array layout."""

    reason = "wrong_type"


class ShapeMismatchError(WireError):
    """Per-reflection arrays of unequal length."""

    reason = "length_mismatch"


class ValueRangeError(WireError):
    """A value is outside what is physically sensible (cell, energy, …)."""

    reason = "out_of_range"
