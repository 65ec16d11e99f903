"""Small helpers every backend shares (the layer runtime itself is ctxpatch.plan's)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import compute_dtype

__all__ = ["as_slice", "column_count", "compute_dtype", "head_index", "soft_cap"]


def head_index(num_heads: int, device: torch.device) -> Tensor:
    return torch.arange(num_heads, device=device).view(num_heads, 1, 1)  # (H, 1, 1) broadcasts over (Tq, Tk)


def as_slice(columns: Tensor) -> Tensor | slice:
    """A slice when the columns are one contiguous run (a view, not a copy, when indexing)."""
    if not columns.numel():
        return columns
    first, last = columns[[0, -1]].tolist()  # one transfer for both ends
    return slice(first, last + 1) if last - first + 1 == columns.numel() else columns


def column_count(cols: Tensor | slice, total: int) -> int:
    """How many of `total` columns an index (slice or tensor) picks."""
    return len(range(total)[cols]) if isinstance(cols, slice) else cols.numel()


def soft_cap(scores: Tensor, cap: float | None) -> Tensor:
    """The model's attention-logit soft-capping (Gemma 2): c·tanh(s/c) of the scaled scores, before biases."""
    return scores if cap is None else torch.tanh(scores / cap) * cap
