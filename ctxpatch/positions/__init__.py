"""Position rules: what replaces R(i)q . R(j)k. One file per method (or per family)."""

from . import rope_scaling  # noqa: F401  (registration)
