"""`rerope` and `leaky_rerope`: the relative position RoPE sees stops growing past a window.

    rerope:        Δ if Δ < W else W
    leaky_rerope:  Δ if Δ < W else W + (Δ - W) / k

Far pairs use q rotated at W (leaky: i/k + W - W/k) and k at 0 (leaky: j/k); the two views are
combined before the softmax. Paper: Su Jianlin, "Rectified Rotary Position Embeddings" (ReRoPE,
https://github.com/bojone/rerope and kexue.fm/archives/9708), 2023.
"""

from torch import Tensor

from ..kinds import TwoViewRule
from ..registry import ModelInfo, Param, at_least, from_model, positive_int, register


def window_grid(info: ModelInfo) -> list[dict]:
    return [{}, {"window": max(1, info.train_len // 4)}, {"window": max(1, 3 * info.train_len // 4)}]


@register
class ReRoPE(TwoViewRule):
    """ReRoPE: relative positions clipped at W."""

    name = "rerope"
    paper = "ReRoPE (Su, 2023)"
    definition = "RoPE sees Δ if Δ < W, else W"
    params = (Param("window", from_model("L // 2", lambda m: max(1, m.train_len // 2)), positive_int, "W"),)

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """W = L/2 (the default) and its neighbours L/4 and 3L/4."""
        return window_grid(info)

    def far_query(self, i: Tensor) -> Tensor:
        return i * 0 + self.window

    def far_key(self, j: Tensor) -> Tensor:
        return j * 0

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        if self.window >= info.train_len:
            return f"window={self.window} >= L = {info.train_len}: distances up to it are outside the trained length"
        return None


@register
class LeakyReRoPE(TwoViewRule):
    """Leaky ReRoPE: relative positions past W grow k times slower."""

    name = "leaky_rerope"
    paper = "ReRoPE (Su, 2023)"
    definition = "Δ if Δ < W, else W + (Δ − W)/k"
    params = (
        Param("window", from_model("L // 2", lambda m: max(1, m.train_len // 2)), positive_int, "W"),
        Param("leak", 16.0, at_least(1.0), "k, how much slower far positions grow"),
    )

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """W = L/2 (the default) and its neighbours L/4 and 3L/4, each with the leak the rule gives it."""
        return window_grid(info)

    def far_query(self, i: Tensor) -> Tensor:
        return i.double() / self.leak + (self.window - self.window / self.leak)

    def far_key(self, j: Tensor) -> Tensor:
        return j.double() / self.leak

    def widest(self, target_len: int, leak: float) -> float:
        return self.window + (target_len - 1 - self.window) / leak

    def target_values(self, info: ModelInfo, target_len: int) -> dict:
        return {"leak": float(self.smallest_slowdown(info, lambda leak: self.widest(target_len, leak)))}

    def target_problem(self, info: ModelInfo, target_len: int) -> str | None:
        widest = self.widest(target_len, self.leak)
        if widest >= info.train_len:
            return f"at target_len={target_len} leaked distances reach {widest:.0f} >= L = {info.train_len}"
        return None
