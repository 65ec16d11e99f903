"""`hybrid`: a sliding window plus global (sink) tokens plus random key blocks.

Visible iff 0 <= i - j < W, or j < G, or j lies in one of the R key blocks (blocks of B positions)
drawn for i's query block, without replacement, among whole key blocks that end before that
block's window; the draw is deterministic in `seed` and the query-block index.

Paper: Zaheer et al., "Big Bird: Transformers for Longer Sequences" (arXiv:2007.14062), 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import Mask
from ..registry import Param, from_model, non_negative_int, positive_int, register
from .window import window_blocks_all_visible, window_blocks_visible, window_visible


def random_block_table(num_query_blocks: int, window: int, block: int, count: int, seed: int) -> Tensor:
    """(num_query_blocks, count) key-block indices drawn per query block, -1 where there are fewer."""
    table = torch.full((num_query_blocks, max(count, 1)), -1, dtype=torch.long)
    for qb in range(num_query_blocks):
        candidates = max(0, (qb * block - window + 1) // block)  # blocks whose last position < qb*B - W + 1
        if candidates and count:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + qb)
            drawn = torch.randperm(candidates, generator=generator)[:count]
            table[qb, : drawn.numel()] = drawn
    return table


@register
class Hybrid(Mask):
    """Window + global tokens + random key blocks (BigBird-style)."""

    name = "hybrid"
    paper = "Big Bird (Zaheer et al., 2020)"
    params = (
        Param("window", from_model("L", lambda m: m.train_len), positive_int, "W"),
        Param("global_tokens", 4, non_negative_int, "G, first positions every query sees"),
        Param("random_blocks", 0, non_negative_int, "R, random key blocks per query block"),
        Param("block_size", 64, positive_int, "B, size of a random block"),
        Param("seed", 0, non_negative_int, "seed of the random draw"),
    )

    def prepare(self, max_position: int, device: torch.device) -> None:
        """Make sure the random-block table covers positions up to `max_position`."""
        needed = max_position // self.block_size + 1
        table = self.__dict__.get("_table")
        if table is None or table.shape[0] < needed or table.device != device:
            size = max(needed, 0 if table is None else table.shape[0])
            table = random_block_table(size, self.window, self.block_size, self.random_blocks, self.seed)
            self.__dict__["_table"] = table.to(device)

    def _random(self, i: Tensor, j: Tensor) -> Tensor:
        # the table must cover i: backends call `prepare` before evaluating the mask
        query_block = torch.div(i, self.block_size, rounding_mode="floor").long()  # fractional i: its floor's block
        drawn = self._table[query_block]  # (..., Tq, 1, R) when i is (..., Tq, 1)
        return (drawn == (j // self.block_size).unsqueeze(-1)).any(-1)

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        seen = window_visible(i, j, self.window) | ((j < self.global_tokens) & (j <= i))
        if self.random_blocks:
            seen = seen | ((j <= i) & self._random(i, j))
        return seen

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        seen = window_blocks_visible(i_lo, i_hi, j_lo, j_hi, self.window) | (j_lo < self.global_tokens)
        if self.random_blocks:
            seen = seen | self._random_blocks_visible(i_lo, i_hi, j_lo, j_hi)
        return seen & (j_lo <= i_hi)

    def blocks_all_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        causal = j_hi <= i_lo
        return window_blocks_all_visible(i_lo, i_hi, j_lo, j_hi, self.window) | (causal & (j_hi < self.global_tokens))

    def _random_blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        self.prepare(int(i_hi.max()), i_hi.device)
        b = self.block_size
        i_lo, i_hi, j_lo, j_hi = torch.broadcast_tensors(i_lo, i_hi, j_lo, j_hi)
        out = torch.zeros_like(j_lo, dtype=torch.bool)
        for row in range(i_lo.shape[0]):  # one row per sequence: its query range against every key range
            drawn = self._table[int(i_lo[row].min()) // b : int(i_hi[row].max()) // b + 1].flatten()
            drawn = drawn[drawn >= 0]
            if drawn.numel():
                starts = drawn * b  # (C,)
                out[row] = ((starts <= j_hi[row, ..., None]) & (starts + b - 1 >= j_lo[row, ..., None])).any(-1)
        return out

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, self.window + self.global_tokens + self.random_blocks * self.block_size)
