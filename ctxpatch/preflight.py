"""What can be checked before a model loads: that a spec's plan fits the model's config (layer indices,
parameters whose defaults come from the model, the target length). The model name itself is read by
`ctxpatch.loading.model_ref`.

Loading a real model takes from seconds to minutes; a typo should cost neither. Every failure is a
`UserInputError` whose message says what to give instead.
"""

from __future__ import annotations

import warnings
from typing import Any

from .loading.reference import config_train_len
from .registry import Method, ModelInfo

def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` a config (a transformers config, or a ChatGLM config.json as a dict) sets."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def info_from_config(config: Any, train_len: int | None = None) -> ModelInfo | None:
    """The `ModelInfo` an adapter would find, read off the config (no weights); None when the config does not
    say (a layout only the loaded model tells: the adapter judges it then). A ChatGLM config.json (a dict)
    is read by its own names. `train_len` defaults to the config's (`config_train_len`, one rule)."""

    from .adapters.families import check_config

    if not isinstance(config, dict):
        check_config(config)  # a family ctxpatch cannot reproduce: said before anything loads

    def get(*names: str) -> Any:
        return config_value(config, *names)

    heads, layers, hidden = get("num_attention_heads"), get("num_hidden_layers", "num_layers"), get("hidden_size")
    if config is None or not all(isinstance(v, int) for v in (heads, layers, hidden)):
        return None
    if train_len is None:
        if not isinstance(get("max_position_embeddings", "seq_length", "max_sequence_length"), int):
            return None
        train_len = config_train_len(config)
    head_dim = get("head_dim", "kv_channels") or hidden // heads
    rope = get("rope_parameters") or {}
    half = isinstance(config, dict)  # ChatGLM2/3 rotate half of each head
    factor = get("partial_rotary_factor") or rope.get("partial_rotary_factor") or (0.5 if half else 1.0)
    return ModelInfo(
        train_len=train_len,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", "multi_query_group_num") or heads,
        head_dim=head_dim,
        rotary_dim=2 * (int(head_dim * factor) // 2),
    )


def check_plan(
    methods: list[Method], params: dict[str, Any], info: ModelInfo | None, target_len: int | None = None
) -> None:
    """Plan the spec on a model of this shape (at `target_len`): every refusal `apply` would raise, raised now."""
    from .compose import build_plan

    if info is not None:
        build_plan(methods, dict(params), info, target_len)


def warn_if_not_longer(target_len: int | None, train_len: int | None, option: str = "--target-len") -> None:
    """A target at or below the trained length extends nothing: say so (it is allowed: a neutral check)."""
    if target_len is not None and train_len is not None and target_len <= train_len:
        warnings.warn(
            f"{option} {target_len} is not above the model's trained length {train_len}: there is nothing to "
            f"extend; pass a longer target (e.g. {2 * train_len}) or leave it out",
            stacklevel=2,
        )
