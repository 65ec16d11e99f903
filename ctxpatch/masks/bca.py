"""`bca`: blockwise causal attention, visible iff j <= i and floor(i/B) - floor(j/B) <= 1.

Paper: Sun et al., "A Length-Extrapolatable Transformer" (XPOS/LEX, arXiv:2212.10554), 2022.
"""

from torch import Tensor

from ..kinds import Mask
from ..masking import MaskFunction
from ..registry import Param, from_model, positive_int, register


class BlockCausal(MaskFunction):
    """j <= i and i's block is j's or the one after."""

    def __init__(self, block: int):
        self.block = block

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        return (j <= i) & (i // self.block - j // self.block <= 1)

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        return (j_lo <= i_hi) & (i_lo // self.block - j_hi // self.block <= 1)

    def blocks_all_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        return (j_hi <= i_lo) & (i_hi // self.block - j_lo // self.block <= 1)

    def max_keys(self, num_keys: int) -> int:
        return min(num_keys, 2 * self.block)


@register
class BlockwiseCausal(Mask):
    """Blockwise causal attention: a query sees its own block and the one before."""

    name = "bca"
    paper = "A Length-Extrapolatable Transformer (Sun et al., 2022)"
    definition = "j ≤ i and ⌊i/B⌋ − ⌊j/B⌋ ≤ 1"
    params = (Param("block_size", from_model("L // 2", lambda m: max(1, m.train_len // 2)), positive_int, "B"),)

    def expression(self) -> MaskFunction:
        return BlockCausal(self.block_size)
