"""What every backend shares: one layer's runtime (plan + rotary + tensors) and the pair rules.

A backend is a function `(q, k, v, call, layer) -> out` with q (B, H, Tq, d) and k, v
(B, Hk, Tk, d) *before* rotation, and out (B, Tq, H, d), as transformers' attention functions
return it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..compose import LayerPlan
from ..kinds import Bias, identity
from ..rotary import Rotary


@dataclass
class AttentionCall:
    """The positions and options of one attention call."""

    q_pos: Tensor  # (B, Tq) absolute positions of the queries
    k_pos: Tensor  # (B, Tk) absolute positions of the keys
    key_padding: Tensor | None  # (B, Tk) bool, True for real tokens; None when all are real
    scaling: float
    dropout: float = 0.0
    native_window: int | None = None  # the model's own sliding window (Mistral), intersected

    @property
    def q_offset(self) -> int:
        """Index of the first query among the keys (queries are the last Tq keys)."""
        return self.k_pos.shape[1] - self.q_pos.shape[1]


class LayerRuntime:
    """One layer's plan, bound to its rotary map and its per-layer tensors."""

    def __init__(self, plan: LayerPlan, rotary: Rotary | None, tensors: nn.ModuleDict | None = None):
        self.plan = plan
        self.rotary = rotary  # None: q and k arrive already rotated (a layer ctxpatch does not own)
        self.tensors = tensors

    # ---- positions --------------------------------------------------------------------------

    def views(self) -> tuple[tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]], ...]:
        return self.plan.position.views() if self.plan.position else ((identity, identity),)

    def select(self, i: Tensor, j: Tensor) -> Tensor | None:
        return self.plan.position.select(i, j) if self.plan.position else None

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        return x if self.rotary is None else self.rotary.rotate(x, positions)

    def rotated_views(self, x: Tensor, positions: Tensor, side: int) -> list[Tensor]:
        """x rotated for every view; side 0 = queries, 1 = keys. Views sharing a map share one rotation
        (dca's three views rotate keys alike)."""
        rotated: dict[Callable[[Tensor], Tensor], Tensor] = {}
        for view in self.views():
            if view[side] not in rotated:
                rotated[view[side]] = self.rotate(x, view[side](positions))
        return [rotated[view[side]] for view in self.views()]

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

    def visible(
        self, call: AttentionCall, i: Tensor, j: Tensor, qi: Tensor, kj: Tensor, key_real: Tensor | None
    ) -> Tensor:
        """Pairs a query may attend to: i, j positions, qi, kj indices among the keys, key_real
        whether the key is a real token (all broadcastable to the pair grid; None: all real).

        Causal (by position and by index), real keys only, inside the layer's mask and the model's
        own window; a query always sees itself, so a padding query never has an empty row.
        """
        seen = (j <= i) & (kj <= qi)
        if self.plan.mask is not None:
            seen = seen & self.plan.mask.visible(i, j)
        if call.native_window is not None:
            seen = seen & (i - j < call.native_window)
        if key_real is not None:
            seen = seen & key_real
        return seen | (kj == qi)

    def blocks_visible(self, call: AttentionCall, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        seen = j_lo <= i_hi
        if self.plan.mask is not None:
            seen = seen & self.plan.mask.blocks_visible(i_lo, i_hi, j_lo, j_hi)
        if call.native_window is not None:
            seen = seen & (i_lo - j_hi < call.native_window)
        return seen

    def blocks_all_visible(self, call: AttentionCall, i_lo: Tensor, i_hi: Tensor, j_lo: Tensor, j_hi: Tensor) -> Tensor:
        """Is every pair of the ranges visible, padding aside? (conservative: may say no)"""
        full = j_hi <= i_lo
        if self.plan.mask is not None:
            full = full & self.plan.mask.blocks_all_visible(i_lo, i_hi, j_lo, j_hi)
        if call.native_window is not None:
            full = full & (i_hi - j_lo < call.native_window)
        return full

    def max_keys(self, num_keys: int) -> int:
        return num_keys if self.plan.mask is None else self.plan.mask.max_keys(num_keys)

    def prepare(self, call: AttentionCall) -> None:
        """Let methods size lookup tables before a call (hybrid's random blocks)."""
        prepare = getattr(self.plan.mask, "prepare", None)
        if prepare is not None:
            prepare(int(torch.cat([call.q_pos.flatten(), call.k_pos.flatten()]).max()), call.q_pos.device)


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def head_index(num_heads: int, device: torch.device) -> Tensor:
    return torch.arange(num_heads, device=device).view(num_heads, 1, 1)  # (H, 1, 1) broadcasts over (Tq, Tk)
