"""`xpos`: RoPE with an exponential decay per rotary pair.

The contribution of pair k to q . k is multiplied by ζ_k^(Δ/γ), ζ_k = (2k/d_r + 0.4) / 1.4,
implemented by scaling q by ζ^((i - c)/γ) and k by ζ^(-(j - c)/γ). The backends choose the centre
c next to the queries they are computing (per query chunk, or the query itself when decoding),
so both factors stay near or below 1 and nothing overflows, bf16 included. Combines with any
other position rule. Paper: Sun et al., "A Length-Extrapolatable Transformer" (arXiv:2212.10554),
ACL 2023.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import PositionModifier
from ..registry import Param, positive_number, register
from ..rotary import RotaryLayout, expand_pairs


def xpos_zeta(rotary_dim: int) -> Tensor:
    return (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim + 0.4) / 1.4


@register
class XPos(PositionModifier):
    """XPOS: RoPE with a per-pair exponential decay in Δ."""

    training_free = False  # a RoPE model must be fine-tuned to use it: `ctxpatch tune` skips it

    name = "xpos"
    paper = "XPOS / LEX (Sun et al., ACL 2023)"
    definition = "pair k's contribution × ζ_k^(Δ/γ), ζ_k = (2k/d_r + 0.4)/1.4"
    params = (Param("scale_base", 512.0, positive_number, "γ"),)

    def factors(self, positions: Tensor, centre: Tensor, sign: int, layout: RotaryLayout, head_dim: int) -> Tensor:
        log_zeta = torch.log(xpos_zeta(layout.rotary_dim)).to(positions.device)  # (d_r/2,)
        exponent = sign * (positions - centre).to(torch.float64).unsqueeze(-1) / self.scale_base  # (B, T, 1)
        per_pair = torch.exp(exponent * log_zeta)  # (B, T, d_r/2)
        return expand_pairs(per_pair, layout, head_dim).unsqueeze(1)  # (B, 1, T, d), float64
