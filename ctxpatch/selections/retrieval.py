"""`retrieval`: query-aware block retrieval. A query sees its local window, the first S keys, and the
keys of the k key blocks whose content scores highest for it; everything else is left out of the softmax.

    visible(i, j) = (Δ < W) or (j < S) or (⌊j/B⌋ is among the top k candidate blocks of query i)
    candidate b for i:  b·B ≤ i − W (the block has a key outside the window) and (b+1)·B ≤ i + 1 (complete)

Blocks are scored from un-rotated queries and keys (position-free, as ReAttention), through summaries of
`summary_size` consecutive keys (a block's parts, aligned at the block's start): `mean` is q · (the part's
mean key), `quest` is Quest's bound Σ_c max(q_c min_c, q_c max_c) over the part's per-channel minimum and
maximum; a block scores as its best part (as InfLLM scores a block by several representative keys: a short
needle in a long block is not averaged away). `per` says who shares a choice: each query head, each
key-value head (its query heads' part scores summed, the default), or the whole layer (InfLLM's choice).
Alone, every visible key outside the window is seen by RoPE at distance W (ReRoPE's cap); composed with a
position rule, that rule places the keys. Defaults: InfLLM's sinks and blocks scaled to L (S = B = L/64), with
the window's budget moved to the blocks, W = L/8 and k = 48, so S + W + k·B = 57L/64 ≤ L keys per query at any
length (InfLLM's own W = L/2, k = 16 found the needle at 32k in 0 of 3 held-out prompts, this 8 of 9; at 64k
it costs perplexity, ratio 1.10 against 1.005); parts of L/512 keys (8 a block).

Papers: Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient
Context Memory" (NeurIPS 2024); Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context
Processor" (2024); Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
(ICML 2024).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..kinds import PositionRule, Selection
from ..masking import GlobalTokens, MaskFunction, SlidingWindow, or_masks
from ..registry import ModelInfo, Param, from_model, method, non_negative_int, positive_int, register

SCORERS = ("mean", "quest")
SHARING = ("head", "kv_head", "layer")


def _one_of(*choices: str):
    return lambda value: None if value in choices else f"must be one of {', '.join(map(repr, choices))}"


def _floor(p: Tensor, size: int) -> Tensor:
    return torch.div(p, size, rounding_mode="floor")


def _sum_into_parts(keys: Tensor, part_of: Tensor, parts: int) -> Tensor:
    """(B, Hk, parts, d): the sum of each part's keys; keys (B, Hk, Tk, d), part_of (B, Tk). A row at a time: one
    index per key (index_add_) is several times faster than scatter_add_'s index per element."""
    total = keys.new_zeros(keys.shape[0], keys.shape[1], parts, keys.shape[-1])
    for b in range(keys.shape[0]):
        total[b].index_add_(1, part_of[b], keys[b])
    return total


MOST_BLOCKS = 48  # the default k's cap: at L = 8k it fills the trained length to 57L/64 with W = L/8


