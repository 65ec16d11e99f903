"""The blockwise backend's structure: linear memory, and key-block pruning that is exact."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ctxpatch.backends import blockwise
from ctxpatch.compose import build_plan
from ctxpatch.patch import RUNTIME
from ctxpatch.registry import ModelInfo

INFO = ModelInfo(train_len=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=8)


@pytest.mark.parametrize(
    "spec,params",
    [
        ("window", {"window": 5}),
        ("bca", {"block_size": 4}),
        ("hybrid", {"window": 3, "global_tokens": 2, "random_blocks": 2, "block_size": 3}),
        ("sinks", {"window": 4, "global_tokens": 3}),
    ],
)
def test_block_tests_are_conservative(spec, params):
    """Whenever some pair of two position ranges is visible, `blocks_visible` must say so; whenever
    `blocks_all_visible` says every causal pair is visible, every one must be."""
    _, plans = build_plan(spec, params, INFO)
    mask = plans[0].mask
    mask.prepare(torch.arange(40))
    ranges = [(a, b) for a, b in itertools.combinations_with_replacement(range(0, 40, 3), 2)]
    for (i_lo, i_hi), (j_lo, j_hi) in itertools.product(ranges, ranges):
        i = torch.arange(i_lo, i_hi + 1)[:, None]
        j = torch.arange(j_lo, j_hi + 1)[None, :]
        any_visible = bool((mask.visible(i, j) & (j <= i)).any())
        bounds = [torch.tensor([[x]]) for x in (i_lo, i_hi, j_lo, j_hi)]
        assert bool(mask.blocks_visible(*bounds)) or not any_visible, (i_lo, i_hi, j_lo, j_hi)
        if bool(mask.blocks_all_visible(*bounds)):
            assert bool(mask.visible(i, j)[j <= i].all()) and j_hi <= i_lo, (i_lo, i_hi, j_lo, j_hi)


def test_hybrid_random_blocks_are_deterministic_and_before_the_window():
    from ctxpatch.masks.hybrid import random_block_table

    table = random_block_table(num_query_blocks=40, window=10, block=4, count=3, seed=7)
    assert torch.equal(table, random_block_table(40, 10, 4, 3, 7))
    assert not torch.equal(table, random_block_table(40, 10, 4, 3, 8))
    for qb, row in enumerate(table):
        drawn = row[row >= 0]
        assert len(set(drawn.tolist())) == len(drawn)  # without replacement
        assert all((kb + 1) * 4 - 1 < qb * 4 - 10 + 1 for kb in drawn.tolist())  # ends before the window
        candidates = max(0, (qb * 4 - 10 + 1) // 4)
        assert len(drawn) == min(3, candidates)


def test_window_touches_only_keys_inside_the_window(monkeypatch):
    """O(n W): every SDPA call of a windowed layer sees at most W + 2 blocks of keys."""
    import ctxpatch
    from conftest import tiny_model, token_ids

    monkeypatch.setattr(blockwise, "BLOCK", 16)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append(k.shape[2])
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(blockwise.F, "scaled_dot_product_attention", spy)
    model = tiny_model("llama", num_hidden_layers=1)
    with torch.no_grad(), ctxpatch.apply(model, "window", window=20):
        model(token_ids(1, 400))
    assert len(seen) == -(-400 // 16) and max(seen) <= 20 + 2 * 16


def test_plain_layers_use_one_fused_causal_call(monkeypatch):
    import ctxpatch
    from conftest import tiny_model, token_ids

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        blockwise.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k.get("is_causal")) or real(*a, **k)
    )
    model = tiny_model("llama")
    with torch.no_grad(), ctxpatch.apply(model, "logn+yarn"):
        model(token_ids(1, 50))
    assert calls == [True, True, True]  # logn and rope scalers keep the fused causal kernel


def test_hybrid_random_block_bounds_need_no_device_sync():
    """The per-chunk bounds of hybrid's random blocks are pure tensor work: on the meta device, where any
    `.item()` / `int(tensor)` / `bool(tensor)` raises, they still evaluate."""
    from ctxpatch.masks.hybrid import RandomBlocks, drawn_counts, random_block_table

    random = RandomBlocks(window=6, block=4, count=2, seed=3)
    table = random_block_table(20, 6, 4, 2, 3)
    meta = torch.device("meta")
    random.tables[meta] = (table.to(meta), drawn_counts(table).to(meta))
    bounds = [torch.zeros(2, 1, dtype=torch.long, device=meta)] * 2 + [torch.zeros(2, 5, dtype=torch.long, device=meta)] * 2
    assert random.blocks_visible(*bounds).shape == (2, 5)


def test_hybrid_block_table_is_made_once_per_device_and_shared_by_the_layers(monkeypatch):
    import ctxpatch
    from conftest import tiny_model, token_ids
    from ctxpatch.masks import hybrid

    built = []
    real = hybrid.random_block_table
    monkeypatch.setattr(hybrid, "random_block_table", lambda *a: built.append(a) or real(*a))
    model = tiny_model("llama")  # three layers
    with torch.no_grad(), ctxpatch.apply(model, "hybrid", window=5, random_blocks=1, block_size=3):
        model(token_ids(1, 30))
        model(token_ids(1, 20))  # shorter: the table already covers it
    assert len(built) == 1
    if torch.cuda.is_available():  # a second device gets its own table; going back to the first rebuilds nothing
        mask = ctxpatch.method("hybrid", window=5, random_blocks=1, block_size=3).resolve(INFO)
        for device in ("cpu", "cuda", "cpu", "cuda"):
            mask.prepare(torch.arange(30, device=device))
        assert len(built) == 3


@pytest.mark.parametrize("spec,params", [("string", {"offset": 20, "local_window": 6}), ("dca", {})])
def test_multi_view_chunks_are_planned_once_per_forward_and_shared_by_the_layers(monkeypatch, spec, params):
    """The chunk plans depend on positions only: the first layer makes them, the next layers of the same
    forward reuse them, and every layer's output is the one it gets when it plans alone."""
    import ctxpatch
    from conftest import tiny_model, token_ids
    from ctxpatch.plan import ForwardShare

    monkeypatch.setattr(blockwise, "BLOCK", 8)  # chunks of 16 rows: 7 chunks at 100 tokens
    planned = []
    real = blockwise.ChunkPlanner.view_calls
    monkeypatch.setattr(blockwise.ChunkPlanner, "view_calls", lambda self, q0, q1: planned.append(q0) or real(self, q0, q1))
    model, ids = tiny_model("llama"), token_ids(2, 100)  # three layers
    with torch.no_grad(), ctxpatch.apply(model, spec, **params):
        shared = model(ids).logits
        assert len(planned) == 7
        shares = {id(getattr(layer.self_attn, RUNTIME).share): getattr(layer.self_attn, RUNTIME).share
                  for layer in model.model.layers}
        assert len(shares) == 1 and all(s._value is None for s in shares.values())  # no plan outlives the forward
        model(ids)
        assert len(planned) == 14  # a new forward plans again
        monkeypatch.setattr(ForwardShare, "get", lambda self, key, layer, make: make())
        alone = model(ids).logits
    assert len(planned) == 14 + 3 * 7
    torch.testing.assert_close(shared, alone, rtol=0, atol=0)


