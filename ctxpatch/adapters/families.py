"""The supported model families: what sets each apart, and the tiny model the tests build of it.

One record per family. `tests/test_families.py` is parametrized over `FAMILIES` and runs every check of
`CHECKS` on each; `docs/families.md` holds `table()`, rendered from the same records (a test fails when the
two disagree). Families are recognised by structure (ctxpatch.adapters.llama), not by these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedModelError

# What tests/test_families.py checks: test function -> (label, what it asserts). CHECKS run on every family, EXTRA
# checks on the families that name them.
CHECKS = {
    "test_position_rule_inside_its_window_gives_the_models_logits": (
        "neutral rules",
        "`rerope`, `selfextend`, `leaky_rerope` with a window ≥ the sequence and (on plain RoPE) `linear` ×1 give "
        "the model's own logits, `dense` and `blockwise`",
    ),
    "test_cached_decoding_equals_full_forwards": (
        "cache", "chunked prefill and token-by-token decoding through the cache equal a full forward, seven rules (a cache policy among them)",
    ),
    "test_remove_is_exact": ("remove", "`remove()` gives the unpatched logits back bit for bit; no weight replaced"),
    "test_dense_equals_blockwise": (
        "dense = blockwise", "the `blockwise` backend equals the `dense` reference, left padding included, seven rules",
    ),
    "test_the_config_tells_what_the_model_does": (
        "config", "the config read before loading gives the loaded model's `ModelInfo`",
    ),
    "test_a_model_sharing_the_config_keeps_its_own_attention": (
        "shared config", "a second model on the patched one's config object computes its own attention",
    ),
}
EXTRA = {
    "test_flex_applies_gemma2s_soft_capping": ("flex = dense", "the `flex` backend's soft-capping equals `dense`"),
}
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]  # the tiny models' 3 layers, alternating


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' model_type of the tiny model the tests build
    differs: str  # what sets it apart from Llama, and what ctxpatch does about it
    tiny: dict[str, Any] = field(default_factory=dict)  # config fields of the tiny model, beyond the shared ones
    attn_implementation: str = "sdpa"  # what the unpatched tiny model runs (Gemma 2 has no SDPA in transformers)
    extra: tuple[str, ...] = ()  # EXTRA checks run on this family


FAMILIES: tuple[Family, ...] = (
    Family("Llama", "llama", "the reference layout: q/k/v/o projections, half-split rotary on the whole head"),
    Family(
        "Mistral", "mistral", "its own sliding window on every layer: the model's window wins (DESIGN.md)",
        {"sliding_window": 16},
    ),
    Family("Qwen2", "qwen2", "q/k/v biases", {"attention_bias": True}),
    Family("Qwen3", "qwen3", "q/k RMS norms before rotation (the model applies them)", {"head_dim": 8}),
    Family("GLM", "glm", "interleaved partial rotary (half the head)", {"head_dim": 16, "attention_bias": True}),
    Family("GLM-4", "glm4", "interleaved partial rotary (half the head)", {"head_dim": 16, "attention_bias": True}),
    Family(
        "Gemma 2", "gemma2",
        "attention-logit soft-capping c·tanh(s/c), applied by every backend before biases and masks (blockwise "
        "writes such layers' scores out per chunk: no fused kernel caps); `query_pre_attn_scalar` scale; "
        "sliding and global layers alternate",
        {"head_dim": 8, "query_pre_attn_scalar": 6, "attn_logit_softcapping": 5.0, "final_logit_softcapping": None,
         "sliding_window": 16, "layer_types": SLIDING},
        attn_implementation="eager",
        extra=("test_flex_applies_gemma2s_soft_capping",),
    ),
    Family(
        "Gemma 3", "gemma3_text",
        "local layers with their own rope base (`rope_local_base_freq`): one rotary map per layer type; q/k RMS "
        "norms; `query_pre_attn_scalar` scale; sliding and global layers alternate",
        {"head_dim": 8, "query_pre_attn_scalar": 6, "sliding_window": 16, "rope_local_base_freq": 100.0,
         "layer_types": SLIDING},
    ),
    Family(
        "Phi-3", "phi3",
        "fused `qkv_proj` (the model splits it: views, never copies); partial rotary applied by its own function",
        {"partial_rotary_factor": 0.5},
    ),
    Family(
        "Phi-3 with LongRoPE", "phi3",
        "LongRoPE in its config: L is its `original_max_position_embeddings`; ctxpatch rotates with the model's own "
        "rotary module, so its short/long factors and attention factor are the model's",
        {"partial_rotary_factor": 0.5, "max_position_embeddings": 64, "original_max_position_embeddings": 16,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "original_max_position_embeddings": 16, "short_factor": [1.0, 1.5],
                             "long_factor": [2.0, 4.0]}},
    ),
    Family(
        "GPT-NeoX", "gpt_neox",
        "fused `query_key_value`, `dense` output projection, partial rotary (`rotary_pct`)",
        {"rotary_pct": 0.5, "num_key_value_heads": None},
    ),
    Family(
        "Phi", "phi",
        "`dense` output projection, partial rotary of the first dims the module splits off, q/k layer norms",
        {"partial_rotary_factor": 0.5, "qk_layernorm": True, "num_key_value_heads": None},
    ),
    Family(
        "StableLM", "stablelm",
        "partial rotary of the first dims the module splits off, per-head q/k layer norms",
        {"partial_rotary_factor": 0.25, "qk_layernorm": True},
    ),
)


def table(families: tuple[Family, ...] = FAMILIES) -> str:
    """The supported-families table of docs/families.md, in Markdown, and what each check asserts."""
    every = ", ".join(label for label, _ in CHECKS.values())
    lines = ["| family | `model_type` tested | what differs | what is tested |", "|---|---|---|---|"]
    for f in families:
        tested = ", ".join([every] + [EXTRA[name][0] for name in f.extra])
        lines.append(f"| {f.name} | `{f.model_type}` | {f.differs} | {tested} |")
    lines += ["", *(f"* **{label}**: {text}." for label, text in [*CHECKS.values(), *EXTRA.values()])]
    return "\n".join(lines)


LATENT_ATTENTION = ("kv_lora_rank", "q_lora_rank")  # config fields of multi-head latent attention


def check_config(config: Any) -> None:
    """Refuse, from its config alone (before any weight loads), a family ctxpatch cannot reproduce: multi-head
    latent attention (DeepSeek-V2/V3, Kimi K2) caches a compressed latent and a separate rotary key, not the
    un-rotated keys ctxpatch re-rotates at any position."""
    found = [name for name in LATENT_ATTENTION if getattr(config, name, None) is not None]
    if found:
        model_type = getattr(config, "model_type", "?")
        raise UnsupportedModelError(
            f"ctxpatch cannot patch {model_type!r} models: their multi-head latent attention ({found[0]} in the "
            "config) caches compressed latents, not keys ctxpatch can re-rotate; docs/families.md lists the "
            "supported families"
        )
