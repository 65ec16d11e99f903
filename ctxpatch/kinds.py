"""The four kinds of method and what each must define (DESIGN.md, "Layers of the code", 1).

Every function here is elementwise on broadcastable tensors of *positions* (`i` queries, `j` keys,
`h` 0-based query-head indices), so one definition serves the dense backend (whole grid), the
blockwise backend (one block at a time) and FlexAttention (one score at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .masking import MaskFunction
from .registry import Method, ModelInfo

if TYPE_CHECKING:
    from .rotary import Rotary, RotaryLayout

PositionMap = Callable[[Tensor], Tensor]


def identity(positions: Tensor) -> Tensor:
    return positions


class Mask(Method, MaskFunction):
    """Which (i, j) pairs are visible, on top of causality (j <= i) and padding.

    A mask is an expression of mask functions (`expression()`, combined with `and_masks` /
    `or_masks` from ctxpatch.masking), which gives its pairs and its block bounds at once; a mask
    may instead override `visible` (and, to let the blockwise backend skip blocks, the bounds).
    """

    kind = "mask"

    def expression(self) -> MaskFunction | None:
        """The mask as mask functions of its resolved parameters (None: the methods below are overridden)."""
        return None

    def _expression(self) -> MaskFunction | None:
        built = self.__dict__.get("_built_expression")
        if built is None:
            built = self.expression()
            if self.resolved:  # built from the final values: keep it (and its lookup tables)
                self.__dict__["_built_expression"] = built
        return built

    def visible(self, i: Tensor, j: Tensor) -> Tensor:
        expression = self._expression()
        if expression is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither expression() nor visible()")
        return expression.visible(i, j)

    def blocks_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        expression = self._expression()
        if expression is None:
            return super().blocks_visible(i_lo, i_hi, j_lo, j_hi)
        return expression.blocks_visible(i_lo, i_hi, j_lo, j_hi)

    def blocks_all_visible(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        expression = self._expression()
        if expression is None:
            return super().blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        return expression.blocks_all_visible(i_lo, i_hi, j_lo, j_hi)

    def max_keys(self, num_keys: int) -> int:
        expression = self._expression()
        return num_keys if expression is None else expression.max_keys(num_keys)

    def prepare(self, *positions: Tensor) -> None:
        expression = self._expression()
        if expression is not None:
            expression.prepare(*positions)


class Bias(Method):
    """An additive term b_h(i, j) of the attention score."""

    kind = "bias"

    def make_parameters(self, num_heads: int) -> dict[str, Tensor]:
        """Tensors the bias reads (trainable ones as `nn.Parameter`), one set per layer."""
        return {}

    def bias(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def features(self, h: Tensor, i: Tensor, j: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
        """(f_q(h, i), f_k(j)) with b_h(i, j) = <f_q, f_k> + a term constant along each query row.

        Lets a backend fold the bias into the fused attention kernel as extra q/k dimensions.
        None when the bias does not split this way. `h` has shape (H, 1), i (..., Tq), j (..., Tk);
        f_q is (..., H, Tq, F) and f_k (..., 1, Tk, F).
        """
        return None


class Scale(Method):
    """A factor kappa_i on the query's dot products (not on the biases)."""

    kind = "scale"

    def scale(self, i: Tensor) -> Tensor:
        raise NotImplementedError


class PositionRule(Method):
    """What replaces R(i)q . R(j)k: a rotary map and k position "views".

    A view is a pair of maps (query positions -> rotation positions, key positions -> rotation
    positions). A rule with several views picks one per pair with `select(i, j)`; the relative
    position RoPE then sees is f_q(i) - f_k(j) of the chosen view. Every backend computes each pair
    in its view only: `views_needed` tells which views a block of pairs may use.
    """

    kind = "position"
    modifier: bool = False  # True: combines with any other rule (xpos), applied in every view

    def make_rotary(self, rotary: "Rotary", config: object, info: ModelInfo) -> "Rotary":
        """The rotary map this rule rotates with (default: the model's own)."""
        return rotary

    def views(self) -> tuple[tuple[PositionMap, PositionMap], ...]:
        return ((identity, identity),)

    def select(self, i: Tensor, j: Tensor) -> Tensor | None:
        """Index of the view each pair uses (an integer tensor; bool for two views; None with one view)."""
        return None

    def views_needed(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> list[Tensor]:
        """Per view: may it be selected for some pair with i in [i_lo, i_hi], j in [j_lo, j_hi]? (conservative)"""
        shape = torch.broadcast_shapes(i_lo.shape, j_lo.shape)
        return [torch.ones(shape, dtype=torch.bool, device=j_lo.device) for _ in self.views()]

    def relative(self, i: Tensor, j: Tensor) -> Tensor:
        """The relative position RoPE sees for the pair (the rule's definition)."""
        views = self.views()
        if len(views) == 1:
            return views[0][0](i) - views[0][1](j)
        chosen = self.select(i, j).long()
        out = torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.float64, device=i.device)
        for n, (f_q, f_k) in enumerate(views):
            out = torch.where(chosen == n, (f_q(i) - f_k(j)).double(), out)
        return out


