"""Mask algebra, as transformers' `masking_utils` composes mask functions with `and_masks` / `or_masks`.

A `MaskFunction` says which (i, j) position pairs are visible, elementwise on broadcastable
position tensors, and bounds that answer for whole ranges i in [i_lo, i_hi], j in [j_lo, j_hi]:
`blocks_visible` (may some pair be visible? conservative: may say yes) and `blocks_all_visible`
(is every causal pair visible? conservative: may say no), which let the blockwise backend skip and
classify key blocks; and `max_keys`, how many keys one query can see at most.

Combining: `or_masks` ORs the pairs and the bounds and adds `max_keys`; `and_masks` ANDs them and
takes the smallest `max_keys`. Masks are on positions only: causality by index and a query seeing
itself are the runtime's (ctxpatch.plan.LayerRuntime).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _filled(value: bool, *bounds: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(*(b.shape for b in bounds))
    return torch.full(shape, value, dtype=torch.bool, device=bounds[0].device)


class MaskFunction:
    """Visibility of position pairs, with block bounds. The defaults are the most conservative."""

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        raise NotImplementedError

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        """May any pair with i in [i_lo, i_hi] and j in [j_lo, j_hi] be visible? (conservative)"""
        return _filled(True, i_lo, j_lo)

    def blocks_all_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        """Is every causal pair with i in [i_lo, i_hi], j in [j_lo, j_hi] visible? (conservative: may say no)"""
        return _filled(False, i_lo, j_lo)

    def max_keys(self, num_keys: int) -> int:
        """How many keys one query sees at most (sizes the blockwise backend's chunks)."""
        return num_keys

    def prepare(self, *positions: Tensor) -> None:
        """Size lookup tables for every position given (any shapes, one device) before a call
        (hybrid's random blocks); a mask without tables does nothing, so costs no sync."""


class Causal(MaskFunction):
    """j <= i."""

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        return j <= i

    def blocks_visible(self, i_lo, i_hi, j_lo, j_hi):
        return j_lo <= i_hi

    def blocks_all_visible(self, i_lo, i_hi, j_lo, j_hi):
        return j_hi <= i_lo


class SlidingWindow(MaskFunction):
    """0 <= i - j < W."""

    def __init__(self, window: int):
        self.window = window

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        delta = i - j
        return (delta >= 0) & (delta < self.window)

    def blocks_visible(self, i_lo, i_hi, j_lo, j_hi):
        # some pair has 0 <= i - j < W  <=>  the largest delta is >= 0 and the smallest is < W
        return (i_hi - j_lo >= 0) & (i_lo - j_hi < self.window)

    def blocks_all_visible(self, i_lo, i_hi, j_lo, j_hi):
        # every delta of the two ranges in [0, W): the smallest is >= 0 and the largest < W
        return (i_lo - j_hi >= 0) & (i_hi - j_lo < self.window)

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, self.window)


class GlobalTokens(MaskFunction):
    """j < G (and j <= i): the first G positions, seen by every query after them."""

    def __init__(self, count: int):
        self.count = count

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        return (j < self.count) & (j <= i)

    def blocks_visible(self, i_lo, i_hi, j_lo, j_hi):
        return (j_lo < self.count) & (j_lo <= i_hi)

    def blocks_all_visible(self, i_lo, i_hi, j_lo, j_hi):
        return (j_hi < self.count) & (j_hi <= i_lo)

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, self.count)


class AndMask(MaskFunction):
    """Visible iff every part says so; bounds ANDed, `max_keys` the smallest."""

    def __init__(self, *parts: MaskFunction):
        self.parts = parts

    def visible(self, i, j):
        out = self.parts[0].visible(i, j)
        for part in self.parts[1:]:
            out = out & part.visible(i, j)
        return out

    def blocks_visible(self, i_lo, i_hi, j_lo, j_hi):
        out = self.parts[0].blocks_visible(i_lo, i_hi, j_lo, j_hi)
        for part in self.parts[1:]:
            out = out & part.blocks_visible(i_lo, i_hi, j_lo, j_hi)
        return out

    def blocks_all_visible(self, i_lo, i_hi, j_lo, j_hi):
        out = self.parts[0].blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        for part in self.parts[1:]:
            out = out & part.blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        return out

    def max_keys(self, num_keys: int) -> int:
        return min(part.max_keys(num_keys) for part in self.parts)

    def prepare(self, *positions: Tensor) -> None:
        for part in self.parts:
            part.prepare(*positions)


class OrMask(AndMask):
    """Visible iff some part says so; bounds ORed, `max_keys` added."""

    def visible(self, i, j):
        out = self.parts[0].visible(i, j)
        for part in self.parts[1:]:
            out = out | part.visible(i, j)
        return out

    def blocks_visible(self, i_lo, i_hi, j_lo, j_hi):
        out = self.parts[0].blocks_visible(i_lo, i_hi, j_lo, j_hi)
        for part in self.parts[1:]:
            out = out | part.blocks_visible(i_lo, i_hi, j_lo, j_hi)
        return out

    def blocks_all_visible(self, i_lo, i_hi, j_lo, j_hi):
        out = self.parts[0].blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        for part in self.parts[1:]:
            out = out | part.blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        return out

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, sum(part.max_keys(num_keys) for part in self.parts))


def and_masks(*masks: MaskFunction | None) -> MaskFunction:
    """The intersection of the masks given (None entries are skipped)."""
    parts = tuple(m for m in masks if m is not None)
    if not parts:
        raise ValueError("and_masks needs at least one mask")
    return parts[0] if len(parts) == 1 else AndMask(*parts)


def or_masks(*masks: MaskFunction | None) -> MaskFunction:
    """The union of the masks given (None entries are skipped)."""
    parts = tuple(m for m in masks if m is not None)
    if not parts:
        raise ValueError("or_masks needs at least one mask")
    return parts[0] if len(parts) == 1 else OrMask(*parts)


CAUSAL = Causal()
