"""Scoring sequences that begin alike: each sequence is fed in pieces of `piece` tokens at fixed offsets through the
KV cache, and the next one starts from the last one's cache, cropped to the pieces both computed alike.

A comparison's passkey prompts at one length share their filler up to the key (five depths, three keys a depth),
and a needle's depths share their haystack up to the needle: scored in token order, each computes only what
follows the last piece it shares with the one before. The pieces sit at multiples of `piece` whatever was scored
before, so a sequence's logits are the same bits whether its first pieces came from a cache or were computed (on
kernels that are deterministic, as the CPU's are), and a resumed or split comparison gives the scores of an
uninterrupted one. A prompt fed in pieces gives the logits of one forward, to rounding, under every ctxpatch patch
(tests/test_multiview.py, test_retrieval.py, test_sliding_window.py) but a rope that recomputes its frequencies from
each forward's length (transformers' dynamic and longrope scalings: `CtxpatchLM` then feeds sequences whole).
"""

from __future__ import annotations

from typing import Any

import torch

from .._compat import transformers as hf

PIECE = 8192  # tokens a piece, the grain at which sequences share a cached prefix; up to 8k tokens go whole


def piece_starts(length: int, keep: int, piece: int | None = PIECE) -> list[int]:
    """Where the pieces of a sequence of `length` tokens start, its last `keep` scored: at every multiple of
    `piece` up to the last one at or before `length - keep`, so that the scored positions lie in the last piece
    (`piece` None: one piece, for a model whose forward takes no cache)."""
    if piece is None:
        return [0]
    return list(range(0, max(length - keep, 0) // piece * piece + 1, piece))


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = (torch.tensor(a[:n], dtype=torch.long) != torch.tensor(b[:n], dtype=torch.long)).nonzero()
    return int(differ[0]) if differ.numel() else n


def reused_start(last: list[int], last_starts: list[int], ids: list[int], starts: list[int]) -> int:
    """Where ids' computing starts after the sequence `last` (0: from the beginning): the latest piece start of
    both with every token before it shared, so that the pieces before it were the same tokens fed alike."""
    shared, computed = shared_length(last, ids), set(last_starts)
    return max((s for s in starts if 0 < s <= shared and s in computed), default=0)


class PrefixCache:
    """The last sequence scored (its ids, piece starts and KV cache), lent to the next one. One model state only:
    a new patch means a new `PrefixCache`."""

    def __init__(self, piece: int | None = PIECE) -> None:
        self.piece, self.ids, self.starts, self.cache = piece, [], [], None

    def lend(self, ids: list[int], keep: int) -> tuple[Any, list[int]]:
        """(a cache holding ids' tokens before the first start, or None; the starts of the pieces to compute): the
        last sequence's cache, cropped to `reused_start`."""
        starts = piece_starts(len(ids), keep, self.piece)
        cache, last, last_starts = self.cache, self.ids, self.starts
        self.ids, self.starts, self.cache = [], [], None
        start = reused_start(last, last_starts, ids, starts) if cache is not None else 0
        if not start:
            return None, starts
        hf.crop_cache(cache, start)
        return cache, starts[starts.index(start) :]

    def remember(self, ids: list[int], keep: int, cache: Any) -> None:
        """Keep the cache a sequence's last piece returned, when it holds every key and can be cropped (not a
        sliding layer's or an evicting cache policy's)."""
        if hf.holds_every_key(cache, len(ids)):
            self.ids, self.starts, self.cache = ids, piece_starts(len(ids), keep, self.piece), cache
