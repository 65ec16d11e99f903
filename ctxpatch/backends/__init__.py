"""Attention backends: `dense` (reference), `blockwise` (default, linear memory), `flex`."""

from __future__ import annotations

from typing import Callable

from .blockwise import blockwise_attention
from .dense import dense_attention

BACKENDS: dict[str, Callable] = {"dense": dense_attention, "blockwise": blockwise_attention}


def get_backend(name: str) -> Callable:
    if name == "flex":
        from .flex import flex_attention_backend

        return flex_attention_backend
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of dense, blockwise, flex") from None
