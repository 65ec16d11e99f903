"""`kerple_log` and `kerple_power`: KERPLE's conditionally positive definite kernels as biases.

    kerple_log:   b_h = -r1_h ln(1 + r2_h (i - j))
    kerple_power: b_h = -r1_h (i - j)^r2_h,   0 < r2 <= 2

r1, r2 are per-head trainable parameters of the patched model (clamped into their range on use).
Paper: Chi, Fan, Ramadge, Rudnicky, "KERPLE: Kernelized Relative Positional Embedding for Length
Extrapolation" (arXiv:2205.09921), NeurIPS 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kinds import Bias
from ..registry import Param, number_in, positive_number, register

_EPS = 1e-4


def _per_head(value: float, num_heads: int) -> nn.Parameter:
    return nn.Parameter(torch.full((num_heads,), float(value), dtype=torch.float32))


def _delta(i: Tensor, j: Tensor) -> Tensor:
    return (i - j).to(torch.float32).clamp(min=0)  # pairs with j > i are masked; keep them finite


class _Kerple(Bias):
    training_free = False  # a RoPE model must be fine-tuned to use it: `ctxpatch tune` skips it

    def make_parameters(self, num_heads: int) -> dict[str, Tensor]:
        return {"r1": _per_head(self.r1, num_heads), "r2": _per_head(self.r2, num_heads)}


@register
class KerpleLog(_Kerple):
    """KERPLE logarithmic kernel, trainable per head."""

    name = "kerple_log"
    paper = "KERPLE (Chi et al., NeurIPS 2022)"
    definition = "−r1_h ln(1 + r2_h Δ), trainable"
    params = (
        Param("r1", 1.0, positive_number, "initial r1 (> 0)"),
        Param("r2", 1.0, positive_number, "initial r2 (> 0)"),
    )

    def bias(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> Tensor:
        r1 = params["r1"].clamp(min=_EPS)[h]
        r2 = params["r2"].clamp(min=_EPS)[h]
        return -r1 * torch.log1p(r2 * _delta(i, j))


@register
class KerplePower(_Kerple):
    """KERPLE power kernel, trainable per head."""

    name = "kerple_power"
    paper = "KERPLE (Chi et al., NeurIPS 2022)"
    definition = "−r1_h Δ^r2_h, 0 < r2 ≤ 2, trainable"
    params = (
        Param("r1", 1.0, positive_number, "initial r1 (> 0)"),
        Param("r2", 1.0, number_in(0, 2), "initial r2, in (0, 2]"),
    )

    def bias(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> Tensor:
        r1 = params["r1"].clamp(min=_EPS)[h]
        r2 = params["r2"].clamp(min=_EPS, max=2.0)[h]
        delta = _delta(i, j)
        # delta ** r2 written so that its gradient in r2 is finite at delta = 0
        powered = torch.exp(r2 * torch.log(delta.clamp(min=_EPS)))
        return -r1 * torch.where(delta > 0, powered, torch.zeros_like(powered))
