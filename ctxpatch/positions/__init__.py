"""Position rules: what replaces R(i)q . R(j)k. One file per method (or per family)."""

from . import dca, rerope, rope_scaling, selfextend, string, xpos  # noqa: F401  (registration)