class TwoViewRule(PositionRule):
    """k = 2: the true relative position up to a threshold, a remapped one beyond.

    The near view is RoPE at the true positions; the far view rotates q and k at the positions
    `far_query(i)`, `far_key(j)`; pairs with i - j >= `threshold` (the window W) use the far view.
    """

    @property
    def threshold(self):
        return self.window

    def far_query(self, i: Tensor) -> Tensor:
        raise NotImplementedError

    def far_key(self, j: Tensor) -> Tensor:
        raise NotImplementedError

    def views(self) -> tuple[tuple[PositionMap, PositionMap], ...]:
        return ((identity, identity), (self.far_query, self.far_key))

    def select(self, i: Tensor, j: Tensor) -> Tensor:
        return i - j >= self.threshold  # bool: True = the far view (index 1)

    def views_needed(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> list[Tensor]:
        return [i_lo - j_hi < self.threshold, i_hi - j_lo >= self.threshold]

    def smallest_slowdown(self, info: ModelInfo, widest: Callable[[int], float]) -> int:
        """The smallest whole k >= 1 with widest(k) < L: how much the far view must shrink distances (SelfExtend's
        group, leaky ReRoPE's leak) for a target length. Needs the near window below L."""
        if self.window >= info.train_len:
            raise ValueError(f"{self.name}: window={self.window} must be below L = {info.train_len} to reach further")
        k = 1
        while widest(k) >= info.train_len:
            k += 1
        return k


class PositionModifier(PositionRule):
    """A per-pair factor on q and k applied in every view (xpos): combines with any rule."""

    modifier = True

    def factors(self, positions: Tensor, centre: Tensor, sign: int, layout: "RotaryLayout", head_dim: int) -> Tensor:
        """(B, 1, T, head_dim) factors for q (sign +1) or k (sign -1) at positions (B, T)."""
        raise NotImplementedError


class CachePolicy(Method):
    """What the KV cache keeps, and at which positions the kept keys are seen."""

    kind = "cache"

    def keep(self, positions: Tensor, real: Tensor) -> Tensor | None:
        """(B, K) indices of the cached keys each row keeps after a step (None: keep all).

        positions and real are (B, Tk): every cached key's position and whether it is a real token.
        """
        return None


class Selection(Method):
    """Which keys a query sees, decided by their content (q . k), on top of causality, padding and any mask.

    Keys are grouped in blocks of `block_size` positions (block ⌊j/B⌋). A query at i sees the keys
    `always_visible(i, j)` gives (its window, sinks) and every key of the `top_k` *candidate* blocks that
    score highest for it (`summarize` then `score`: from un-rotated q and keys). A candidate block is
    complete before the query (every key it can hold is at or before i), so a query's choice depends on
    its own q and keys at or before it only: never on which other queries share its forward.
    """

    kind = "selection"

    @property
    def block(self) -> int:
        raise NotImplementedError

    @property
    def sharing(self) -> str:
        """Who shares one choice: "head" (each query head), "kv_head" (a GQA group's heads), "layer" (all)."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        """How many blocks a query chooses (top_k)."""
        raise NotImplementedError

    def default_position(self, info: ModelInfo) -> PositionRule | None:
        """The position rule a layer gets when the spec gives it none (None: the model's own positions)."""
        return None

    def shown(self) -> MaskFunction:
        """The pairs seen whatever the content (window, sinks), as a mask function of positions."""
        raise NotImplementedError

    def always_visible(self, i: Tensor, j: Tensor) -> Tensor:
        return self.shown().visible(i, j)

    def candidates(self, i: Tensor, blocks: Tensor) -> Tensor:
        """May a query at i choose block b? i (..., Tq, 1), blocks (nb,) -> (..., Tq, nb)."""
        raise NotImplementedError

    @property
    def parts(self) -> int:
        """Summaries per block: a block scores as its best part (the sharing heads' part scores summed first)."""
        return 1

    @property
    def linear(self) -> bool:
        """Is `score` linear in q (then heads sharing a choice may sum their queries before scoring)?"""
        return False

    def part_of(self, positions: Tensor) -> Tensor:
        """(B, Tk) long: the part of each key, block ⌊j/B⌋'s parts numbered block·parts onwards."""
        return torch.div(positions.clamp(min=0), self.block, rounding_mode="floor").long()

    def summarize(self, keys: Tensor, part_of: Tensor, real: Tensor, parts: int) -> dict[str, Tensor]:
        """Per-part summaries of un-rotated keys (B, Hk, Tk, d); part_of (B, Tk) part ids, real (B, Tk)."""
        raise NotImplementedError

    def score(self, q: Tensor, summary: dict[str, Tensor]) -> Tensor:
        """(B, Hk, G, Tq, parts) scores of every part for un-rotated queries q (B, Hk, G, Tq, d)."""
        raise NotImplementedError


def parameter_holder(tensors: dict[str, Tensor]) -> nn.Module:
    """An `nn.Module` carrying a method's per-layer tensors, so `model.parameters()` sees them."""
    holder = nn.Module()
    for name, value in tensors.items():
        if isinstance(value, nn.Parameter):
            holder.register_parameter(name, value)
        else:
            holder.register_buffer(name, value, persistent=False)
    return holder