def _top_k(info: ModelInfo, values: dict) -> int:  # as many blocks as fit beside the sinks and window, at most MOST_BLOCKS
    room = info.train_len - values["sinks"] - values["local_window"]
    return max(0, min(MOST_BLOCKS, room // values["block_size"]))


@register
class Retrieval(Selection):
    """Query-aware block retrieval: window, sinks and the top-k key blocks by content."""

    name = "retrieval"
    paper = "InfLLM (Xiao et al., 2024); LongHeads (Lu et al., 2024); Quest (Tang et al., 2024)"
    definition = (
        "visible iff Δ < W, or j < S, or ⌊j/B⌋ is one of the k complete blocks before the window that score highest "
        "for the query (un-rotated q against the mean key or Quest bound of each part of summary_size keys, the "
        "block's best part); alone, keys outside the window are seen at distance W"
    )
    params = (
        Param("sinks", from_model("L // 64", lambda m: m.train_len // 64), non_negative_int, "S, first keys always seen"),
        Param("local_window", from_model("L // 8", lambda m: max(1, m.train_len // 8)), positive_int, "W"),
        Param("block_size", from_model("L // 64", lambda m: max(1, m.train_len // 64)), positive_int, "B"),
        Param("top_k", from_model(f"min({MOST_BLOCKS}, (L - S - W) // B)", _top_k), non_negative_int,
              "k, blocks each query chooses"),
        Param("scorer", "mean", _one_of(*SCORERS), "how a block is scored"),
        Param("per", "kv_head", _one_of(*SHARING), "who shares a choice"),
        Param("summary_size", from_model("L // 512", lambda m: max(1, m.train_len // 512)), positive_int,
              "keys per part; a block scores as its best part"),
    )

    @property
    def block(self) -> int:
        return self.block_size

    @property
    def count(self) -> int:
        return self.top_k

    @property
    def sharing(self) -> str:
        return self.per

    @property
    def parts(self) -> int:
        return -(-self.block_size // min(self.summary_size, self.block_size))

    @property
    def linear(self) -> bool:
        return self.scorer == "mean"

    def part_of(self, positions: Tensor) -> Tensor:
        p = positions.clamp(min=0)
        block = _floor(p, self.block_size)
        return (block * self.parts + _floor(p - block * self.block_size, self.summary_size)).long()

    def check_together(self, info: ModelInfo) -> None:
        if self.local_window >= info.train_len:
            raise ValueError(
                f"retrieval: local_window={self.local_window} must be below the trained length {info.train_len} "
                "(keys outside the window are seen at distance W)"
            )
        seen = self.sinks + self.local_window + self.top_k * self.block_size
        if seen > info.train_len:
            warnings.warn(
                f"retrieval: sinks + local_window + top_k * block_size = {seen} keys per query, more than the "
                f"{info.train_len} the model was trained on",
                UserWarning, stacklevel=6,
            )

    @classmethod
    def candidate_grid(cls, info: ModelInfo, target_len: int) -> list[dict]:
        """The default, InfLLM's own window and block count scaled to L (W = L/2, k = 16), and Quest's scorer."""
        return [{}, {"local_window": max(1, info.train_len // 2), "top_k": 16}, {"scorer": "quest"}]

    def default_position(self, info: ModelInfo) -> PositionRule:
        return method("rerope", window=self.local_window).resolve(info)

    def shown(self) -> MaskFunction:
        return or_masks(SlidingWindow(self.local_window), GlobalTokens(self.sinks))

    def candidates(self, i: Tensor, blocks: Tensor) -> Tensor:
        start = blocks * self.block_size
        return (start <= i - self.local_window) & (start + self.block_size <= i + 1)

    def summarize(self, keys: Tensor, part_of: Tensor, real: Tensor, parts: int) -> dict[str, Tensor]:
        batch, kv_heads, _, dim = keys.shape
        shape = (batch, kv_heads, parts, dim)
        fill = real[:, None, :, None]
        if self.scorer == "mean":
            total = _sum_into_parts(keys if bool(real.all()) else keys.masked_fill(~fill, 0), part_of, parts)
            count = real.to(keys.dtype).new_zeros(batch, parts).scatter_add_(1, part_of, real.to(keys.dtype))
            return {"mean": total / count.clamp(min=1)[:, None, :, None]}
        index = part_of[:, None, :, None].expand_as(keys)  # (B, Hk, Tk, d)
        low = keys.new_full(shape, float("inf")).scatter_reduce_(2, index, keys.masked_fill(~fill, float("inf")), "amin")
        high = keys.new_full(shape, -float("inf")).scatter_reduce_(
            2, index, keys.masked_fill(~fill, -float("inf")), "amax"
        )
        return {"low": low.nan_to_num(posinf=0.0), "high": high.nan_to_num(neginf=0.0)}

    def score(self, q: Tensor, summary: dict[str, Tensor]) -> Tensor:
        if self.scorer == "mean":
            return q @ summary["mean"][:, :, None].transpose(-1, -2)
        high, low = summary["high"][:, :, None].transpose(-1, -2), summary["low"][:, :, None].transpose(-1, -2)
        return q.clamp(min=0) @ high + q.clamp(max=0) @ low  # (B, Hk, G, Tq, parts)
