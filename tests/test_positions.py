"""Position rules under the KV cache: sinks at constant memory, xpos at large offsets, chunked prefill,
and the cost structure of two-view rules in the blockwise backend."""

from __future__ import annotations

import formulas as f
import pytest
import torch
import torch.nn.functional as F
from conftest import TRAIN_LEN, tiny_model, token_ids
from torch.testing import assert_close

import ctxpatch
from ctxpatch.backends import blockwise, get_backend
from ctxpatch.compose import build_plan
from ctxpatch.plan import AttentionCall, make_runtime
from ctxpatch.registry import ModelInfo
from ctxpatch.rotary import Rotary, RotaryLayout


def test_sinks_generates_four_times_the_training_length_at_constant_memory():
    """StreamingLLM: generate 4x train_len; the cache ends at global_tokens + window keys per layer,
    and every step equals a full forward of the sequence so far under the same rule."""
    model = tiny_model("llama")
    prompt = token_ids(1, 8)
    new = 4 * TRAIN_LEN - prompt.shape[1]
    with torch.no_grad(), ctxpatch.apply(model, "sinks", global_tokens=4, window=12):
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )
        sizes = [out.past_key_values.get_seq_length(layer) for layer in range(3)]
        full = model(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    assert out.sequences.shape[1] == 4 * TRAIN_LEN
    assert sizes == [4 + 12] * 3
    assert torch.equal(out.sequences[:, prompt.shape[1] :], full.argmax(-1))
    assert_close(torch.stack(out.logits, dim=1), full, rtol=1e-4, atol=1e-4)


def test_sinks_without_eviction_pressure_is_the_plain_model():
    model = tiny_model("qwen2")
    ids = token_ids(2, 20)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        with ctxpatch.apply(model, "sinks", global_tokens=4, window=100):
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("spec,params", [("selfextend", {"window": 6, "group": 4}), ("sinks", {"global_tokens": 2, "window": 9})])
def test_prompt_fed_in_chunks_generates_the_same(spec, params):
    model = tiny_model("llama")
    ids = token_ids(1, 40)
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        once = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        cache, logits = None, []
        for start in range(0, 40, 13):  # 13-token chunks through the cache, then greedy by hand
            out = model(ids[:, start : start + 13], past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, logits + [out.logits]
        seq = ids
        for _ in range(8):
            token = logits[-1][:, -1:].argmax(-1)
            seq = torch.cat([seq, token], dim=1)
            out = model(token, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, logits + [out.logits]
    assert torch.equal(seq, once)


def _xpos_call(offset: int, tq: int, tk: int):
    k_pos = (torch.arange(tk) + offset).view(1, tk)
    return AttentionCall(q_pos=k_pos[:, tk - tq :], k_pos=k_pos, key_padding=None, scaling=8**-0.5)


@pytest.mark.parametrize("tq", [40, 1])  # a prefill and a decoding step
def test_xpos_bf16_at_64k_positions_matches_float64(tq, monkeypatch):
    """The centre trick: at positions past 65,536 the factors zeta^(±(p - c)/gamma) would over- or
    underflow with a fixed centre; with the centre next to the queries bf16 keeps full precision."""
    monkeypatch.setattr(blockwise, "BLOCK", 16)
    info = ModelInfo(train_len=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, rotary_dim=8)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
    _, plans = build_plan("xpos", {"scale_base": 64.0}, info)
    runtime = make_runtime(plans[0], Rotary(LlamaRotaryEmbedding(config), RotaryLayout(False, 8)), config, info, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, tq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 1, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    call = _xpos_call(65_536 * 2, tq, 40)
    got = get_backend("blockwise")(q.bfloat16(), k.bfloat16(), v.bfloat16(), call, runtime).transpose(1, 2).double()
    assert torch.isfinite(got).all()
    # float64 formula on the same bf16-rounded inputs, at the true (huge) positions
    qd, kd, vd = q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double()
    i, j = call.q_pos[:, None, :, None], call.k_pos[:, None, None, :]
    theta = f.default_theta(8, config.rope_parameters["rope_theta"])
    weights = f.xpos_weights(i, j, 8, 64.0)
    # rotation angles at 1.3e5 in fp32 (as transformers computes them) cost ~1e-2 rad: compare the decay and
    # the relative rotation, which is what xpos defines, with the angles transformers uses
    scores = f.rotary_scores(qd, kd, (i - j).double(), theta, 8, pair_weights=weights) * 8**-0.5
    expected = f.attention(qd, kd, vd, scores, f.causal(i, j))
    assert_close(got, expected, rtol=0.05, atol=0.05)


def test_two_view_rules_cost_one_extra_product_only_where_views_meet(monkeypatch):
    """ReRoPE at n = 640, W = 64, blocks of 32: each SDPA call holds every visible key once, plus a
    second copy only of the key blocks where near and far pairs meet (a band of ~W + 2 blocks)."""
    monkeypatch.setattr(blockwise, "BLOCK", 32)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], q.shape[-1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(blockwise.F, "scaled_dot_product_attention", spy)
    model = tiny_model("llama", num_hidden_layers=1, max_position_embeddings=128)
    n = 640
    with torch.no_grad(), ctxpatch.apply(model, "rerope", window=64):
        model(token_ids(1, n))
    for index, (rows, keys, width) in enumerate(calls):
        visible = (index + 1) * 32  # causal: keys up to the chunk's last query
        assert keys <= visible + 64 + 2 * 32, (index, keys)
        assert width == 2 * 8  # two views side by side (head_dim 8)


def test_beam_search_on_a_left_padded_batch_is_the_same_with_and_without_the_cache():
    """generate(num_beams=4) reorders the cache between steps; every beam keeps its positions."""
    model = tiny_model("llama")
    ids = token_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ids = ids.masked_fill(mask == 0, 0)
    beams = {"max_new_tokens": 8, "num_beams": 4, "num_return_sequences": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, **beams)
        with ctxpatch.apply(model, "selfextend", window=6, group=4):
            cached = model.generate(ids, attention_mask=mask, **beams)
            uncached = model.generate(ids, attention_mask=mask, use_cache=False, **beams)
    assert cached.shape == (8, 28)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # selfextend acts at these lengths


@pytest.mark.parametrize("position", [0, 5])
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_rotation_at_one_position_for_every_token_matches_the_formula(position, rope):
    """A far view rotates every key at one position (ReRoPE's 0, its query's W): one table row is broadcast. At
    position 0 the rotation is not the identity under YaRN (cos and sin carry its attention scaling)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    if rope is not None:
        config.rope_parameters = {**config.rope_parameters, **rope}
    module = LlamaRotaryEmbedding(config).double()
    rotary = Rotary(module, RotaryLayout(False, 16))
    x = torch.randn(2, 1, 7, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = rotary.rotate(x, torch.full((2, 7), position))
    theta = module.inv_freq.double()  # (8,): YaRN's frequencies are its own
    turned = f.pairs(x, 16, False) * torch.exp(1j * position * theta) * module.attention_scaling  # (2, 1, 7, 8)
    expected = torch.cat([turned.real, turned.imag], dim=-1)
    assert_close(got, expected, rtol=1e-6, atol=1e-6)  # transformers makes its tables in float32
    assert rope is None or module.attention_scaling != 1.0
