"""Every method at fractional position ids (the `stretched` training scheme): rotation at real-valued
angles, masks and chunk/group rules on real values with floor-based ⌊·⌋ and mod.

  * the dense backend against the float64 formula (tests/formulas.py) at Llama's and GLM's geometry;
  * blockwise (tiny blocks, both of its paths: with gradients and without) and flex against dense;
  * a whole model: the patch passes fractional ids through untouched (a neutral patch gives the
    unpatched model's logits at the same fractional ids, which differ from those at their floors),
    gradients flow, and a cached continuation after a fractional prompt equals a full forward.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ctxpatch
import formulas as f
from conftest import tiny_model, token_ids
from ctxpatch.backends import blockwise
from harness import GLM_GEOMETRY, LLAMA_GEOMETRY, METHOD_CASES

LLAMA, GLM = LLAMA_GEOMETRY, GLM_GEOMETRY
T = LLAMA.length

CASES = METHOD_CASES + [
    ("hybrid", {"window": 3, "global_tokens": 2, "random_blocks": 2, "block_size": 2}),  # backends only
    ("xpos+dca+alibi", {"chunk_len": 5, "local_window": 4, "scale_base": 16.0}),
    ("selfextend+logn", {"window": 5, "group": 4, "train_len": 6}),
    ("hybrid+rerope", {"window": 5, "global_tokens": 2}),
    ("sinks+logn+sandwich", {"global_tokens": 2, "window": 6, "train_len": 8, "sandwich_dim": 8}),
    ("leaky_rerope+kerple_log+bca", {"window": 4, "leak": 2.0, "block_size": 8}),
]
IDS = [s + ("_random" if p.get("random_blocks") else "") for s, p in CASES]
FORMULA_CASES = [(s, p) for s, p in CASES if not p.get("random_blocks")]  # formulas.py has no random blocks
FORMULA_IDS = [s for s, _ in FORMULA_CASES]


def test_the_fractional_call_is_fractional_and_crosses_chunks():  # the cases below would pass on integers too
    k_pos, padding = LLAMA.make_call("stretched")
    assert k_pos.is_floating_point() and padding is None
    assert bool((k_pos != k_pos.floor()).any(-1).all())  # both rows hold non-integer positions
    assert float(k_pos.max()) > 2 * LLAMA.train_len - 1  # past the trained length: scalers and chunks act


@pytest.mark.parametrize("geometry", [LLAMA, GLM], ids=["llama", "glm"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", FORMULA_CASES, ids=FORMULA_IDS)
def test_dense_matches_formula_at_fractional_positions(spec, params, tq, geometry):
    geometry.check_dense_against_formula(spec, params, "stretched", tq)


@pytest.mark.parametrize("backend", ["blockwise", "flex"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES, ids=IDS)
def test_backends_match_dense_at_fractional_positions(spec, params, tq, backend, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 4)  # many chunks and key blocks on a short input
    LLAMA.check_backend_against_dense(backend, spec, params, "stretched", tq)


@pytest.mark.parametrize("spec,params", CASES, ids=IDS)
def test_blockwise_with_gradients_matches_dense_at_fractional_positions(spec, params, monkeypatch):
    """Training takes blockwise's gradient path (views side by side in one call): it must equal dense,
    and its gradients must equal dense's."""
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    k_pos, padding = LLAMA.make_call("stretched")
    q, k, v = LLAMA.inputs(T)
    runtime = LLAMA.runtime_for(spec, params)
    outs, grads = [], []
    for backend in ("dense", "blockwise"):
        qg = q.clone().requires_grad_()
        out = LLAMA.run(backend, runtime, qg, k, v, k_pos, padding, T)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(qg.grad)
    assert_close(outs[1], outs[0], rtol=1e-7, atol=1e-7)
    assert_close(grads[1], grads[0], rtol=1e-7, atol=1e-7)


