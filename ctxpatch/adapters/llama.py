"""Llama-layout attention: separate q/k/v/o projections and a shared rotary embedding.

Llama, Mistral, Qwen2 and Qwen3 (q/k norms run before rotation, so they need nothing) are found
by structure, not by class name: any decoder whose layers hold an attention module with
`q_proj`, `k_proj`, `v_proj`, `o_proj` and a `layer_idx`, next to a rotary embedding with an
`inv_freq` buffer. The pair layout (half-split or interleaved) is read off the model's own
`apply_rotary_pos_emb` by probing it, so GLM's interleaved partial rotary is recognised too.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..registry import ModelInfo
from ..rotary import Rotary, RotaryLayout, rotate_pairs
from .base import Adapter, train_len

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_attention(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS) and hasattr(module, "layer_idx")


def _find_base(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        layers, rotary = getattr(module, "layers", None), getattr(module, "rotary_emb", None)
        if isinstance(layers, nn.ModuleList) and rotary is not None and hasattr(rotary, "inv_freq"):
            return module
    return None


def probe_layout(attention: nn.Module, rotary_dim: int, head_dim: int) -> RotaryLayout | None:
    """Ask the model's own apply_rotary_pos_emb which dims it pairs (cos = 0, sin = 1 gives the turn)."""
    apply = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        return None
    x = torch.arange(1.0, head_dim + 1).view(1, 1, 1, head_dim)  # (B, heads, T, d)
    cos, sin = torch.zeros(1, 1, rotary_dim), torch.ones(1, 1, rotary_dim)  # (B, T, d_r)
    try:
        turned = apply(x, x, cos, sin)[0]
    except Exception:  # noqa: BLE001 - an apply we cannot call is a layout we do not know
        return None
    for interleaved in (False, True):
        expected = torch.cat([rotate_pairs(x[..., :rotary_dim], interleaved), torch.zeros_like(x[..., rotary_dim:])], -1)
        if turned.shape == expected.shape and torch.equal(turned[..., :rotary_dim], expected[..., :rotary_dim]):
            return RotaryLayout(interleaved=interleaved, rotary_dim=rotary_dim)
    return None


class LlamaFamilyAdapter(Adapter):
    families = "Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4"
    requirement = "attention with q_proj/k_proj/v_proj/o_proj and a rotary_emb with inv_freq"

    @classmethod
    def find(cls, model: nn.Module) -> "LlamaFamilyAdapter | None":
        base = _find_base(model)
        if base is None:
            return None
        attentions = []
        for layer in base.layers:
            found = [m for m in layer.modules() if _is_attention(m)]
            if len(found) != 1:
                return None
            attentions.append(found[0])
        config = model.config
        first = attentions[0]
        head_dim = first.head_dim
        rotary_dim = 2 * base.rotary_emb.inv_freq.numel()
        layout = probe_layout(first, rotary_dim, head_dim)
        if layout is None:
            return None
        info = ModelInfo(
            train_len=train_len(config),
            num_layers=len(attentions),
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rotary_dim=rotary_dim,
        )
        return cls(model, base, attentions, Rotary(base.rotary_emb, layout), info)
