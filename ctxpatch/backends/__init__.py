"""Attention backends: `dense` (reference), `blockwise` (default, linear memory), `flex`."""

from __future__ import annotations

from typing import Callable

from ..errors import UnknownBackendError
from .blockwise import blockwise_attention
from .dense import dense_attention

BACKENDS: dict[str, Callable] = {"dense": dense_attention, "blockwise": blockwise_attention}
NAMES = ("blockwise", "dense", "flex")  # every backend, flex included (imported on first use)


def check_backend(name: str) -> str:
    """`name` when it names a backend (nothing imported), else `UnknownBackendError`."""
    if name not in NAMES:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def get_backend(name: str) -> Callable:
    if name == "flex":
        from .flex import flex_attention_backend

        return flex_attention_backend
    return BACKENDS[check_backend(name)]
