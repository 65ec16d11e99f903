"""Masks: which (i, j) pairs a query may attend to. One file per method."""

from . import bca, hybrid, window  # noqa: F401  (registration)
