"""`rerope` and `leaky_rerope`: the relative position RoPE sees stops growing past a window.

    rerope:        Δ if Δ < W else W
    leaky_rerope:  Δ if Δ < W else W + (Δ - W) / k

Far pairs use q rotated at W (leaky: i/k + W - W/k) and k at 0 (leaky: j/k); the two views are
combined before the softmax. Paper: Su Jianlin, "Rectified Rotary Position Embeddings" (ReRoPE,
https://github.com/bojone/rerope and kexue.fm/archives/9708), 2023.
"""

from torch import Tensor

from ..kinds import TwoViewRule
from ..registry import Param, at_least, from_model, positive_int, register


@register
class ReRoPE(TwoViewRule):
    """ReRoPE: relative positions clipped at W."""

    name = "rerope"
    paper = "ReRoPE (Su, 2023)"
    definition = "RoPE sees Δ if Δ < W, else W"
    params = (Param("window", from_model("L // 2", lambda m: max(1, m.train_len // 2)), positive_int, "W"),)

    def far_query(self, i: Tensor) -> Tensor:
        return i * 0 + self.window

    def far_key(self, j: Tensor) -> Tensor:
        return j * 0


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

    def far_query(self, i: Tensor) -> Tensor:
        return i.double() / self.leak + (self.window - self.window / self.leak)

    def far_key(self, j: Tensor) -> Tensor:
        return j.double() / self.leak
