"""`alibi`: b_h(i, j) = -m_h (i - j), with the ALiBi paper's head slopes.

Paper: Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases Enables Input
Length Extrapolation" (arXiv:2108.12409), ICLR 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..kinds import Bias
from ..registry import register


def alibi_slopes(num_heads: int) -> Tensor:
    """m_h = 2^(-8h/H) for H a power of two; otherwise the paper's rule (slopes of the nearest
    lower power of two P, then every other slope of 2P)."""

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p) + power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


@register
class ALiBi(Bias):
    """Linear distance penalty per head."""

    training_free = False  # a RoPE model must be fine-tuned to use it: `ctxpatch tune` skips it

    name = "alibi"
    paper = "ALiBi (Press et al., ICLR 2022)"
    definition = "−m_h Δ, the ALiBi paper's slopes"

    def make_parameters(self, num_heads: int) -> dict[str, Tensor]:
        return {"slopes": alibi_slopes(num_heads)}

    def bias(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> Tensor:
        return -params["slopes"][h] * (i - j).to(torch.float32)

    def features(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        # -m (i - j) = m j - m i; the second term is constant along a query row
        f_q = params["slopes"][h].expand(*i.shape[:-1], h.shape[0], i.shape[-1]).unsqueeze(-1)  # (..., H, Tq, 1)
        f_k = j.to(torch.float64).unsqueeze(-2).unsqueeze(-1)  # (..., 1, Tk, 1)
        return f_q, f_k
