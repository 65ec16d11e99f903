"""k-view position rules (dca, string) and parameters from the target length.

Formulas and backends are checked in test_formulas.py / test_model.py; here: the rules' block
bounds, the cache, huge positions in bf16, refusals, and each method's `target_len` rule against
its paper's inequality evaluated by brute force.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.testing import assert_close

import ctxpatch
from conftest import TRAIN_LEN, tiny_model, token_ids
from ctxpatch.backends import blockwise, get_backend
from ctxpatch.plan import AttentionCall
from ctxpatch.compose import build_plan
from ctxpatch.registry import ModelInfo, method

INFO = ModelInfo(train_len=8192, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rotary_dim=16)


def resolved(spec: str, target_len: int | None = None, **params):
    methods, _ = build_plan(spec, params, INFO, target_len)
    return methods[0]


# ---- the rules' block bounds are conservative ---------------------------------------------------


@pytest.mark.parametrize("rule", [method("dca", chunk_len=5, local_window=2), method("dca", chunk_len=7, local_window=6),
                                  method("string", offset=6, local_window=2)])
def test_views_needed_covers_every_pair_of_a_block(rule):
    rule = rule.resolve(ModelInfo(16, 1, 2, 2, 8, 8))
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i_lo, j_lo = torch.randint(0, 40, (2,), generator=g).tolist()
        i_hi, j_hi = i_lo + int(torch.randint(0, 9, (1,), generator=g)), j_lo + int(torch.randint(0, 9, (1,), generator=g))
        i, j = torch.arange(i_lo, i_hi + 1)[:, None], torch.arange(j_lo, j_hi + 1)[None, :]
        used = set(rule.select(i, j).long()[j <= i].tolist())
        needs = rule.views_needed(*(torch.tensor(x) for x in (i_lo, i_hi, j_lo, j_hi)))
        assert all(bool(needs[n]) for n in used), (i_lo, i_hi, j_lo, j_hi, used)


def test_dca_relative_positions_stay_below_chunk_plus_window():
    rule = resolved("dca")  # L = 8192: w = 1024, s = 6144 - 1024
    assert (rule.local_window, rule.chunk_len) == (1024, 5120)
    i = torch.arange(0, 70_000, 37)[:, None]
    j = torch.arange(0, 70_000, 41)[None, :]
    rel = rule.relative(i, j)[j <= i]
    assert int(rel.min()) >= 0 and int(rel.max()) <= rule.chunk_len + rule.local_window < INFO.train_len


@pytest.mark.parametrize("spec,key_rotations", [("string", 1), ("dca", 1), ("selfextend", 2)])
def test_views_that_map_keys_alike_rotate_them_once(monkeypatch, spec, key_rotations):
    from ctxpatch.rotary import Rotary

    model = tiny_model("llama", num_hidden_layers=1)
    rotated = []
    real = Rotary.rotate
    monkeypatch.setattr(Rotary, "rotate", lambda self, x, positions: rotated.append(x.shape[1]) or real(self, x, positions))
    with torch.no_grad(), ctxpatch.apply(model, spec):
        model(token_ids(1, 40))
    kv_heads = model.config.num_key_value_heads
    assert rotated.count(kv_heads) == key_rotations, rotated


# ---- under the cache, in pieces, in bf16 ----------------------------------------------------------


@pytest.mark.parametrize("spec,params", [("dca", {"chunk_len": 7, "local_window": 3}), ("string", {"offset": 9, "local_window": 3})])
def test_prompt_in_pieces_through_the_cache_equals_one_forward(spec, params, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 8)
    model = tiny_model("llama")
    ids = token_ids(1, 40)
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        whole = model(ids).logits
        first = model(ids[:, :13], use_cache=True)
        second = model(ids[:, 13:29], past_key_values=first.past_key_values, use_cache=True)
        third = model(ids[:, 29:], past_key_values=second.past_key_values, use_cache=True)
    assert_close(torch.cat([first.logits, second.logits, third.logits], dim=1), whole, rtol=1e-5, atol=1e-5)


GRAD_CASES = [
    ("dca", {"chunk_len": 7, "local_window": 3}),
    ("selfextend", {"window": 6, "group": 3}),
    ("string", {"offset": 9, "local_window": 3}),
    ("dca+alibi", {"chunk_len": 7, "local_window": 3}),
]


@pytest.mark.parametrize("fractional", [False, True])
@pytest.mark.parametrize("spec,params", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_through_the_merged_view_kernels_equal_dense(spec, params, fractional, monkeypatch):
    """A fine-tune's backward on `blockwise` goes through each view's kernel backward against the merged
    output and log-sum-exp (lse_views._MergedViews); in float64 it equals `dense`'s autograd, with chunk
    boundaries inside and across key blocks, a left-padded row and fractional training positions."""
    from ctxpatch.backends import lse_views

    monkeypatch.setattr(blockwise, "BLOCK", 8)
    ran = []
    backward = lse_views._MergedViews.backward
    counted = staticmethod(lambda ctx, g: ran.append(1) or backward(ctx, g))
    monkeypatch.setattr(lse_views._MergedViews, "backward", counted)
    ids, mask = token_ids(2, 37), torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0).double()
    if fractional:
        positions = positions * 1.7  # stretched-like: 1.7 positions between neighbours
    grads = {}
    for backend in ("dense", "blockwise"):
        model = tiny_model("llama", dtype=torch.float64).train()
        with ctxpatch.apply(model, spec, backend=backend, **params):
            loss = model(ids, attention_mask=mask, position_ids=positions, labels=ids).loss
            loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ran, "the blockwise backward did not go through the merged view kernels"
    assert any(n.endswith("k_proj.weight") for n in grads["dense"])
    for name, grad in grads["dense"].items():
        assert_close(grads["blockwise"][name], grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("spec", ["dca", "string", "selfextend"])
def test_bf16_is_finite_and_close_past_131072(spec):
    """Positions past 2^17: bf16 cannot even hold them exactly, the rules must still give finite,
    fp32-close attention (positions stay int64 until rotation)."""
    info = ModelInfo(8192, 1, 4, 2, 16, 16)
    methods, plans = build_plan(spec, {}, info)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ctxpatch.plan import make_runtime
    from ctxpatch.rotary import Rotary, RotaryLayout

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    runtime = make_runtime(plans[0], Rotary(LlamaRotaryEmbedding(config), RotaryLayout(False, 16)), config, info, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 64, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    k_pos = torch.cat([torch.arange(10), torch.arange(140_000, 140_290)])[None]  # far sinks and a recent run
    call = AttentionCall(q_pos=k_pos[:, -64:], k_pos=k_pos, key_padding=None, scaling=0.25)
    expected = get_backend("dense")(q, k, v, call, runtime)
    got = get_backend("blockwise")(q.bfloat16(), k.bfloat16(), v.bfloat16(), call, runtime).float()
    assert torch.isfinite(got).all()
    assert_close(got, expected, rtol=0.05, atol=0.05)


# ---- refusals change nothing ---------------------------------------------------------------------


@pytest.mark.parametrize("spec,params,message", [
    ("dca", {"chunk_len": 20, "local_window": 12}, "chunk_len \\+ local_window < 32"),
    ("dca", {"chunk_len": 4, "local_window": 4}, "0 < local_window < chunk_len"),
    ("string", {"offset": 33}, "local_window < offset <= 32"),
    ("string", {"offset": 5, "local_window": 5}, "local_window < offset"),
])
def test_refusals_leave_the_model_untouched(spec, params, message):
    model = tiny_model("llama")
    ids = token_ids(1, 20)
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(ValueError, match=message):
            ctxpatch.apply(model, spec, **params)
        assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert ctxpatch.current_patch(model) is None


# ---- parameters from the target length -----------------------------------------------------------


def smallest(condition):
    return next(n for n in range(1, 10_000) if condition(n))


@pytest.mark.parametrize("target", [8192, 12_000, 16_384, 32_768, 65_536, 131_072])
def test_selfextend_takes_the_smallest_group_that_satisfies_its_inequality(target):
    w, train = 2048, 8192
    expected = smallest(lambda g: math.floor((target - 1) / g) + w - math.floor(w / g) < train)
    assert resolved("selfextend", target).group == expected


@pytest.mark.parametrize("target", [16_384, 32_768, 65_536])
def test_leaky_rerope_takes_the_smallest_leak(target):
    w, train = 4096, 8192
    assert resolved("leaky_rerope", target).leak == smallest(lambda k: w + (target - 1 - w) / k < train)


@pytest.mark.parametrize("name", ["linear", "ntk", "yarn", "llama3", "longrope"])
def test_scalers_take_the_length_ratio(name):
    assert resolved(name, 65_536).factor == 8.0
    assert resolved(name, 12_288).factor == 1.5


def test_dynamic_and_dca_and_rerope_need_nothing():
    for name in ("dynamic", "dca", "rerope"):
        assert resolved(name, 65_536).values == resolved(name).values
        assert resolved(name, 65_536).derived == ()


def test_string_offset_shows_the_largest_distance_at_l_minus_one():
    rule = resolved("string", 12_000)
    assert (rule.offset, rule.local_window) == (12_000 - 8192 + 128, 128)
    i, j = torch.tensor(11_999), torch.tensor(0)
    assert int(rule.relative(i, j)) == 8191
    with pytest.raises(ValueError, match="string reaches at most 2L - W = 16256"):
        resolved("string", 16_384)


def test_a_given_value_wins_with_a_warning_when_it_breaks_the_bound():
    with pytest.warns(UserWarning, match="grouped distances reach .* >= L = 8192"):
        rule = resolved("selfextend", 65_536, group=4)
    assert rule.group == 4 and rule.derived == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolved("selfextend", 65_536, group=16).group == 16  # inside the bound: no warning
    with pytest.warns(UserWarning, match="covers 16384 tokens, below target_len=65536"):
        resolved("yarn", 65_536, factor=2.0)


def test_target_len_is_recorded_and_shown():
    model = tiny_model("llama")
    with ctxpatch.apply(model, "selfextend+logn", target_len=4 * TRAIN_LEN, window=8) as patch:
        record = patch.to_dict()
        text = repr(patch)
    assert record["target_len"] == 128
    selfextend = record["methods"][0]
    # smallest G with floor(127 / G) + 8 - floor(8 / G) < 32
    assert selfextend["params"]["group"] == smallest(lambda g: 127 // g + 8 - 8 // g < 32)
    assert selfextend["from_target_len"] == ["group"]
    assert "target_len=128" in text and "group from target_len" in text


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "32k"])
def test_a_bad_target_len_is_refused(bad):
    with pytest.raises(ValueError, match="target_len=.* must be a positive number of tokens"):
        ctxpatch.apply(tiny_model("llama"), "selfextend", target_len=bad)
