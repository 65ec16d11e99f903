"""`hybrid`: a sliding window plus global (sink) tokens plus random key blocks.

Visible iff 0 <= i - j < W, or j < G, or j lies in one of the R key blocks (blocks of B positions)
drawn for i's query block, without replacement, among whole key blocks that end before that
block's window; the draw is deterministic in `seed` and the query-block index qb: the first R of
`torch.randperm(candidates)` with a generator seeded seed * 1_000_003 + qb. As a mask expression it
is window | global tokens | random blocks (ctxpatch.masking.or_masks).

Paper: Zaheer et al., "Big Bird: Transformers for Longer Sequences" (arXiv:2007.14062), 2020.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kinds import Mask
from ..masking import GlobalTokens, MaskFunction, SlidingWindow, or_masks
from ..registry import Param, from_model, non_negative_int, positive_int, register


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


def drawn_counts(table: Tensor) -> Tensor:
    """2D prefix counts (Q + 1, Q + 1) of the (query block, key block) pairs drawn: entry [a, b] counts
    the pairs with query block < a and key block < b, so any rectangle is four lookups. Q^2 int32s:
    16 MiB at 128k positions in blocks of 64."""
    num = table.shape[0]
    drawn = torch.zeros(num, num + 1, dtype=torch.int32)  # (Q, Q + 1): column Q collects the -1 fillers
    rows = torch.arange(num)[:, None].expand_as(table)
    drawn[rows, torch.where(table >= 0, table, num)] = 1
    counts = torch.zeros(num + 1, num + 1, dtype=torch.int32)
    counts[1:, 1:] = drawn[:, :num].cumsum(0).cumsum(1)
    return counts


class RandomBlocks(MaskFunction):
    """j in one of the key blocks drawn for i's query block (and j <= i). The table and its prefix
    counts are made once per device and grown as positions grow; every layer shares them."""

    def __init__(self, window: int, block: int, count: int, seed: int):
        self.window, self.block, self.count, self.seed = window, block, count, seed
        self.tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def prepare(self, *positions: Tensor) -> None:
        device = positions[0].device
        needed = int(max(p.max() for p in positions)) // self.block + 1  # one sync per call, not per chunk
        held = self.tables.get(device)
        if held is None or held[0].shape[0] < needed:
            table = random_block_table(needed, self.window, self.block, self.count, self.seed)
            self.tables[device] = (table.to(device), drawn_counts(table).to(device))

    def _held(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # backends call `prepare` with every position of the call before evaluating the mask
        return self.tables[device]

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        table, _ = self._held(i.device)
        drawn = table[torch.div(i, self.block, rounding_mode="floor").long()]  # (..., Tq, 1, R); fractional i: its floor's block
        return (j <= i) & (drawn == (j // self.block).unsqueeze(-1)).any(-1)

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        _, counts = self._held(i_lo.device)
        last = counts.shape[0] - 1
        b = self.block
        # query blocks [q0, q1], key blocks [k0, k1], clamped to the table (empty key blocks carry sentinels)
        q0, q1 = (i_lo // b).long().clamp(0, last), (i_hi // b).long().clamp(-1, last - 1)
        k0, k1 = (j_lo // b).long().clamp(0, last), (j_hi // b).long().clamp(-1, last - 1)
        q0, q1, k0, k1 = torch.broadcast_tensors(q0, q1, k0, k1)
        inside = counts[q1 + 1, k1 + 1] - counts[q0, k1 + 1] - counts[q1 + 1, k0] + counts[q0, k0]
        return (inside > 0) & (q1 >= q0) & (k1 >= k0) & (j_lo <= i_hi)

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, self.count * self.block)


@register
class Hybrid(Mask):
    """Window + global tokens + random key blocks (BigBird-style)."""

    name = "hybrid"
    paper = "Big Bird (Zaheer et al., 2020)"
    definition = "window, or j < G, or j in R random key blocks drawn per query block"
    params = (
        Param("window", from_model("L", lambda m: m.train_len), positive_int, "W"),
        Param("global_tokens", 4, non_negative_int, "G, first positions every query sees"),
        Param("random_blocks", 0, non_negative_int, "R, random key blocks per query block"),
        Param("block_size", 64, positive_int, "B, size of a random block"),
        Param("seed", 0, non_negative_int, "seed of the random draw"),
    )

    def expression(self) -> MaskFunction:
        random = None
        if self.random_blocks:
            random = RandomBlocks(self.window, self.block_size, self.random_blocks, self.seed)
        return or_masks(SlidingWindow(self.window), GlobalTokens(self.global_tokens), random)
