"""Small helpers every backend shares (the layer runtime itself is ctxpatch.plan's)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..plan import compute_dtype

__all__ = ["compute_dtype", "head_index"]


def head_index(num_heads: int, device: torch.device) -> Tensor:
    return torch.arange(num_heads, device=device).view(num_heads, 1, 1)  # (H, 1, 1) broadcasts over (Tq, Tk)
