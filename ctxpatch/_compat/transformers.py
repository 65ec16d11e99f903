"""Everything that touches transformers' version-specific internals, in one place.

Tested on the transformers version the README installs. transformers 5.24 renamed the decoder
layers' `past_key_values` keyword to `cache` (the old name is accepted until 5.40); the name in use
is read off the attention module's signature, not assumed. Each function names one internal: the
attention function's keywords and module attributes (`scaling`, `layer_idx`, `sliding_window`), the
rotary module's call and return shape, `rope_parameters`, a model module's `apply_rotary_pos_emb`,
the cache's layers, config fields with private names, activation checkpointing.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface

from ..errors import CtxpatchError

IMPLEMENTATION = "ctxpatch"
CACHE_KWARG = "_ctxpatch_cache"  # how the attention module's cache reaches ctxpatch's attention function


def cache_keyword(attention: nn.Module) -> str:
    """The keyword an attention module's forward takes its KV cache under."""
    params = inspect.signature(type(attention).forward).parameters
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):  # layer_past: GPT-NeoX
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


def follows_attention_interface(model: nn.Module) -> bool:
    """Does the model's attention dispatch through `AttentionInterface` (transformers' own check; GPT-NeoX-Japanese,
    for one, computes attention itself, so a function registered there would never run)?"""
    for module in model.modules():  # a wrapper (peft) holds the transformers model inside
        check = getattr(type(module), "_can_set_attn_implementation", None)
        if check is not None:
            return bool(check())
    return True


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Select an attention implementation for this model instance (transformers' own setter)."""
    model.set_attn_implementation(name)


def cache_length(cache: Any, layer_idx: int) -> int:
    """How many keys the cache holds for a layer after its update. A sliding layer (the model's own window) keeps
    only its last `sliding_window - 1` keys, while its `get_seq_length` counts every key it was given."""
    layer = cache.layers[layer_idx] if hasattr(cache, "layers") else None
    if isinstance(layer, DynamicSlidingWindowLayer):
        return 0 if not layer.is_initialized else int(layer.keys.shape[-2])
    return int(cache.get_seq_length(layer_idx))


def cache_written(cache: Any, layer_idx: int) -> int:
    """How many keys have been written to a layer of the cache (less those cropped from its end): a sliding layer
    counts the keys it dropped too; any other layer holds them all."""
    return int(cache.get_seq_length(layer_idx))


def keep_cached(cache: Any, layer_idx: int, keep: Tensor) -> None:
    """Keep only the cached keys and values at indices `keep` (B, K) of one layer (a cache policy)."""
    layer = cache.layers[layer_idx]

    def gather(states: Tensor) -> Tensor:  # (B, Hk, Tk, d) -> (B, Hk, K, d)
        index = keep[:, None, :, None].expand(states.shape[0], states.shape[1], -1, states.shape[3])
        return states.gather(2, index)

    layer.keys, layer.values = gather(layer.keys), gather(layer.values)


def model_cache_keyword(model: nn.Module) -> str | None:
    """The keyword a causal LM's forward takes a KV cache by: `cache` since transformers 5.24, `past_key_values`
    before (a peft wrapper: its base model's); None for a forward that names neither."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature
        return None
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (`cache` since 5.24, `past_key_values` before), else None."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def holds_every_key(cache: Any, length: int) -> bool:
    """Whether a cache holds all `length` keys of every layer and `crop` can take them back (no sliding or
    evicting layer): the prefix it holds can be reused for a sequence that shares it."""
    layers = getattr(cache, "layers", None)
    if not layers or is_static_cache(cache) or not getattr(cache, "is_croppable", False):
        return False
    return all(cache_length(cache, n) == length for n in range(len(layers)))


def length_dependent_rope(model: nn.Module) -> bool:
    """Whether a rotary module of the model recomputes its frequencies from the length of each forward (the rope
    types `dynamic_rope_update` serves: "dynamic", "longrope"): keys cached by an earlier, shorter forward were
    then rotated with other frequencies than one forward over the whole sequence uses."""
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]  # one per layer type (Gemma 3)
        if any(isinstance(t, str) and ("dynamic" in t or t == "longrope") for t in types):
            return True
    return False


def crop_cache(cache: Any, keep: int) -> None:
    """Keep the first `keep` keys of every layer (a negative `crop` removes that many from the end in every
    transformers version; a positive one was a length before 5.x and is refused since)."""
    cache.crop(keep - int(cache.get_seq_length()))


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


# ---- the attention function's inputs --------------------------------------------------------------


def layer_index(attention: nn.Module) -> int:
    """The decoder layer an attention module belongs to (the cache's layer index)."""
    return attention.layer_idx


def attention_scaling(attention: nn.Module, scaling: float | None) -> float:
    """The score scale: the one the module passes, else its own `scaling` attribute."""
    return attention.scaling if scaling is None else scaling


def attention_position_ids(kwargs: dict[str, Any]) -> Tensor | None:
    """The position ids transformers hands the attention function, if any."""
    return kwargs.get("position_ids")


def native_sliding_window(kwargs: dict[str, Any]) -> int | None:
    """The model's own sliding window (Mistral), as the attention module passes it."""
    return kwargs.get("sliding_window")


def attention_softcap(kwargs: dict[str, Any]) -> float | None:
    """The model's attention-logit soft-capping c (Gemma 2: scores become c·tanh(s/c)), as the module passes it."""
    return kwargs.get("softcap") or None


def plain_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    padding: Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Any]:
    """transformers' own SDPA attention (the model's eager attention when it soft-caps: SDPA cannot), causal over
    key indices, for a module ctxpatch does not patch (a model that shares its config, and so its attention
    implementation, with a patched one).

    `padding` is the 2D boolean mask ctxpatch's mask function returns (None: all real). The 4D mask
    is causal (queries are the last keys), real keys only, inside the model's own sliding window;
    a query always sees itself, so a padding query's row is never empty.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    tq, tk = query.shape[2], key.shape[2]
    qi = torch.arange(tk - tq, tk, device=query.device)[:, None]  # (Tq, 1): each query's index among the keys
    kj = torch.arange(tk, device=query.device)[None, :]  # (1, Tk)
    seen = kj <= qi
    window = native_sliding_window(kwargs)
    if window is not None:
        seen = seen & (qi - kj < window)
    mask = seen[None, None]  # (1, 1, Tq, Tk)
    if padding is not None:
        mask = mask & padding[:, None, None, -tk:]  # (B, 1, Tq, Tk)
    mask = mask | (kj == qi)
    extra = {k: v for k, v in kwargs.items() if k not in ("position_ids", CACHE_KWARG, "is_causal")}
    if attention_softcap(kwargs) is not None:  # SDPA cannot cap: the model's own eager attention (Gemma 2)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~mask, torch.finfo(query.dtype).min)  # (B or 1, 1, Tq, Tk)
        return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling, **extra)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **extra
    )


# ---- rotary embeddings ------------------------------------------------------------------------------


def rotary_cos_sin(
    rotary: nn.Module, x: Tensor, positions: Tensor, layer_type: str | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, d_r) of a transformers rotary module at `positions` (B, T), bypassing the
    instance's hooks (a patched model's rotary module carries ctxpatch's identity hook). A module with
    one rope per layer type (Gemma 3: local layers have their own base) is asked for `layer_type`'s."""
    if layer_type is None:
        return type(rotary).forward(rotary, x, positions)
    return type(rotary).forward(rotary, x, positions, layer_type)


def rotary_layer_types(rotary: nn.Module) -> list[str] | None:
    """The layer types of a rotary module that holds one rope per layer type (Gemma 3), else None."""
    if hasattr(rotary, "inv_freq"):
        return None
    types = getattr(rotary, "layer_types", None)
    if not types or not all(hasattr(rotary, f"{t}_inv_freq") for t in types):
        return None
    return list(types)


def rotary_inv_freq(rotary: nn.Module, layer_type: str | None = None) -> Tensor:
    """The inverse frequencies of a rotary module (for `layer_type`, when it holds one rope per type)."""
    return rotary.inv_freq if layer_type is None else getattr(rotary, f"{layer_type}_inv_freq")


def attention_layer_type(attention: nn.Module, config: Any) -> str | None:
    """The layer type ("sliding_attention", "full_attention") of an attention module, if its config has types."""
    types = getattr(config, "layer_types", None)
    return getattr(attention, "layer_type", None) or (types[attention.layer_idx] if types else None)


def identity_rotary_output(output: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """What a rotary module returns for the identity rotation: cos 1, sin 0, in its own shapes."""
    cos, sin = output
    return torch.ones_like(cos), torch.zeros_like(sin)


def model_apply_rotary(attention: nn.Module) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """The `apply_rotary_pos_emb(q, k, cos, sin)` of the modeling module that defines `attention`'s class."""
    return getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's `rope_parameters` (rope_type, rope_theta, factor, ...), as a new dict; with `layer_type`,
    that type's own when the config holds one per layer type (Gemma 3)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(rope.get(layer_type), dict):
        return dict(rope[layer_type])
    return rope


def rotary_for_rope(
    rotary: nn.Module, config: Any, rope: dict[str, Any], train_len: int, layer_type: str | None = None
) -> nn.Module:
    """A second rotary module of `rotary`'s class built by transformers from a copy of `config` with
    these `rope_parameters` (its rope initialisers compute the frequencies); with `layer_type`, they replace
    that type's only. `dynamic` reads its original length from `max_position_embeddings`, so that is set to
    `train_len`."""
    scaled = copy.deepcopy(config)
    if layer_type is not None and isinstance(rope_parameters(config).get(layer_type), dict):
        rope = {**rope_parameters(config), layer_type: rope}
    scaled.rope_parameters = rope
    scaled.max_position_embeddings = train_len
    return type(rotary)(config=scaled)


def rebuild_rotary(rotary: nn.Module, config: Any) -> nn.Module:
    """A fresh rotary module of `rotary`'s class from `config` (its buffers made anew, e.g. after meta)."""
    return type(rotary)(config=config)


# ---- configs and models ----------------------------------------------------------------------------


def glm_config(**fields: Any):
    """transformers' `GlmConfig` with exactly these fields: GlmConfig fills in GLM-4's eos ids when
    given None, so the given eos_token_id is set again after construction."""
    from transformers import GlmConfig

    config = GlmConfig(**fields)
    config.eos_token_id = fields.get("eos_token_id")
    return config


def model_source(config: Any) -> str:
    """The folder or hub name a model was loaded from ("" when built from a config)."""
    return getattr(config, "_name_or_path", "") or ""


def model_revision(config: Any) -> str | None:
    """The hub commit a model was loaded from (None for a local folder)."""
    return getattr(config, "_commit_hash", None)


def enable_activation_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """transformers' activation (gradient) checkpointing; renamed in 5.24."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
