"""`logn`: log-n attention scaling, kappa_i = max(1, ln(i + 1) / ln L).

Keeps the attention entropy steady when a query sees more keys than in training. Paper: Chiang &
Cholak, "Overcoming a Theoretical Limitation of Self-Attention" (arXiv:2202.12172), 2022; the
max(1, .) form follows Su's "Transformer升级之路" blog series that DESIGN.md's article surveys.
"""

import math

import torch
from torch import Tensor

from ..kinds import Scale
from ..registry import Param, at_least, from_model, register


@register
class LogN(Scale):
    """log-n scaling of the query beyond the trained length."""

    name = "logn"
    paper = "Chiang & Cholak, 2022; Su, 2021"
    definition = "κ_i = max(1, ln(i+1) / ln L)"
    params = (Param("train_len", from_model("L", lambda m: m.train_len), at_least(2), "L"),)

    def scale(self, i: Tensor) -> Tensor:
        return torch.clamp(torch.log(i.to(torch.float32) + 1) / math.log(self.train_len), min=1.0)
