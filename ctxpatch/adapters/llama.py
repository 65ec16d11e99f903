"""Llama-layout attention: separate q/k/v/o projections and a shared rotary embedding.

Llama, Mistral, Qwen2 and Qwen3 (q/k norms run before rotation, so they need nothing) are found
by structure, not by class name: any decoder whose layers hold an attention module with
`q_proj`, `k_proj`, `v_proj`, `o_proj` and a `layer_idx`, next to a rotary embedding with an
`inv_freq` buffer. The layout (half-split or interleaved pairs, partial rotary, how the cos/sin
table is ordered) is the one with which ctxpatch's rotation reproduces the model's own
`apply_rotary_pos_emb` on the model's own cos/sin, so GLM's interleaved partial rotary and other
families' variants (Cohere's interleaved table) are recognised, and a rotation ctxpatch cannot
reproduce is refused rather than approximated.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .._compat.transformers import model_apply_rotary, rotary_cos_sin
from ..registry import ModelInfo
from ..rotary import Rotary, RotaryLayout
from .base import Adapter, LayoutProbeError, train_len

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _is_projection(module: object) -> bool:
    """A linear layer, or one wrapped by an adapter (peft's LoRA layers keep it as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _is_attention(module: nn.Module) -> bool:
    return all(_is_projection(getattr(module, p, None)) for p in PROJECTIONS) and hasattr(module, "layer_idx")


def _find_base(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        layers, rotary = getattr(module, "layers", None), getattr(module, "rotary_emb", None)
        if isinstance(layers, nn.ModuleList) and rotary is not None and hasattr(rotary, "inv_freq"):
            return module
    return None


def probe_layout(attention: nn.Module, rotary: nn.Module, rotary_dim: int, head_dim: int) -> RotaryLayout | None:
    """The layout with which `Rotary.apply` equals the model's own apply_rotary_pos_emb (None: none does;
    `LayoutProbeError`, carrying the cause, when the model's own rotation cannot be called)."""
    apply = model_apply_rotary(attention)
    if apply is None or rotary.inv_freq.is_meta:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, head_dim, generator=generator).to(rotary.inv_freq.device)  # (B, heads, T, d)
    positions = torch.arange(1, 5, device=x.device)[None]  # (B, T)
    try:
        cos, sin = rotary_cos_sin(rotary, x, positions)  # (B, T, d_r), bypassing any hook
        expected = apply(x, x, cos, sin)[0]
    except Exception as error:  # noqa: BLE001 - an apply we cannot call is a layout we do not know: say why
        raise LayoutProbeError(f"calling the model's own rotary embedding failed: {error!r}") from error
    if cos.shape[-1] != rotary_dim:  # one table entry per rotated dim is what ctxpatch lays out
        return None
    for interleaved, cos_interleaved in itertools.product((False, True), repeat=2):
        layout = RotaryLayout(interleaved=interleaved, rotary_dim=rotary_dim, cos_interleaved=cos_interleaved)
        turned = Rotary(rotary, layout).apply(x, cos.unsqueeze(1), sin.unsqueeze(1))
        if turned.shape == expected.shape and torch.allclose(turned, expected, rtol=1e-5, atol=1e-6):
            return layout
    return None


class LlamaFamilyAdapter(Adapter):
    families = "Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4"
    requirement = (
        "attention with q_proj/k_proj/v_proj/o_proj and a rotary_emb with inv_freq whose rotation ctxpatch "
        "reproduces; no attention-logit soft-capping"
    )

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
        if getattr(config, "attn_logit_softcapping", None):  # Gemma 2: scores capped inside attention
            return None
        first = attentions[0]
        head_dim = first.head_dim
        rotary_dim = 2 * base.rotary_emb.inv_freq.numel()
        layout = probe_layout(first, base.rotary_emb, rotary_dim, head_dim)
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
