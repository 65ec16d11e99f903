"""`retrieval` (a selection): its exact ends against the float64 formulas, its scorers against a direct evaluation,
its choices independent of how the tokens are fed, and its refusals leaving the model untouched.

Backend agreement, padding, GQA, bf16, gradients and generation on whole models are in test_formulas.py and
test_model.py with every other method.
"""

from __future__ import annotations

import itertools
import math
import warnings

import formulas as f
import pytest
import torch
from harness import LLAMA_GEOMETRY as G
from torch.testing import assert_close

import ctxpatch
from conftest import tiny_model, token_ids
from ctxpatch.backends import blockwise, selected
from ctxpatch.errors import ParameterValueError
from ctxpatch.registry import ModelInfo, method

BACKENDS = ["dense", "blockwise", "flex"]
SMALL = {"sinks": 2, "local_window": 4, "block_size": 3}


@pytest.fixture(params=["union", "blocks"])
def path(request, monkeypatch):
    """The blockwise backend's two ways: every chosen block of a chunk at once, or block by block."""
    monkeypatch.setattr(selected, "UNION_MAX", 10**9 if request.param == "union" else 0)
    monkeypatch.setattr(selected, "ROWS", 4)  # several chunks at the tests' 22 queries, narrower than a window
    monkeypatch.setattr(selected, "PAIR_BUDGET", 700)  # several batches of explicit pairs per head group
    monkeypatch.setattr(selected, "PARTS_BUDGET", 160)  # chosen blocks merged in windows of 2 to 10 of the 22 rows
    return request.param


@pytest.mark.parametrize("kind", ["plain", "padded", "skips", "stretched"])
@pytest.mark.parametrize("per", ["head", "kv_head", "layer"])
@pytest.mark.parametrize("scorer", ["mean", "quest"])
@pytest.mark.parametrize("window", [4, 10])  # 10: a chunk sees the middle of its window whole (no mask)
@pytest.mark.parametrize("summary", [2, 3])  # B = 3: parts of 2 and 1 keys, or the whole block (default here: 1 key)
def test_blockwise_paths_match_the_formula(path, kind, per, scorer, window, summary):
    params = {**SMALL, "top_k": 2, "per": per, "scorer": scorer, "local_window": window, "summary_size": summary}
    _blockwise_matches_the_formula(params, kind)


@pytest.mark.parametrize("kind", ["plain", "padded", "skips", "stretched"])
@pytest.mark.parametrize("window", [4, 10])
def test_near_keys_gathered_instead_of_sliced_match_the_formula(kind, window, monkeypatch):
    """The block path's window and sinks with their unmasked keys gathered into one copy (many runs) rather than
    attended slice by slice."""
    monkeypatch.setattr(selected, "UNION_MAX", 0)
    monkeypatch.setattr(selected, "ROWS", 4)
    monkeypatch.setattr(selected, "RUNS_MAX", 0)
    _blockwise_matches_the_formula({**SMALL, "top_k": 2, "local_window": window, "summary_size": 2}, kind)


def _blockwise_matches_the_formula(params: dict, kind: str) -> None:
    k_pos, padding = G.make_call(kind)
    q, k, v = G.inputs(G.length)
    runtime = G.runtime_for("retrieval", params)
    got = G.run("blockwise", runtime, q, k, v, k_pos, padding, G.length)
    expected = G.reference("retrieval", params, runtime, q, k, v, k_pos, padding, G.length)
    assert_close(G.real_rows(got, padding, G.length), G.real_rows(expected, padding, G.length), rtol=1e-6, atol=1e-6)


def _run(spec: str, params: dict, backend: str, kind: str = "padded"):
    k_pos, padding = G.make_call(kind)
    q, k, v = G.inputs(G.length)
    runtime = G.runtime_for(spec, params)
    return G.real_rows(G.run(backend, runtime, q, k, v, k_pos, padding, G.length), padding, G.length), (q, k, v, k_pos, padding)


def _formula(visible_fn, rel_fn, q, k, v, k_pos, padding):
    """Attention with the given visible pairs and relative positions, from tests/formulas.py alone."""
    i, j = k_pos[:, None, :, None], k_pos[:, None, None, :]
    key_real = None if padding is None else padding[:, None, None, :]
    scores = f.rotary_scores(q, k, rel_fn(i, j), f.default_theta(G.rotary_dim, 10000.0), G.rotary_dim)
    out = f.attention(q, k, v, scores * G.head_dim**-0.5, f.causal(i, j, key_real) & visible_fn(i, j))
    return G.real_rows(out, padding, G.length)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
def test_every_block_chosen_is_rerope_at_the_window(backend, kind):
    got, inputs = _run("retrieval", {**SMALL, "top_k": 100}, backend, kind)
    expected = _formula(lambda i, j: torch.ones_like(i - j, dtype=torch.bool), lambda i, j: f.rerope(i, j, 4), *inputs)
    assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_block_chosen_is_sinks_and_window(backend):
    got, inputs = _run("retrieval", {**SMALL, "top_k": 0}, backend)
    expected = _formula(lambda i, j: f.sinks_visible(i, j, 2, 4), lambda i, j: f.rerope(i, j, 4), *inputs)
    assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,params", [("dca", {"chunk_len": 5, "local_window": 2}), ("selfextend", {"window": 6, "group": 3})])
