"""GLM-family models (transformers' `Glm`, `Glm4`): interleaved, partial rotary, qkv bias, few KV groups.

The rotary pair k of a GLM head is dims (2k, 2k+1) of its first d_r = d/2 dims; the other half
carries no position. Checked here with the Llama-family bar:
  * every method against a float64 evaluation of its formula at GLM's geometry (tests/formulas.py
    with `interleaved=True` and a partial `rotary_dim`), `blockwise` and `flex` against `dense`;
  * the un-rotated half is left alone by every position rule: attention that only reads it is the
    content-only formula whatever the rule and the positions, in the backends and in whole models;
  * whole Glm / Glm4 models, over every registered method: neutral parameters give the unpatched
    logits, remove() gives them back bit for bit, each cached decoding step equals a full forward,
    a left-padded row equals the row alone;
  * detection is structural: families ctxpatch never names are handled when their attention has a
    supported layout, and refused with the supported families listed when not.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM

import ctxpatch
import formulas as f
from conftest import TRAIN_LEN, tiny_model, token_ids
from ctxpatch.adapters import find_adapter
from ctxpatch.backends import blockwise
from harness import GLM_GEOMETRY, METHOD_CASES

# ---- the backends at GLM's geometry: d = 16, d_r = 8 (four interleaved pairs), 4 heads, 2 KV groups

G = GLM_GEOMETRY
H, HK, D, D_R, T = G.heads, G.kv_heads, G.head_dim, G.rotary_dim, G.length
make_call, inputs, runtime_for, run, reference, real_rows = G.make_call, G.inputs, G.runtime_for, G.run, G.reference, G.real_rows


def registered(*kinds: str) -> list[str]:
    """Names of every registered method (of the given kinds): new methods are covered as they land."""
    return sorted(m.name for m in ctxpatch.methods() if not kinds or m.kind in kinds)


CASES = METHOD_CASES + [
    ("xpos+rerope", {"window": 5, "scale_base": 16.0}),
    ("logn+yarn+bca", {"block_size": 6, "train_len": 6}),  # (logn+window would get the hybrid layer layout)
    ("hybrid+leaky_rerope+alibi", {"window": 5, "global_tokens": 2, "leak": 2.0}),
]
CASES = [(s, p) for s, p in CASES if set(s.split("+")) <= set(registered())]
IDS = [s for s, _ in CASES]


@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES, ids=IDS)
def test_dense_matches_formula_at_glm_geometry(spec, params, kind, tq):
    G.check_dense_against_formula(spec, params, kind, tq)


# flex on CPU runs FlexAttention's slow eager path and shares the rotation code with the others:
# a few position-heavy cases (every case runs through flex at Llama's geometry in test_formulas.py)
FLEX_CASES = [
    ("xpos+rerope", "padded", T),
    ("sinks", "skips", 3),
    ("hybrid+leaky_rerope+alibi", "padded", 3),
]
BACKEND_RUNS = [(s, p, kind, tq, "blockwise") for s, p in CASES for kind in ("padded", "skips") for tq in (T, 3)]
BACKEND_RUNS += [(s, p, kind, tq, "flex") for s, p in CASES for name, kind, tq in FLEX_CASES if name == s]


@pytest.mark.parametrize(
    "spec,params,kind,tq,backend", BACKEND_RUNS, ids=[f"{r[0]}-{r[2]}-{r[3]}-{r[4]}" for r in BACKEND_RUNS]
)
def test_backends_match_dense_at_glm_geometry(spec, params, kind, tq, backend, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 4)  # many chunks and key blocks on a short input
    G.check_backend_against_dense(backend, spec, params, kind, tq)


# ---- the un-rotated half of each head is left alone ----------------------------------------------

# parameters that make each position rule act on a 22-token input with L = 16
RULE_PARAMS = {
    "xpos": {"scale_base": 8.0},
    "rerope": {"window": 5},
    "leaky_rerope": {"window": 5, "leak": 4.0},
    "selfextend": {"window": 5, "group": 3},
    "dynamic": {"factor": 4.0},
    "longrope": {"factor": 4.0},
}


def only_dims(x, rotated: bool):
    """x with the other half of every head zeroed: the rotated dims (rotated=True) or the pass-through ones."""
    out = x.clone()
    if rotated:
        out[..., D_R:] = 0
    else:
        out[..., :D_R] = 0
    return out


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
@pytest.mark.parametrize("rule", registered("position"))
def test_position_rules_leave_the_pass_through_half_alone(rule, backend, monkeypatch):
    """q and k living in the un-rotated half: the output is content-only attention whatever the rule and
    the positions (skips included); living in the rotated half: the rule changes it (not vacuous)."""
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    params = RULE_PARAMS.get(rule, {})
    runtime = runtime_for(rule, params)
    q, k, v = inputs(T)
    for kind in ("plain", "skips"):
        k_pos, _ = make_call(kind)
        qp, kp = only_dims(q, rotated=False), only_dims(k, rotated=False)
        content = qp @ kp.repeat_interleave(H // HK, dim=1).transpose(-1, -2) * D**-0.5  # (B, H, T, T)
        expected = f.attention(qp, kp, v, content, f.causal(k_pos[:, None, :, None], k_pos[:, None, None, :]))
        assert_close(run(backend, runtime, qp, kp, v, k_pos, None, T), expected, rtol=1e-7, atol=1e-7)
    qr, kr = only_dims(q, rotated=True), only_dims(k, rotated=True)
    k_pos, _ = make_call("plain")
    unpatched = run(backend, runtime_for("window", {"window": 10_000}), qr, kr, v, k_pos, None, T)
    assert (run(backend, runtime, qr, kr, v, k_pos, None, T) - unpatched).abs().max() > 1e-4


# ---- whole Glm / Glm4 models (every method, every mode: test_model.py runs them with the other families)


def test_glm_rotary_is_found_interleaved_and_partial():
    for arch in ("glm", "glm4"):
        adapter = find_adapter(tiny_model(arch))
        assert adapter.rotary.layout.interleaved and adapter.rotary.layout.rotary_dim == 8
        assert (adapter.info.head_dim, adapter.info.num_kv_heads, adapter.info.train_len) == (16, 2, TRAIN_LEN)


@pytest.mark.parametrize("rule", registered("position"))
def test_model_reading_only_the_pass_through_half_ignores_every_position_rule(rule):
    """Zero q_proj/k_proj on the rotated dims of every head: the model no longer sees positions, so
    any position rule, and any position ids, give the unpatched logits."""
    model = tiny_model("glm")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                rows = proj.weight.view(-1, 16, proj.weight.shape[-1])  # (heads, head_dim, hidden)
                rows[:, :8] = 0
                proj.bias.view(-1, 16)[:, :8] = 0
    ids = token_ids(2, 40)
    skipping = torch.cat([torch.arange(10), torch.arange(10, 40) + 25]).expand(2, -1)
    with torch.no_grad():
        expected = model(ids).logits
        with ctxpatch.apply(model, rule, **RULE_PARAMS.get(rule, {})):
            # fp32 summation order only (two-view rules sum the same terms in another order): a real change is >= 1e-2
            assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-4)
            assert_close(model(ids, position_ids=skipping).logits, expected, rtol=1e-5, atol=1e-4)


# ---- structural detection ------------------------------------------------------------------------

FOREIGN = ["helium", "cohere", "ernie4_5", "granite", "olmo2", "starcoder2"]  # families ctxpatch never names


def foreign_model(model_type: str):
    config = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=TRAIN_LEN, initializer_range=0.35,
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("model_type", FOREIGN)
def test_unknown_family_with_a_supported_layout_is_handled(model_type):
    model = foreign_model(model_type)
    ids = token_ids(2, 28)
    with torch.no_grad():
        expected = model(ids).logits
        with ctxpatch.apply(model, "window", window=10_000):  # neutral: ctxpatch's own rotation must match the model's
            assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        with ctxpatch.apply(model, "window", window=4):
            assert not torch.allclose(model(ids).logits, expected)
        assert torch.equal(model(ids).logits, expected)


UNSUPPORTED = [
    ("gpt_neox_japanese", "eager", "GPTNeoXJapaneseAttention"),  # computes attention itself, not via AttentionInterface
    ("gpt_oss", "eager", "GptOssAttention"),  # a half-size cos/sin table (and attention sinks)
]


@pytest.mark.parametrize("model_type,implementation,attention", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unknown_family_with_another_layout_lists_the_supported_families(model_type, implementation, attention):
    config = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    message = rf"{type(model).__name__}.*'{model_type}'.*{attention}.*Supported: Llama, .*GLM, GLM-4 \(attention with"
    with pytest.raises(ctxpatch.UnsupportedModelError, match=message):
        ctxpatch.apply(model, "window")
    assert model.config._attn_implementation == implementation and ctxpatch.current_patch(model) is None
