"""R(p): a model's own rotary map, evaluated at any positions, in either pair layout.

cos/sin always come from the model's transformers rotary-embedding module (so rope_type, dynamic
updates and attention scaling are transformers' own); only how they are applied to the pairs is
written here: "half" pairs dims (k, k + d_r/2) as Llama does, "interleaved" pairs (2k, 2k + 1) as
GLM does, and a partial rotary (d_r < d) leaves the last d - d_r dims alone. The cos/sin table a
module returns is (c_0 .. c_{d_r/2-1}, c_0 .. c_{d_r/2-1}) for most models, (c_0, c_0, c_1, c_1, ..)
for some (Cohere); `cos_interleaved` says which, and `per_dim` lays it out as the pairs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._compat.transformers import rotary_cos_sin, rotary_inv_freq


@dataclass(frozen=True)
class RotaryLayout:
    interleaved: bool  # pairs (2k, 2k + 1), not (k, k + d_r/2)
    rotary_dim: int
    cos_interleaved: bool = False  # the module's cos/sin come as (c_0, c_0, c_1, c_1, ...)


def rotate_pairs(x: Tensor, interleaved: bool) -> Tensor:
    """The 90-degree turn of every pair: (a, b) -> (-b, a)."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))  # (..., d_r/2, 2)
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def expand_pairs(values: Tensor, layout: RotaryLayout, head_dim: int, fill: float = 1.0) -> Tensor:
    """Per-pair values (..., d_r/2) -> per-dim values (..., head_dim), `fill` on un-rotated dims."""
    per_dim = values.repeat_interleave(2, dim=-1) if layout.interleaved else torch.cat((values, values), dim=-1)
    rest = head_dim - layout.rotary_dim
    if rest:
        per_dim = torch.cat((per_dim, per_dim.new_full((*per_dim.shape[:-1], rest), fill)), dim=-1)
    return per_dim


class Rotary:
    """Rotation at arbitrary (even fractional) positions with a transformers rotary module."""

    def __init__(self, module: nn.Module, layout: RotaryLayout, layer_type: str | None = None):
        self.module = module
        self.layout = layout
        self.layer_type = layer_type  # a module with one rope per layer type (Gemma 3): this layer's

    def cos_sin(self, like: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (B, 1, T, d_r) in `like`'s dtype; positions (B, T)."""
        # not the instance: it carries ctxpatch's identity hook
        cos, sin = rotary_cos_sin(self.module, like, positions, self.layer_type)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def per_dim(self, table: Tensor) -> Tensor:
        """cos or sin as the module returns it (..., d_r) -> one value per rotated dim, laid out as the pairs."""
        layout = self.layout
        if layout.interleaved == layout.cos_interleaved:
            return table
        per_pair = table[..., 0::2] if layout.cos_interleaved else table[..., : layout.rotary_dim // 2]
        return per_pair.repeat_interleave(2, dim=-1) if layout.interleaved else torch.cat((per_pair, per_pair), dim=-1)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        d_r = self.layout.rotary_dim
        cos, sin = self.per_dim(cos), self.per_dim(sin)
        if d_r == x.shape[-1]:
            return (x * cos) + (rotate_pairs(x, self.layout.interleaved) * sin)
        rot, rest = x[..., :d_r], x[..., d_r:]
        return torch.cat(((rot * cos) + (rotate_pairs(rot, self.layout.interleaved) * sin), rest), dim=-1)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """R(p) x for x of shape (B, heads, T, d) and positions (B or 1, T)."""
        if positions.shape[-1] > 1 and bool((positions == positions[..., :1]).all()):
            positions = positions[..., :1]  # one position for all (a far view's constant): one table row, broadcast
        cos, sin = self.cos_sin(x, positions)
        return self.apply(x, cos, sin)

    @property
    def inv_freq(self) -> Tensor:
        return rotary_inv_freq(self.module, self.layer_type)
