"""`dca`: Dual Chunk Attention, three views that keep every relative position below s + w < L.

Keys sit at j mod s. A query sits at i mod s for keys of its own chunk (⌊j/s⌋ = ⌊i/s⌋), at
min(i mod s + s, s + w) for keys of the previous chunk, and at s + w for keys of older chunks.
Defaults are ChunkLlama's `replace_with_chunkllama`: w = L // 8, s = ⌊3L/4⌋ − w. `⌊·⌋` and `mod` are
floor-based, so fractional training positions fall into the chunk their floor names.

Paper: An et al., "Training-Free Long-Context Scaling of Large Language Models" (ICML 2024),
https://github.com/HKUNLP/ChunkLlama.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import PositionRule
from ..registry import ModelInfo, Param, from_model, positive_int, register

INTRA, SUCCESSIVE, INTER = 0, 1, 2


def _chunk(p: Tensor, s: int) -> Tensor:
    return torch.div(p, s, rounding_mode="floor")


@register
class DualChunk(PositionRule):
    """Dual Chunk Attention: within-chunk, previous-chunk and older-chunk views."""

    name = "dca"
    definition = (
        "chunks of s tokens; RoPE sees key j at j mod s and query i at i mod s (same chunk), at min(i mod s + s, "
        "s + w) (previous chunk), at s + w (older chunks); valid iff 0 < w < s and s + w < L"
    )
    paper = "Dual Chunk Attention / ChunkLlama (An et al., ICML 2024)"
    params = (
        Param("local_window", from_model("L // 8", lambda m: max(1, m.train_len // 8)), positive_int, "w"),
        Param(
            "chunk_len",
            from_model("3L/4 - w", lambda m, v: max(1, 3 * m.train_len // 4 - v["local_window"])),
            positive_int,
            "s, tokens per chunk",
        ),
    )

    def check_together(self, info: ModelInfo) -> None:
        s, w, train_len = self.chunk_len, self.local_window, info.train_len
        if not 0 < w < s or s + w >= train_len:
            raise ValueError(
                f"dca: chunk_len={s}, local_window={w} need 0 < local_window < chunk_len and "
                f"chunk_len + local_window < {train_len} (the trained length); the defaults "
                f"(local_window = L // 8, chunk_len = 3L/4 - local_window) need L >= 16"
            )

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """ChunkLlama's defaults (w = L/8, s + w = 3L/4), a narrower w = L/16, and s + w = L/2 and 7L/8;
        pairs that break 0 < w < s, s + w < L are left out."""
        length = info.train_len
        pairs = [(length // 16, 3 * length // 4), (length // 8, length // 2), (length // 8, 7 * length // 8)]
        grid = [{}]
        for w, reach in pairs:
            if 0 < w < reach - w and reach < length:
                grid.append({"local_window": w, "chunk_len": reach - w})
        return grid

    def key(self, j: Tensor) -> Tensor:
        return torch.remainder(j, self.chunk_len)

    def intra_query(self, i: Tensor) -> Tensor:
        return torch.remainder(i, self.chunk_len)

    def successive_query(self, i: Tensor) -> Tensor:
        s, w = self.chunk_len, self.local_window
        return torch.clamp(torch.remainder(i, s) + s, max=s + w)

    def inter_query(self, i: Tensor) -> Tensor:
        return torch.full_like(i, self.chunk_len + self.local_window)

    def views(self):
        return ((self.intra_query, self.key), (self.successive_query, self.key), (self.inter_query, self.key))

    def select(self, i: Tensor, j: Tensor) -> Tensor:
        behind = _chunk(i, self.chunk_len) - _chunk(j, self.chunk_len)
        return torch.clamp(behind, INTRA, INTER).long()

    def views_needed(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> list[Tensor]:
        s = self.chunk_len
        fewest = _chunk(i_lo, s) - _chunk(j_hi, s)  # chunks between query and key, over the block
        most = _chunk(i_hi, s) - _chunk(j_lo, s)
        return [fewest <= INTRA, (fewest <= SUCCESSIVE) & (most >= SUCCESSIVE), most >= INTER]
