"""Biases: an additive term b_h(i, j) of the score. One file per method."""

from . import alibi, kerple, sandwich  # noqa: F401  (registration)
