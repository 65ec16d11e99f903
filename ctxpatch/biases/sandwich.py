"""`sandwich`: b_h = (sum_{k<D/2} cos((i - j) 10000^(-2k/D)) - D/2) * H / (8h).

The parameter-free sinusoidal bias ("Sandwich"). Paper: Chi, Fan, Rudnicky, Ramadge, "Dissecting
Transformer Length Extrapolation via the Lens of Receptive Field Analysis" (arXiv:2212.10356),
ACL 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import Bias
from ..registry import Param, positive_int, register


@register
class Sandwich(Bias):
    """Sinusoidal relative bias, no parameters to learn."""

    training_free = False  # a RoPE model must be fine-tuned to use it: `ctxpatch tune` skips it

    name = "sandwich"
    paper = "Sandwich (Chi et al., ACL 2023)"
    definition = "(Σ_k cos(Δ·10000^(−2k/D)) − D/2)·H/(8h)"
    params = (Param("sandwich_dim", 128, positive_int, "D, even"),)

    def check_together(self, info) -> None:
        if self.sandwich_dim % 2:
            raise ValueError(f"sandwich: sandwich_dim={self.sandwich_dim} must be even")

    def make_parameters(self, num_heads: int) -> dict[str, Tensor]:
        d = self.sandwich_dim
        omega = 10000.0 ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
        head_weight = num_heads / (8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64))
        return {"omega": omega, "head_weight": head_weight}

    def bias(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> Tensor:
        delta = (i - j).to(torch.float64).unsqueeze(-1)  # (..., 1): one angle per frequency
        waves = torch.cos(delta * params["omega"]).sum(-1) - self.sandwich_dim / 2
        return (waves * params["head_weight"][h]).to(torch.float32)

    def features(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        # sum_k cos((i-j) w_k) = sum_k cos(i w_k) cos(j w_k) + sin(i w_k) sin(j w_k); angles in float64
        def waves(p: Tensor) -> Tensor:
            angle = p.to(torch.float64).unsqueeze(-1) * params["omega"]  # (..., T, D/2)
            return torch.cat([angle.cos(), angle.sin()], dim=-1)  # (..., T, D)

        weight = params["head_weight"][h].unsqueeze(-1)  # (H, 1, 1)
        f_q = waves(i).unsqueeze(-3) * weight  # (..., H, Tq, D)
        f_k = waves(j).unsqueeze(-3)  # (..., 1, Tk, D)
        return f_q, f_k
