"""`window`: sliding-window attention, visible iff 0 <= i - j < W.

Paper: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer" (arXiv:2004.05150), 2020.
"""

from torch import Tensor

from ..kinds import Mask
from ..registry import Param, from_model, positive_int, register


def window_visible(i: Tensor, j: Tensor, window: int) -> Tensor:
    delta = i - j
    return (delta >= 0) & (delta < window)


def window_blocks_visible(i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor, window: int) -> Tensor:
    # some pair has 0 <= i - j < W  <=>  the largest delta is >= 0 and the smallest is < W
    return (i_hi - j_lo >= 0) & (i_lo - j_hi < window)


def window_blocks_all_visible(i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor, window: int) -> Tensor:
    # every delta of the two ranges in [0, W): the smallest is >= 0 and the largest < W
    return (i_lo - j_hi >= 0) & (i_hi - j_lo < window)


@register
class Window(Mask):
    """Sliding window: a query sees the last W positions, itself included."""

    name = "window"
    paper = "Longformer (Beltagy et al., 2020)"
    params = (Param("window", from_model("L", lambda m: m.train_len), positive_int, "W, positions visible"),)

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        return window_visible(i, j, self.window)

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        return window_blocks_visible(i_lo, i_hi, j_lo, j_hi, self.window)

    def blocks_all_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        return window_blocks_all_visible(i_lo, i_hi, j_lo, j_hi, self.window)

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, self.window)
