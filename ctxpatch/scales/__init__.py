"""Scales: a factor kappa_i on a query's dot products. One file per method."""

from . import logn  # noqa: F401  (registration)
