"""Every supported family (ctxpatch.adapters.families.FAMILIES) on a tiny random model: the checks of `CHECKS`.

docs/families.md's table is rendered from the same records; `test_the_families_table_is_current` keeps it so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

import ctxpatch
from conftest import token_ids
from ctxpatch.adapters import find_adapter
from ctxpatch.adapters.families import CHECKS, EXTRA, FAMILIES, Family, table
from ctxpatch.backends import blockwise
from ctxpatch.docs import block_in
from ctxpatch.loading.base import load_base_model
from ctxpatch.preflight import info_from_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"
SHARED = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.35, pad_token_id=0,
    bos_token_id=None, eos_token_id=None, tie_word_embeddings=False,
)
NEUTRAL = [
    ("rerope", {"window": 10_000}),
    ("selfextend", {"window": 10_000}),
    ("leaky_rerope", {"window": 10_000}),
    ("linear", {"factor": 1.0}),  # rebuilt by transformers from the family's own rope (per layer type for Gemma 3)
]
ACTIVE = [
    ("selfextend", {"window": 6, "group": 4}),
    ("window", {"window": 6}),
    ("dca", {"chunk_len": 7, "local_window": 3}),
    ("alibi+logn", {"train_len": 8}),
    ("yarn", {}),
    ("sinks", {"global_tokens": 3, "window": 8}),  # a cache policy, on sliding layers too
    ("hybrid+rerope", {"window": 6, "global_tokens": 2}),
    ("retrieval", {"sinks": 2, "local_window": 6, "block_size": 4, "top_k": 2}),  # a selection: by content
]
PIECES = [(0, 17), (17, 25)] + [(t, t + 1) for t in range(25, 40)]  # chunked prefill, then one token at a time
IDS = [f.name.lower().replace(" ", "-") for f in FAMILIES]


def tiny(family: Family) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(family.model_type, **{**SHARED, **family.tiny})
    model = AutoModelForCausalLM.from_config(config, attn_implementation=family.attn_implementation)
    with torch.no_grad():  # biases start at zero: give them values so they are exercised
        for name, p in model.named_parameters():
            if name.endswith(("proj.bias", "query_key_value.bias")):
                p.normal_(0.0, 0.35)
    return model.eval()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 8)


def test_every_check_is_a_test():
    module = sys.modules[__name__]
    assert all(callable(getattr(module, name, None)) for name in [*CHECKS, *EXTRA])
    assert {name for f in FAMILIES for name in f.extra} == set(EXTRA)


def test_the_families_table_is_current():
    found = block_in(DOC.read_text(encoding="utf-8"), "families")
    assert found is not None, "docs/families.md lost its <!-- families:start/end --> markers"
    assert found == table() + "\n", "docs/families.md is stale: run `python -m ctxpatch.docs --write`"


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
@pytest.mark.parametrize("spec,params", NEUTRAL, ids=[s for s, _ in NEUTRAL])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_position_rule_inside_its_window_gives_the_models_logits(family, spec, params, backend):
    model = tiny(family)
    if spec == "linear" and model.config.rope_parameters.get("rope_type", "default") != "default":
        pytest.skip("a rope scaler replaces the model's own rope type (LongRoPE): x1 is plain RoPE, not the model's")
    ids = token_ids(2, 28)
    with torch.no_grad():
        expected = model(ids).logits
        with ctxpatch.apply(model, spec, backend=backend, **params):
            got = model(ids).logits
    assert_close(got, expected, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("spec,params", ACTIVE, ids=[s for s, _ in ACTIVE])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_cached_decoding_equals_full_forwards(family, spec, params):
    model = tiny(family)
    ids = token_ids(2, 40)
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        whole = model(ids).logits
        cache, pieces = None, []
        for start, stop in PIECES:
            out = model(ids[:, start:stop], past_key_values=cache, use_cache=True)
            cache, _ = out.past_key_values, pieces.append(out.logits)
    assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_remove_is_exact(family):
    model = tiny(family)
    ids = token_ids(2, 40)
    implementation = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids).logits
        weights = dict(model.named_parameters())
        patch = ctxpatch.apply(model, "selfextend", window=6, group=4)
        patched = model(ids).logits
        # the model's own projections run, fused ones split by the model: no weight replaced or copied
        assert dict(model.named_parameters()).keys() == weights.keys()
        assert all(p is weights[name] for name, p in model.named_parameters())
        patch.remove()
        after = model(ids).logits
    assert not torch.equal(patched, before)  # the patch did something
    assert torch.equal(after, before)
    assert model.config._attn_implementation == implementation


@pytest.mark.parametrize("spec,params", ACTIVE, ids=[s for s, _ in ACTIVE])
@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_dense_equals_blockwise(family, spec, params):
    model = tiny(family)
    ids = token_ids(2, 36)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 left-padded
    out = {}
    with torch.no_grad():
        for backend in ("dense", "blockwise"):
            with ctxpatch.apply(model, spec, backend=backend, **params):
                out[backend] = model(ids.masked_fill(mask == 0, 0), attention_mask=mask).logits
    assert_close(out["blockwise"][0], out["dense"][0], rtol=1e-4, atol=1e-4)
    assert_close(out["blockwise"][1, 5:], out["dense"][1, 5:], rtol=1e-4, atol=1e-4)


FLEX = [f for f in FAMILIES if "test_flex_applies_gemma2s_soft_capping" in f.extra]


@pytest.mark.parametrize("spec,params", [("rerope", {"window": 10_000}), ("selfextend", {"window": 6, "group": 4})])
@pytest.mark.parametrize("family", FLEX, ids=[f.model_type for f in FLEX])
def test_flex_applies_gemma2s_soft_capping(family, spec, params):
    """FlexAttention caps in its score_mod: it agrees with the dense reference (its CPU path is eager: slow, so
    the family whose scores are capped)."""
    model = tiny(family)
    ids = token_ids(1, 20)
    out = {}
    with torch.no_grad():
        for backend in ("dense", "flex"):
            with ctxpatch.apply(model, spec, backend=backend, **params):
                out[backend] = model(ids).logits
    assert_close(out["flex"], out["dense"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_the_config_tells_what_the_model_does(family):
    """The preflight plans a spec from the config alone: it must see the model the adapter finds once loaded."""
    model = tiny(family)
    assert info_from_config(model.config) == find_adapter(model).info


@pytest.mark.parametrize("family", FAMILIES, ids=IDS)
def test_a_model_sharing_the_config_keeps_its_own_attention(family):
    """Patching names ctxpatch on the config; a second model built on the same config object has no ctxpatch runtime
    and computes the model's own attention (Gemma 2's soft-capping and sliding layers included)."""
    patched = tiny(family)
    other = type(patched)(patched.config).eval()  # the same config object
    other.load_state_dict(patched.state_dict())
    ids = token_ids(1, 24)
    with torch.no_grad():
        expected = other(ids).logits
        with ctxpatch.apply(patched, "window", window=5):
            got = other(ids).logits
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def latent_attention_config():
    return AutoConfig.for_model(
        "deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, max_position_embeddings=32, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
    )


LATENT = r"cannot patch 'deepseek_v3' models: their multi-head latent attention \(kv_lora_rank"


def test_latent_attention_is_refused_from_its_config_before_weights_load(tmp_path):
    """DeepSeek-V2/V3 and Kimi cache compressed latents: refused from config.json alone (no weights in the
    folder: loading would fail on them if the refusal came later), by the preflight and by `apply`."""
    config = latent_attention_config()
    config.save_pretrained(tmp_path)
    with pytest.raises(ctxpatch.UnsupportedModelError, match=LATENT):
        load_base_model(str(tmp_path))
    with pytest.raises(ctxpatch.UnsupportedModelError, match=LATENT):
        info_from_config(config)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ctxpatch.UnsupportedModelError, match=LATENT):
        ctxpatch.apply(model, "window")
