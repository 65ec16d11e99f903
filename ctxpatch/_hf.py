"""Everything that touches transformers' version-specific internals, in one place.

Tested on the transformers version the README installs. transformers 5.24 renamed the decoder
layers' `past_key_values` keyword to `cache` (the old name is accepted until 5.40); the name in use
is read off the attention module's signature, not assumed.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .errors import CtxpatchError

IMPLEMENTATION = "ctxpatch"
CACHE_KWARG = "_ctxpatch_cache"  # how the attention module's cache reaches ctxpatch's attention function


def cache_keyword(attention: nn.Module) -> str:
    """The keyword an attention module's forward takes its KV cache under."""
    params = inspect.signature(type(attention).forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "cache"


def register(attention_fn: Callable[..., Any]) -> None:
    """Register ctxpatch's attention function and its mask function (once per process)."""
    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, attention_fn)
        AttentionMaskInterface.register(IMPLEMENTATION, padding_only_mask)


def padding_only_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """ctxpatch builds its own masks from positions: layers only need which tokens are real.

    Returns the whole 2D boolean padding mask (batch, tokens so far), or None when every token is
    real. ctxpatch takes the new tokens' flags from its end and keeps the cached ones itself, so a
    cache that drops keys (sinks, sliding windows) needs no offsets from here.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    return None if bool(mask.all()) else mask


def attn_implementation(model: nn.Module) -> str | None:
    return model.config._attn_implementation


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Select an attention implementation for this model instance (transformers' own setter)."""
    model.set_attn_implementation(name)


def cache_length(cache: Any, layer_idx: int) -> int:
    """How many keys the cache holds for a layer after its update."""
    return int(cache.get_seq_length(layer_idx))


def keep_cached(cache: Any, layer_idx: int, keep: Tensor) -> None:
    """Keep only the cached keys and values at indices `keep` (B, K) of one layer (a cache policy)."""
    layer = cache.layers[layer_idx]

    def gather(states: Tensor) -> Tensor:  # (B, Hk, Tk, d) -> (B, Hk, K, d)
        index = keep[:, None, :, None].expand(states.shape[0], states.shape[1], -1, states.shape[3])
        return states.gather(2, index)

    layer.keys, layer.values = gather(layer.keys), gather(layer.values)


def is_static_cache(cache: Any) -> bool:
    return bool(getattr(cache, "is_compileable", False))


def forget_dequantized_gguf(model: nn.Module) -> None:
    """A model read from a GGUF file by transformers' dequantizing loader holds plain float tensors
    but keeps the GGUF quantizer, which refuses `save_pretrained`; drop that marker (and the config's
    quantization_config) so the merged weights save as ordinary safetensors."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        return
    if getattr(quantizer, "supported", False) or any(
        not isinstance(m, (nn.Linear, nn.Embedding)) and m.__class__.__module__.endswith("gguf")
        for m in model.modules()
    ):
        raise CtxpatchError("this model keeps its GGUF weights in quantized blocks, which cannot be merged and saved")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
