"""The per-layer plan and its runtime: what one attention layer runs, beneath every backend.

`LayerPlan` is what composition (ctxpatch.compose) decides for a layer; `LayerRuntime` binds it to
a rotary map and the layer's method tensors; `AttentionCall` carries the positions and options of
one call. A backend is a function `(q, k, v, call, layer) -> out` with q (B, H, Tq, d) and k, v
(B, Hk, Tk, d) *before* rotation, and out (B, Tq, H, d), as transformers' attention functions
return it. Backends import this module; it imports only the methods beneath it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .kinds import Bias, CachePolicy, Mask, PositionRule, Scale, Selection, identity, parameter_holder
from .masking import CAUSAL, MaskFunction, SlidingWindow, and_masks
from .registry import Method, ModelInfo
from .rotary import Rotary

PositionMap = Callable[[Tensor], Tensor]


@dataclass
class LayerPlan:
    """What one attention layer runs."""

    index: int
    mask: Mask | None = None
    biases: tuple[Bias, ...] = ()
    scales: tuple[Scale, ...] = ()
    position: PositionRule | None = None
    modifiers: tuple[PositionRule, ...] = ()
    cache: CachePolicy | None = None
    selection: Selection | None = None  # which keys a query sees by their content (the backends ask backends.selected)
    methods: list[Method] = field(default_factory=list)


@dataclass
class AttentionCall:
    """The positions and options of one attention call."""

    q_pos: Tensor  # (B, Tq) absolute positions of the queries
    k_pos: Tensor  # (B, Tk) absolute positions of the keys
    key_padding: Tensor | None  # (B, Tk) bool, True for real tokens; None when all are real
    scaling: float
    dropout: float = 0.0
    native_window: int | None = None  # the model's own sliding window (Mistral), intersected
    softcap: float | None = None  # the model's attention-logit soft-capping c (Gemma 2): c·tanh(s/c) before biases
    share: ForwardShare | None = None  # shared by the model's layers: position-only work made once per forward

    @property
    def q_offset(self) -> int:
        """Index of the first query among the keys (queries are the last Tq keys)."""
        return self.k_pos.shape[1] - self.q_pos.shape[1]


class ForwardShare:
    """Work that depends on positions only (the blockwise backend's chunk plans), made by one layer and reused by the
    next layers of the same forward. One entry: a layer whose index is not above the last one served starts a new
    forward (or a recompute under gradient checkpointing), so that layer makes the work again. After the
    `final_layer` has been served the entry is dropped, so no plan outlives its forward."""

    def __init__(self, final_layer: int | None = None) -> None:
        self._key: tuple = ()
        self._value: Any = None
        self._last_layer = -1
        self.final_layer = final_layer

    def get(self, key: tuple, layer_index: int, make: Callable[[], Any]) -> Any:
        """The value made for `key` earlier in this forward, else `make()`. Tensors in the key compare by value,
        everything else by identity or equality."""
        if self._value is None or layer_index <= self._last_layer or not _same_key(key, self._key):
            self._key, self._value = key, make()
        self._last_layer, value = layer_index, self._value
        if layer_index == self.final_layer:
            self._key, self._value = (), None
        return value


def _same_key(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return (
            isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and x.dtype == y.dtype
            and x.device == y.device and bool(torch.equal(x, y))
        )
    return x is y or x == y


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The union of two column masks, None standing for every column."""
    return None if a is None or b is None else a | b


@dataclass
class LayerRuntime:
    """One layer's plan, bound to its rotary map and its per-layer tensors."""

    plan: LayerPlan
    rotary: Rotary | None  # None: q and k arrive already rotated (a layer ctxpatch does not own)
    tensors: nn.ModuleDict | None = None

    # ---- positions --------------------------------------------------------------------------

    def views(self) -> tuple[tuple[PositionMap, PositionMap], ...]:
        return self.plan.position.views() if self.plan.position else ((identity, identity),)

    def select(self, i: Tensor, j: Tensor) -> Tensor | None:
        return self.plan.position.select(i, j) if self.plan.position else None

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return x if self.rotary is None else self.rotary.rotate(x, positions)

    def rotated_views(self, x: Tensor, positions: Tensor, side: int, needed: list[Tensor] | None = None) -> list[Tensor]:
        """x (B, H, T, d) rotated for every view; side 0 = queries, 1 = keys. Views sharing a map share one rotation
        (dca's three views rotate keys alike). `needed`, per view a (T,) bool: rotate only those columns (a map
        shared by views at the union of theirs), zeros elsewhere."""
        if needed is None:
            needed = [None] * len(self.views())
        wanted: dict[Callable[[Tensor], Tensor], Tensor | None] = {}
        for view, need in zip(self.views(), needed):
            to = view[side]
            wanted[to] = _either(wanted[to], need) if to in wanted else need
        rotated = {to: self._rotated_at(x, positions, to, need) for to, need in wanted.items()}
        return [rotated[view[side]] for view in self.views()]

    def _rotated_at(self, x: Tensor, positions: Tensor, to: Callable[[Tensor], Tensor], need: Tensor | None) -> Tensor:
        """x rotated by `to`(positions), at every column or only at `need`'s (zeros elsewhere); a map needed at every
        column, or a layer without rotary, is rotated whole (no gather)."""
        if need is None or self.rotary is None or bool(need.all()):
            return self.rotate(x, to(positions))
        cols = need.nonzero().flatten()
        out = torch.zeros_like(x)
        if cols.numel():
            out.index_copy_(2, cols, self.rotate(x.index_select(2, cols), to(positions.index_select(1, cols))))
        return out

    def modify(self, views: list[Tensor], positions: Tensor, centre: Tensor, side: int) -> list[Tensor]:
        """Apply the modifiers (xpos) to every view: queries (side 0) or keys (side 1), centre (B, 1)."""
        for modifier in self.plan.modifiers:
            factors = modifier.factors(positions, centre, 1 if side == 0 else -1, self.rotary.layout, views[0].shape[-1])
            views = [(x.to(compute_dtype(x)) * factors.to(compute_dtype(x))).to(x.dtype) for x in views]
        return views

    def view_needs(self, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> list[Tensor]:
        """Per view, may it be selected for a pair in the ranges (broadcast like the inputs)?"""
        if self.plan.position is None:
            return [torch.ones(torch.broadcast_shapes(i_lo.shape, j_lo.shape), dtype=torch.bool, device=j_lo.device)]
        return self.plan.position.views_needed(i_lo, i_hi, j_lo, j_hi)

    # ---- scale and bias ---------------------------------------------------------------------

    def kappa(self, i: Tensor) -> Tensor | None:
        out = None
        for s in self.plan.scales:
            out = s.scale(i) if out is None else out * s.scale(i)
        return out

    def params_of(self, method_name: str) -> dict[str, Tensor]:
        if self.tensors is None or method_name not in self.tensors:
            return {}
        holder = self.tensors[method_name]
        return {**dict(holder.named_parameters()), **dict(holder.named_buffers())}

    def bias(self, h: Tensor, i: Tensor, j: Tensor) -> Tensor | None:
        out = None
        for b in self.plan.biases:
            term = b.bias(h, i, j, self.params_of(b.name))
            out = term if out is None else out + term
        return out

    @property
    def biases_fold(self) -> bool:
        """Does every bias split into q/k features (see `Bias.features`)?"""
        return bool(self.plan.biases) and all(type(b).features is not Bias.features for b in self.plan.biases)

    def features(self, h: Tensor, i: Tensor, j: Tensor) -> tuple[Tensor, Tensor]:
        """Every bias as extra q/k features, concatenated."""
        parts = [b.features(h, i, j, self.params_of(b.name)) for b in self.plan.biases]
        return torch.cat([p[0] for p in parts], dim=-1), torch.cat([p[1] for p in parts], dim=-1)

    # ---- masks ------------------------------------------------------------------------------

    def has_mask(self, call: AttentionCall) -> bool:
        return self.plan.mask is not None or call.native_window is not None

    def mask(self, call: AttentionCall) -> MaskFunction:
        """The call's visibility on positions: causal, the layer's mask and the model's own window."""
        native = None if call.native_window is None else SlidingWindow(call.native_window)
        return and_masks(CAUSAL, self.plan.mask, native)

    def visible(
        self, call: AttentionCall, i: Tensor, j: Tensor, qi: Tensor, kj: Tensor, key_real: Tensor | None
    ) -> Tensor:
        """Pairs a query may attend to: i, j positions, qi, kj indices among the keys, key_real
        whether the key is a real token (all broadcastable to the pair grid; None: all real).

        Causal by index, real keys only, and visible by position (`mask`); a query always sees
        itself, so a padding query never has an empty row.
        """
        seen = (kj <= qi) & self.mask(call).visible(i, j)
        if key_real is not None:
            seen = seen & key_real
        return seen | (kj == qi)

    def blocks_visible(self, call: AttentionCall, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        return self.mask(call).blocks_visible(i_lo, i_hi, j_lo, j_hi)

    def blocks_all_visible(self, call: AttentionCall, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        """Is every pair of the ranges visible, padding aside? (conservative: may say no)"""
        return self.mask(call).blocks_all_visible(i_lo, i_hi, j_lo, j_hi)

    def max_keys(self, num_keys: int) -> int:
        return num_keys if self.plan.mask is None else self.plan.mask.max_keys(num_keys)

    def prepare(self, call: AttentionCall) -> None:
        """Let the mask size its lookup tables before a call (hybrid's random blocks)."""
        if self.plan.mask is not None:
            self.plan.mask.prepare(call.q_pos, call.k_pos)


def make_runtime(
    plan: LayerPlan,
    model_rotary: Rotary,
    config: Any,
    info: ModelInfo,
    device: torch.device,
    rotaries: dict[tuple, Rotary] | None = None,
) -> LayerRuntime:
    """Bind a layer's plan to its rotary map (shared between layers with the same rule) and to
    freshly made method tensors on `device`."""
    rotary = model_rotary
    if plan.position is not None:
        rotaries = {} if rotaries is None else rotaries
        key = (plan.position.describe(), model_rotary.layer_type)  # Gemma 3's local and global layers differ
        if key not in rotaries:
            rotaries[key] = plan.position.make_rotary(model_rotary, config, info)
        rotary = rotaries[key]
    made = {b.name: b.make_parameters(info.num_heads) for b in plan.biases}
    made = {name: tensors for name, tensors in made.items() if tensors}
    tensors = nn.ModuleDict({n: parameter_holder(t) for n, t in made.items()}).to(device) if made else None
    return LayerRuntime(plan, rotary, tensors)