def test_every_block_chosen_under_a_rule_is_that_rule(backend, rule, params):
    mine = {"sinks": 1, "block_size": 3, "top_k": 100, "local_window": params.get("local_window", 6)}
    got, _ = _run(f"retrieval+{rule}", {**mine, **params}, backend)
    expected, _ = _run(rule, params, "dense")
    assert_close(got, expected, rtol=1e-7, atol=1e-7)


def test_a_choice_leaves_keys_out():
    """With few blocks chosen the result is neither rerope nor sinks + window (the other tests could pass vacuously)."""
    chosen, _ = _run("retrieval", {**SMALL, "top_k": 1}, "dense")
    everything, _ = _run("retrieval", {**SMALL, "top_k": 100}, "dense")
    nothing, _ = _run("retrieval", {**SMALL, "top_k": 0}, "dense")
    assert (chosen - everything).abs().max() > 1e-3 and (chosen - nothing).abs().max() > 1e-3


@pytest.mark.parametrize("scorer", ["mean", "quest"])
def test_scorers_against_a_direct_evaluation(scorer):
    """Two batch rows laid out differently (left padding moves the second row's blocks), each scored by its own."""
    retrieval = method("retrieval", scorer=scorer, block_size=3, local_window=4).resolve(G.info)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, 9, 5, generator=g, dtype=torch.float64)  # (B, Hk, Tk, d): three blocks of three
    q = torch.randn(2, 2, 2, 4, 5, generator=g, dtype=torch.float64)  # (B, Hk, G, Tq, d)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, 4] = False  # a padding key is in no summary
    real[1, 0] = False
    block_of = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 2, 2]])
    members = [[[0, 1, 2], [3, 5], [6, 7, 8]], [[1, 2, 3], [4, 5, 6], [7, 8]]]  # each row's real keys per block
    got = retrieval.score(q, retrieval.summarize(keys, block_of, real, 3))
    expected = torch.empty(2, 2, 2, 4, 3, dtype=torch.float64)
    for row, h, g_, t in itertools.product(range(2), range(2), range(2), range(4)):
        query = q[row, h, g_, t]
        for b, keys_of_block in enumerate(members[row]):
            block = keys[row, h, keys_of_block]  # (n, d)
            if scorer == "mean":
                expected[row, h, g_, t, b] = sum(float(query @ key) for key in block) / len(keys_of_block)
            else:
                bound = [max(query[c] * block[:, c].min(), query[c] * block[:, c].max()) for c in range(5)]
                expected[row, h, g_, t, b] = float(sum(bound))
    assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_quest_bounds_every_key_of_its_block():
    retrieval = method("retrieval", scorer="quest", block_size=4).resolve(G.info)
    keys = torch.randn(1, 1, 8, 6, dtype=torch.float64)
    q = torch.randn(1, 1, 1, 3, 6, dtype=torch.float64)
    block_of = torch.arange(8).div(4, rounding_mode="floor")[None]
    bound = retrieval.score(q, retrieval.summarize(keys, block_of, torch.ones(1, 8, dtype=torch.bool), 2))
    exact = (q[0, 0, 0] @ keys[0, 0].T).view(3, 2, 4).amax(-1)  # the best key of each block
    assert (bound[0, 0, 0] >= exact - 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_scores_rounded_to_12_bits_as_the_reference(dtype):
    """`_coarse` on the bit pattern against `formulas.round_bits` (frexp, half to even) value by value: scores over
    twelve decades, exact ties at the 13th bit of both signs, zeros and infinities."""
    torch.manual_seed(0)
    spread = torch.randn(4000, dtype=torch.float64) * torch.logspace(-6, 6, 4000, dtype=torch.float64)
    ties = torch.randint(-2**13, 2**13, (2000,)).double() * 2.0 ** torch.randint(-20, 20, (2000,)).double()
    values = torch.cat([spread, ties, torch.tensor([0.0, -0.0, math.inf, -math.inf])]).to(dtype)
    expected = torch.tensor([f.round_bits(x, selected.SCORE_BITS) for x in values.tolist()], dtype=dtype)
    assert_close(selected._coarse(values), expected, rtol=0, atol=0)


@pytest.mark.parametrize("count", [0, 1, 3, 7, 12])
def test_top_blocks_break_ties_towards_the_earlier_block(count):
    """Scores with many ties (repeated text) and non-candidates (-inf): the chosen set is the first `count` of a
    stable descending sort, written out here in Python."""
    torch.manual_seed(0)
    scores = torch.randint(0, 3, (4, 2, 5, 9)).double()
    scores[torch.rand(scores.shape) < 0.3] = float("-inf")
    got = selected._top_blocks(scores, count)
    assert got.shape == (4, 2, 5, min(count, 9))
    for row, ids in zip(scores.view(-1, 9).tolist(), got.reshape(40, -1).tolist()):
        best = sorted((b for b in range(9) if row[b] > float("-inf")), key=lambda b: (-row[b], b))[:count]
        assert sorted(b for b in ids if b >= 0) == sorted(best)


SCHEDULE = {"sinks": 2, "local_window": 6, "block_size": 4, "top_k": 2}


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
@pytest.mark.parametrize("per", ["head", "kv_head", "layer"])
def test_one_pass_pieces_and_generate_agree(backend, per, path, monkeypatch):
    """The selection a query makes does not depend on which other queries share its forward."""
    monkeypatch.setattr(blockwise, "BLOCK", 8)
    model = tiny_model("llama")
    ids = token_ids(2, 70)
    with torch.no_grad(), ctxpatch.apply(model, "retrieval", backend=backend, per=per, **SCHEDULE):
        whole = model(ids).logits
        first = model(ids[:, :23], use_cache=True)
        second = model(ids[:, 23:51], past_key_values=first.past_key_values, use_cache=True)
        cache, steps = second.past_key_values, []
        for t in range(51, 70):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            steps.append(step.logits)
    pieces = torch.cat([first.logits, second.logits, *steps], dim=1)
    assert_close(pieces, whole, rtol=1e-4, atol=1e-4)


def test_rows_of_a_batch_choose_their_own_blocks(path, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 8)
    model = tiny_model("llama")
    ids = token_ids(2, 60)
    with torch.no_grad(), ctxpatch.apply(model, "retrieval", **SCHEDULE):
        batch = model(ids).logits
        alone = torch.cat([model(ids[r : r + 1]).logits for r in range(2)])
    assert_close(batch, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,params", [
    ("retrieval", SCHEDULE), ("retrieval+dca", {**SCHEDULE, "local_window": 3, "chunk_len": 7}),
])
def test_gradients_on_short_pieces_match_dense(path, spec, params):
    """A fine-tune step of short pieces on both blockwise paths (the union path rotates each key map only where a
    view may be taken; the blocks path merges head groups in place): gradients equal `dense`'s."""
    ids = token_ids(2, 22)
    grads = {}
    for backend in ("dense", "blockwise"):
        model = tiny_model("qwen3").train()
        with ctxpatch.apply(model, spec, backend=backend, **params):
            model(ids, labels=ids).loss.backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.endswith("k_proj.weight") for n in grads["dense"])
    for name, grad in grads["dense"].items():
        assert_close(grads["blockwise"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("params", [
    {"local_window": 32}, {"local_window": 0}, {"sinks": -1}, {"block_size": 0}, {"top_k": -2},
    {"top_k": 1.5}, {"scorer": "attention"}, {"per": "token"}, {"summary_size": 0},
])
def test_refusals_leave_the_model_untouched(params):
    model = tiny_model("llama")
    ids = token_ids(1, 20)
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(ParameterValueError, match="retrieval"):
            ctxpatch.apply(model, "retrieval", **params)
        after = model(ids).logits
    assert ctxpatch.current_patch(model) is None
    assert torch.equal(before, after)


def test_defaults_keep_what_a_query_sees_inside_the_trained_length():
    info = ModelInfo(8192, 30, 9, 3, 64, 64)
    r = method("retrieval").resolve(info)
    assert (r.sinks, r.local_window, r.block_size, r.top_k) == (128, 1024, 128, 48)  # S = B = L/64, W = L/8
    assert r.sinks + r.local_window + r.top_k * r.block_size == 57 * info.train_len // 64
    wide = method("retrieval", local_window=4096).resolve(info)  # k shrinks to what fits: (8192 - 128 - 4096) // 128
    assert wide.top_k == 31 and wide.sinks + wide.local_window + wide.top_k * wide.block_size <= info.train_len
    assert method("retrieval", local_window=4096, top_k=16).resolve(info).top_k == 16  # a given k is kept
    for length in (32, 100, 192):  # tiny models: S = 0 or B = 1, still inside L
        r = method("retrieval").resolve(ModelInfo(length, 2, 4, 2, 8, 8))
        assert 0 <= r.top_k <= 48 and r.sinks + r.local_window + r.top_k * r.block_size <= length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        method("retrieval", top_k=64).resolve(info)
    assert any("more than the 8192" in str(w.message) for w in caught)


def test_a_second_selection_on_a_layer_is_refused():
    from ctxpatch.compose import plan_layers

    info = ModelInfo(32, 3, 4, 2, 8, 8)
    twice = [method("retrieval", layers=[0, 1]).resolve(info), method("retrieval", top_k=2, layers=[1]).resolve(info)]
    twice[1].name = "retrieval"
    with pytest.raises(ctxpatch.errors.CompositionError, match="two selections"):
        plan_layers(twice, info)
