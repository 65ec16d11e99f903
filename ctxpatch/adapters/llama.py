"""Decoder-layout attention: q/k/v projections (separate or fused), an output projection, and a rotary embedding.

Found by structure, not by class name: any decoder whose layers each hold one attention module with a
`layer_idx`, its q/k/v projections (`q_proj`/`k_proj`/`v_proj`, or fused as `qkv_proj` (Phi-3) or
`query_key_value` (GPT-NeoX)) and an output projection (`o_proj`, or `dense` (Phi, GPT-NeoX)), next to a
rotary embedding with an `inv_freq` buffer, or one per layer type (Gemma 3's local layers have their own base).
ctxpatch never touches the projections: the model's own forward projects, normalises (q/k norms, StableLM's
per-head layer norms) and splits a fused projection as it always does, and hands ctxpatch's attention function
q, k, v un-rotated; the model's score scale (Gemma's `query_pre_attn_scalar`) and soft-capping arrive with the
call. The layout (half-split or interleaved pairs, partial rotary, how the cos/sin table is ordered) is the one
with which ctxpatch's rotation reproduces the model's own `apply_rotary_pos_emb` on the model's own cos/sin, so
GLM's interleaved partial rotary and other families' variants (Cohere's interleaved table, Phi's and StableLM's
rotation of the first dims only) are recognised, and a rotation ctxpatch cannot reproduce is refused rather
than approximated.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .._compat.transformers import (
    attention_layer_type,
    follows_attention_interface,
    model_apply_rotary,
    rotary_cos_sin,
    rotary_inv_freq,
    rotary_layer_types,
)
from ..registry import ModelInfo
from ..rotary import Rotary, RotaryLayout
from .base import Adapter, LayoutProbeError, train_len

QKV_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",))
OUT_PROJECTIONS = ("o_proj", "dense")


def _is_projection(module: object) -> bool:
    """A linear layer, or one wrapped by an adapter (peft's LoRA layers keep it as `base_layer`)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base_layer", None), nn.Linear)


def _is_attention(module: nn.Module) -> bool:
    has_qkv = any(all(_is_projection(getattr(module, p, None)) for p in names) for names in QKV_PROJECTIONS)
    has_out = any(_is_projection(getattr(module, p, None)) for p in OUT_PROJECTIONS)
    return has_qkv and has_out and hasattr(module, "layer_idx")


def _has_rope(rotary: nn.Module | None) -> bool:
    return rotary is not None and (hasattr(rotary, "inv_freq") or rotary_layer_types(rotary) is not None)


def _find_base(model: nn.Module) -> nn.Module | None:
    for module in model.modules():
        layers, rotary = getattr(module, "layers", None), getattr(module, "rotary_emb", None)
        if isinstance(layers, nn.ModuleList) and _has_rope(rotary):
            return module
    return None


def _head_dim(attention: nn.Module, config) -> int:
    return getattr(attention, "head_dim", None) or getattr(attention, "head_size", None) or (
        config.hidden_size // config.num_attention_heads
    )


def probe_layout(
    attention: nn.Module, rotary: nn.Module, rotary_dim: int, head_dim: int, layer_type: str | None = None
) -> RotaryLayout | None:
    """The layout with which `Rotary.apply` equals the model's own apply_rotary_pos_emb (None: none does;
    `LayoutProbeError`, carrying the cause, when the model's own rotation cannot be called). A partial rotary is
    either applied by the model's function itself (Phi-3, GPT-NeoX) or to the first d_r dims the attention module
    splits off (Phi, StableLM): both are the same map on the whole head."""
    apply, inv_freq = model_apply_rotary(attention), rotary_inv_freq(rotary, layer_type)
    if apply is None or inv_freq.is_meta:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 4, head_dim, generator=generator).to(inv_freq.device)  # (B, heads, T, d)
    positions = torch.arange(1, 5, device=x.device)[None]  # (B, T)
    try:
        cos, sin = rotary_cos_sin(rotary, x, positions, layer_type)  # (B, T, d_r), bypassing any hook
    except Exception as error:  # noqa: BLE001 - a rotary we cannot call is a layout we do not know: say why
        raise LayoutProbeError(f"calling the model's own rotary embedding failed: {error!r}") from error
    if cos.shape[-1] != rotary_dim:  # one table entry per rotated dim is what ctxpatch lays out
        return None
    expected = _model_rotation(apply, x, cos, sin)
    for interleaved, cos_interleaved in itertools.product((False, True), repeat=2):
        layout = RotaryLayout(interleaved=interleaved, rotary_dim=rotary_dim, cos_interleaved=cos_interleaved)
        turned = Rotary(rotary, layout, layer_type).apply(x, cos.unsqueeze(1), sin.unsqueeze(1))
        if turned.shape == expected.shape and torch.allclose(turned, expected, rtol=1e-5, atol=1e-6):
            return layout
    return None


