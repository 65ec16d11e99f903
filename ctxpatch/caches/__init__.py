"""Cache policies: what the KV cache keeps. One file per method."""

from . import sinks  # noqa: F401  (registration)
