"""`window`: sliding-window attention, visible iff 0 <= i - j < W.

Paper: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer" (arXiv:2004.05150), 2020.
"""

from ..kinds import Mask
from ..masking import MaskFunction, SlidingWindow
from ..registry import Param, from_model, positive_int, register


@register
class Window(Mask):
    """Sliding window: a query sees the last W positions, itself included."""

    name = "window"
    paper = "Longformer (Beltagy et al., 2020)"
    definition = "visible iff 0 ≤ Δ < W"
    params = (Param("window", from_model("L", lambda m: m.train_len), positive_int, "W, positions visible"),)

    def expression(self) -> MaskFunction:
        return SlidingWindow(self.window)