def _model_rotation(apply, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's own rotation of a whole head x (B, heads, T, d): its apply on x, or, when that takes the
    rotated dims only (cos narrower than the head), on the first d_r dims with the rest passed through."""
    first_error = None
    try:
        whole = apply(x, x, cos, sin)[0]
        if whole.shape == x.shape:
            return whole
    except Exception as error:  # noqa: BLE001 - tried again on the rotated dims below
        first_error = error
    d_r = cos.shape[-1]
    try:
        return torch.cat((apply(x[..., :d_r], x[..., :d_r], cos, sin)[0], x[..., d_r:]), dim=-1)
    except Exception as error:  # noqa: BLE001 - an apply we cannot call is a layout we do not know: say why
        raise LayoutProbeError(f"calling the model's own rotary embedding failed: {first_error or error!r}") from error


class LlamaFamilyAdapter(Adapter):
    families = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3, Phi, Phi-3, StableLM, GPT-NeoX, GLM, GLM-4"
    requirement = (
        "attention with q/k/v projections (or a fused qkv_proj/query_key_value), o_proj or dense, and a rotary_emb "
        "whose rotation ctxpatch reproduces, attention computed through transformers' AttentionInterface"
    )

    @classmethod
    def find(cls, model: nn.Module) -> "LlamaFamilyAdapter | None":
        base = _find_base(model)
        if base is None or not follows_attention_interface(model):
            return None
        attentions = []
        for layer in base.layers:
            found = [m for m in layer.modules() if _is_attention(m)]
            if len(found) != 1:
                return None
            attentions.append(found[0])
        config = model.config
        head_dim = _head_dim(attentions[0], config)
        rotaries = _layer_rotaries(base.rotary_emb, attentions, config, head_dim)
        if rotaries is None:
            return None
        info = ModelInfo(
            train_len=train_len(config),
            num_layers=len(attentions),
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            rotary_dim=rotaries[0].layout.rotary_dim,
        )
        per_layer = rotaries if rotary_layer_types(base.rotary_emb) else None
        return cls(model, base, attentions, rotaries[0], info, per_layer)


def _layer_rotaries(rotary: nn.Module, attentions: list[nn.Module], config, head_dim: int) -> list[Rotary] | None:
    """Each layer's rotary map (one per layer type when the module holds a rope per type, as Gemma 3's does), its
    layout probed on the model's own rotation; None when one cannot be reproduced."""
    per_type = rotary_layer_types(rotary) is not None
    layer_types = [attention_layer_type(a, config) if per_type else None for a in attentions]
    made: dict[str | None, Rotary] = {}
    for layer_type in dict.fromkeys(layer_types):
        rotary_dim = 2 * rotary_inv_freq(rotary, layer_type).numel()
        layout = probe_layout(attentions[0], rotary, rotary_dim, head_dim, layer_type)
        if layout is None:
            return None
        made[layer_type] = Rotary(rotary, layout, layer_type)
    return [made[t] for t in layer_types]
