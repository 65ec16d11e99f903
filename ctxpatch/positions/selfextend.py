"""`selfextend`: Δ if Δ < W else (⌊i/G⌋ − ⌊j/G⌋) + W − ⌊W/G⌋.

Neighbour attention keeps the true positions; beyond W, grouped attention maps positions to
floor(p / G), shifted so the two meet at W. Paper: Jin et al., "LLM Maybe LongLM: Self-Extend LLM
Context Window Without Tuning" (arXiv:2401.01325), ICML 2024.
"""

import torch
from torch import Tensor

from ..kinds import TwoViewRule
from ..registry import ModelInfo, Param, from_model, positive_int, register


@register
class SelfExtend(TwoViewRule):
    """SelfExtend: grouped positions beyond a neighbour window."""

    name = "selfextend"
    paper = "LLM Maybe LongLM / SelfExtend (Jin et al., ICML 2024)"
    definition = "Δ if Δ < W, else ⌊i/G⌋ − ⌊j/G⌋ + W − ⌊W/G⌋"
    params = (
        Param("window", from_model("L // 4", lambda m: max(1, m.train_len // 4)), positive_int, "W, neighbour window"),
        Param("group", 8, positive_int, "G, group size"),
    )

    def far_query(self, i: Tensor) -> Tensor:
        return torch.div(i, self.group, rounding_mode="floor") + (self.window - self.window // self.group)

    def far_key(self, j: Tensor) -> Tensor:
        return torch.div(j, self.group, rounding_mode="floor")

    def widest(self, target_len: int, group: int) -> int:
        """The largest grouped distance at `target_len` (SelfExtend's inequality: it must stay below L)."""
        return (target_len - 1) // group + self.window - self.window // group

    def target_values(self, info: ModelInfo, target_len: int) -> dict:
        return {"group": self.smallest_slowdown(info, lambda group: self.widest(target_len, group))}

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """The rule (W = L/4, the smallest G), W = L/8 and L/2 (G from the rule), and twice the rule's G."""
        group = cls().resolve(info, target_len).group
        return [{}, {"window": max(1, info.train_len // 8)}, {"window": info.train_len // 2}, {"group": 2 * group}]

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        widest = self.widest(target_len, self.group)
        if widest >= info.train_len:
            return f"at target_len={target_len} grouped distances reach {widest} >= L = {info.train_len}"
        return None
