"""A selection's choices for one attention call (DESIGN.md, "Selection"): per-block summaries of the keys made
once per call, and per query chunk the blocks each query (or each head group) chooses. Every backend asks this
module which pairs a selection lets through, so dense, blockwise and flex see the same choices."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import Selection
from ..plan import AttentionCall
from .common import compute_dtype


class BlockChoice:
    """The blocks of one call's keys and what each query chooses among them (`chosen`)."""

    def __init__(self, selection: Selection, k: Tensor, call: AttentionCall):
        self.selection, self.kv_heads, self.k_pos = selection, k.shape[1], call.k_pos
        real = call.key_padding if call.key_padding is not None else torch.ones_like(call.k_pos, dtype=torch.bool)
        self.block_of = torch.div(call.k_pos, selection.block, rounding_mode="floor").long().clamp(min=0)  # (B, Tk)
        self.blocks = int(self.block_of.max()) + 1
        counts = torch.zeros(real.shape[0], self.blocks, device=k.device).scatter_add_(1, self.block_of, real.float())
        self.occupied = counts > 0  # (B, nb): blocks holding a real key
        self.summary = selection.summarize(k.to(compute_dtype(k)), self.block_of, real, self.blocks)

    def chosen(self, q: Tensor, i: Tensor) -> Tensor:
        """(B, Hs, C, nb) bool: the blocks each query chooses; q (B, H, C, d) un-rotated, i (B, C) its positions.
        Hs is H, Hk or 1 as the selection's `per` says."""
        batch, heads, rows, dim = q.shape
        groups = heads // self.kv_heads
        grouped = q.to(compute_dtype(q)).view(batch, self.kv_heads, groups, rows, dim)  # (B, Hk, G, C, d)
        scores = self.selection.score(grouped, self.summary)  # (B, Hk, G, C, nb)
        per = self.selection.per
        if per == "head":
            scores = scores.reshape(batch, heads, rows, self.blocks)  # (B, H, C, nb)
        else:
            scores = scores.sum(2) if per == "kv_head" else scores.sum((1, 2))[:, None]  # (B, Hk or 1, C, nb)
        blocks = torch.arange(self.blocks, device=q.device)
        allowed = self.selection.candidates(i[:, None, :, None], blocks) & self.occupied[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
        count = min(self.selection.count, self.blocks)
        chosen = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
        if count == 0:
            return chosen
        # a stable sort: equal scores (identical blocks of repeated text) go to the earlier block, in every schedule
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
        return chosen.scatter_(-1, order, scores.gather(-1, order) > float("-inf"))

    def visible(self, chosen: Tensor, i: Tensor, j: Tensor, key_blocks: Tensor) -> Tensor:
        """(B, Hs, C, K): pairs the selection lets through; i (B, 1, C, 1), j and key_blocks (B, 1, 1, K)."""
        shape = (*chosen.shape[:3], key_blocks.shape[-1])
        picked = chosen.gather(-1, key_blocks.expand(shape))
        return picked | self.selection.always_visible(i, j)

    def columns(self, chosen: Tensor, i: Tensor, keys: int) -> Tensor:
        """(keys,) bool: the first `keys` keys some query of the chunk may see (any row, any head); i (B, C)."""
        picked = chosen.any(2).any(1)  # (B, nb)
        hit = picked.gather(1, self.block_of[:, :keys])
        j = self.k_pos[:, :keys]
        reach = self.selection.reachable(i.amin(-1, keepdim=True), i.amax(-1, keepdim=True), j)  # (B, keys)
        return (hit | reach).any(0)


def expand_heads(seen: Tensor, heads: int) -> Tensor:
    """(B, Hs, ...) -> broadcastable to (B, H, ...): a key-value head's choice repeated for its query heads."""
    if seen.shape[1] in (1, heads):
        return seen
    return seen.repeat_interleave(heads // seen.shape[1], dim=1)