def test_forward_share_keeps_one_entry_for_the_same_positions_within_a_forward():
    from ctxpatch.plan import ForwardShare

    share, made = ForwardShare(), []

    def make():
        made.append(object())
        return made[-1]

    rule, other = object(), object()
    first = share.get((rule, torch.arange(5), None), 0, make)
    assert share.get((rule, torch.arange(5), None), 2, make) is first  # a later layer of the same forward
    assert share.get((rule, torch.arange(5), None), 2, make) is not first  # not above the last layer: a new forward
    assert len(made) == 2
    for layer, key in enumerate(
        [(rule, torch.arange(5) + 1, None), (other, torch.arange(5) + 1, None), (other, torch.arange(5.0) + 1, None),
         (other, torch.arange(5.0) + 1, torch.ones(5, dtype=torch.bool)), (other, torch.arange(6.0) + 1, None)],
        start=3,
    ):
        share.get(key, layer, make)  # other positions, rule, dtype, padding or length: made anew
    assert len(made) == 7


def test_forward_share_drops_its_entry_after_the_final_layer():
    from ctxpatch.plan import ForwardShare

    share, made = ForwardShare(final_layer=2), []
    key = (object(), torch.arange(5))
    first = share.get(key, 0, lambda: made.append(object()) or made[-1])
    assert share.get(key, 2, lambda: made.append(object()) or made[-1]) is first  # the final layer still reuses it
    assert share._value is None and share._key == ()  # and nothing outlives the forward
    share.get(key, 0, lambda: made.append(object()) or made[-1])
    assert len(made) == 2
