"""`sinks`: StreamingLLM. The KV cache keeps the first S and the last W tokens, and positions are
assigned inside the cache, so generation runs for ever at constant memory.

Inside the cache the newest token sits at slot min(i, S + W - 1): a window key is seen at its
true distance Δ, and a sink key j at min(i, S + W - 1) - j. A full forward applies the same rule
(a window-or-sink mask plus that position rule), so a long prompt read in one pass and a
generation that evicted as it went see exactly the same thing. Paper: Xiao et al., "Efficient
Streaming Language Models with Attention Sinks" (arXiv:2309.17453), ICLR 2024.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import CachePolicy, Mask, TwoViewRule
from ..masking import GlobalTokens, MaskFunction, SlidingWindow, or_masks
from ..registry import Param, from_model, non_negative_int, positive_int, register


@register
class Sinks(CachePolicy, TwoViewRule, Mask):
    """StreamingLLM: keep S sink tokens and the last W, positions inside the cache."""

    name = "sinks"
    kind = "cache"
    paper = "StreamingLLM (Xiao et al., ICLR 2024)"
    definition = "StreamingLLM: the cache keeps the first S and the last W tokens; positions inside the cache (a mask and a position rule too)"
    params = (
        Param("global_tokens", 4, non_negative_int, "S, sink tokens kept"),
        Param("window", from_model("L - S", lambda m, v: max(1, m.train_len - v["global_tokens"])), positive_int, "W, recent tokens kept"),
    )

    # ---- as a mask: the window or the sinks --------------------------------------------------

    def expression(self) -> MaskFunction:
        return or_masks(SlidingWindow(self.window), GlobalTokens(self.global_tokens))

    # ---- as a position rule: sinks seen from the query's slot in the cache ------------------

    def far_query(self, i: Tensor) -> Tensor:
        return torch.clamp(i, max=self.global_tokens + self.window - 1)

    def far_key(self, j: Tensor) -> Tensor:
        return j

    # ---- as a cache policy --------------------------------------------------------------------

    def keep(self, positions: Tensor, real: Tensor) -> Tensor | None:
        """Per row: its first S real keys (the sinks) and the last W keys."""
        batch, n = positions.shape
        if n <= self.global_tokens + self.window:
            return None
        index = torch.arange(n, device=positions.device).expand(batch, n)
        recent = index[:, n - self.window :]
        # real keys before the recent ones come first, in order; padding only fills rows short of S
        rank = torch.where(real & (index < n - self.window), index, index + n)
        sinks = rank.argsort(dim=-1)[:, : self.global_tokens].sort(dim=-1).values
        return torch.cat([sinks, recent], dim=-1)  # (B, S + W)
