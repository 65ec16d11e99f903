"""A rope-scaler patch in transformers' own terms, for a merged model's config.json.

A patch made of one rope scaler on every layer (linear, ntk, dynamic, yarn, llama3, longrope) is a change of
transformers' rotary embedding and nothing else: `merge` writes it as the config's native `rope_parameters`, so
plain transformers (and vLLM, TGI) compute it. ntk is rope_type "default" with a larger rope_theta. `dynamic`
reads its original length from `max_position_embeddings`, so that is set to the trained length.

Length-dependent scalers (dynamic, longrope) are exact in plain transformers for a full forward only: with a
KV cache transformers re-scales by the longest position so far, where ctxpatch keeps each key at the scaling
it was written with.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def native_rope_config(patch, model: nn.Module) -> dict[str, Any] | None:
    """The config values (rope_parameters, max_position_embeddings) under which transformers' own rotary
    embedding computes `patch`, or None when the patch is anything more than one rope scaler on every layer."""
    from ..adapters import find_adapter
    from ..positions.rope_scaling import RopeScaler

    if len(patch.methods) != 1 or not isinstance(patch.methods[0], RopeScaler):
        return None
    method, config = patch.methods[0], model.config
    base = getattr(config, "rope_parameters", None)
    if not isinstance(base, dict) or any(isinstance(v, dict) for v in base.values()):
        return None  # per-layer-type rope parameters: not one rotary embedding
    info = find_adapter(model).info
    if method.layers is not None and sorted(method.layers) != list(range(info.num_layers)):
        return None
    rope = method.rope_parameters(dict(base), info.train_len, info.rotary_dim)
    longest = info.train_len if rope["rope_type"] == "dynamic" else config.max_position_embeddings
    return {"rope_parameters": rope, "max_position_embeddings": longest}


def config_values(config, keys) -> dict[str, Any]:
    """The current values of `keys` in a transformers config (what a native merge replaces)."""
    return {key: _plain(getattr(config, key)) for key in keys}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value
