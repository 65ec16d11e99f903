"""`string`: STRING, the well-trained small distances shifted onto the far keys.

RoPE sees Δ if Δ < S, else Δ − S + W: near pairs keep their distance, far pairs are seen S − W
closer, so the largest distance shown at length T is T − 1 − S + W. Paper: An et al., "Why Does
the Effective Context Length of LLMs Fall Short?" (arXiv:2410.18745), ICLR 2025.
"""

from __future__ import annotations

from torch import Tensor

from ..kinds import TwoViewRule, identity
from ..registry import ModelInfo, Param, from_model, non_negative_int, positive_int, register


@register
class String(TwoViewRule):
    """STRING: distances past S shifted down by S − W."""

    name = "string"
    definition = "Δ if Δ < S, else Δ − S + W; valid iff 0 ≤ W < S ≤ L"
    paper = "STRING (An et al., ICLR 2025)"
    params = (
        Param("offset", from_model("L // 3", lambda m: max(1, m.train_len // 3)), positive_int, "S, the shift"),
        Param(
            "local_window",
            from_model("min(128, S // 2)", lambda m, v: min(128, v["offset"] // 2)),
            non_negative_int,
            "W, where shifted distances start",
        ),
    )

    @property
    def threshold(self) -> int:
        return self.offset

    def check_together(self, info: ModelInfo) -> None:
        if not 0 <= self.local_window < self.offset <= info.train_len:
            raise ValueError(
                f"string: offset={self.offset}, local_window={self.local_window} need "
                f"0 <= local_window < offset <= {info.train_len} (the trained length)"
            )

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """The rule's W (min(128, L/6)), half and twice it; S from the rule for each."""
        w = cls().resolve(info).local_window
        return [{}] + [{"local_window": v} for v in (w // 2, 2 * w) if v > 0]

    def far_query(self, i: Tensor) -> Tensor:
        return i - (self.offset - self.local_window)

    far_key = staticmethod(identity)  # the near view's own map, so both views share one rotation of the keys

    def target_values(self, info: ModelInfo, target_len: int) -> dict:
        train_len, w = info.train_len, self.local_window
        if target_len <= train_len:
            return {}
        if target_len > 2 * train_len - w:
            raise ValueError(
                f"string reaches at most 2L - W = {2 * train_len - w} tokens (L = {train_len}); "
                f"target_len={target_len} needs a rule that remaps far distances (selfextend, dca)"
            )
        return {"offset": target_len - train_len + w, "local_window": w}

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        widest = target_len - 1 - self.offset + self.local_window
        if target_len > info.train_len and widest >= info.train_len:
            return f"at target_len={target_len} RoPE would see distances up to {widest} >= L = {info.train_len}"
        return None
