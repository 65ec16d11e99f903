"""Position rules: what replaces R(i)q . R(j)k. One file per method (or per family)."""

from . import rerope, rope_scaling, selfextend, xpos  # noqa: F401  (registration)