def test_floor_semantics_of_the_formulas():
    """⌊·⌋ and mod on fractional positions: a position belongs to the chunk / group its floor names."""
    i = torch.tensor([[[[9.75]]]])
    j = torch.tensor([[[[0.5, 4.9, 5.0, 7.25]]]])
    # dca, s = 5, w = 2: chunks ⌊9.75/5⌋ = 1 against 0, 0, 1, 1; keys at j mod 5; query at 9.75 mod 5 = 4.75
    expected = torch.tensor(
        [[[[min(4.75 + 5, 7) - 0.5, min(4.75 + 5, 7) - 4.9, 4.75 - 0.0, 4.75 - 2.25]]]], dtype=torch.float64
    )
    assert_close(f.dca(i, j, 5, 2), expected, rtol=0, atol=1e-6)
    # selfextend, W = 3, G = 4: ⌊9.75/4⌋ - ⌊j/4⌋ + 3 - 0 where Δ >= 3
    expected = torch.tensor([[[[2 - 0 + 3, 2 - 1 + 3, 2 - 1 + 3, 9.75 - 7.25]]]], dtype=torch.float64)
    assert_close(f.selfextend(i, j, 3, 4), expected, rtol=0, atol=1e-6)
    # bca, B = 4: blocks 2 against 0, 1, 1, 1
    assert f.bca(i, j, 4).tolist() == [[[[False, True, True, True]]]]


# ---- a whole model: the patch passes fractional ids through ------------------------------------------


def fractional_positions(length: int, span: float) -> torch.Tensor:
    return (torch.arange(length, dtype=torch.float64) * (span / (length - 1))).float()[None]


def test_a_neutral_patch_keeps_the_models_own_rotation_at_fractional_positions():
    model = tiny_model("llama")
    ids = token_ids(1, 20)
    positions = fractional_positions(20, 30.3)
    ones = torch.ones_like(ids)  # an explicit mask: transformers would read jumps in the ids as packed sequences
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, attention_mask=ones).logits
        floored = model(input_ids=ids, position_ids=positions.floor(), attention_mask=ones).logits
        with ctxpatch.apply(model, "window", window=1000):
            got = model(input_ids=ids, position_ids=positions, attention_mask=ones).logits
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(floored, expected, atol=1e-3)  # fractional ids really reach the rotation


@pytest.mark.parametrize("spec", ["dca", "selfextend", "yarn", "hybrid", "kerple_log", "sinks", "xpos+rerope"])
def test_training_at_fractional_positions_has_finite_loss_and_gradients(spec):
    model = tiny_model("llama").train()
    ctxpatch.apply(model, spec, target_len=128)
    ids = token_ids(2, 24)
    positions = torch.cat([fractional_positions(24, 23.0), fractional_positions(24, 100.7)])
    loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(bool(torch.isfinite(g).all()) for g in grads)


def test_cached_continuation_after_fractional_positions_equals_a_full_forward():
    """The key record keeps fractional positions: a continuation whose position ids are given
    (fractional too) sees the cached keys where they were written, and one without position ids
    continues one after the last recorded position (still fractional)."""
    model = tiny_model("llama")
    ids = token_ids(1, 20)
    positions = fractional_positions(18, 40.5)
    after = positions[:, -1:] + 1 + torch.arange(2)  # what a continuation without position ids gets
    with torch.no_grad(), ctxpatch.apply(model, "dca", chunk_len=9, local_window=3):
        full = model(input_ids=ids, position_ids=torch.cat([positions, after], dim=1)).logits
        first = model(input_ids=ids[:, :12], position_ids=positions[:, :12], use_cache=True)
        cache = first.past_key_values
        middle = model(input_ids=ids[:, 12:18], position_ids=positions[:, 12:18], past_key_values=cache)
        last = model(input_ids=ids[:, 18:], past_key_values=cache)
    assert_close(torch.cat([first.logits, middle.logits, last.logits], dim=1), full, rtol=1e-5, atol=1e-5)
