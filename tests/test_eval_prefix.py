"""Loglikelihood sequences fed in pieces, each starting from the last one's KV cache where they share pieces
(`ctxpatch.eval.prefix`): the scores are the bits of each sequence scored alone, and those of one forward to
rounding, under every kind of rule; an evicting cache is never reused."""

from __future__ import annotations

import json

import pytest
import torch

import ctxpatch
from ctxpatch.eval.lm import CtxpatchLM
from ctxpatch.eval.prefix import piece_starts, shared_length
from ctxpatch.jsonlog import JsonLog
from test_eval_fixtures import one_thread, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

PIECE = 32
SPECS = [
    ("none", {}),
    ("dca", {"chunk_len": 96, "local_window": 24}),
    ("selfextend", {"group": 2, "window": 32}),
    ("retrieval", {"sinks": 2, "local_window": 24, "block_size": 8, "top_k": 3}),
    ("sinks", {"global_tokens": 3, "window": 40}),  # evicts past 43 keys: nothing to crop back to
]


@pytest.mark.parametrize(
    ("length", "keep", "piece", "starts"),
    [(8192, 1024, 4096, [0, 4096]), (8193, 1, 4096, [0, 4096, 8192]), (100, 100, 32, [0]), (64, 1, 32, [0, 32]),
     (65, 1, 32, [0, 32, 64]), (10, 3, 32, [0])],
)
def test_pieces_start_at_multiples_with_the_scored_positions_in_the_last(length, keep, piece, starts):
    assert piece_starts(length, keep, piece) == starts
    assert length - starts[-1] >= keep


def test_shared_length():
    assert shared_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert shared_length([1, 2], [1, 2, 3]) == 2
    assert shared_length([], [1]) == 0
    assert shared_length([7], [8]) == 0


def sequences(vocab: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that share beginnings of several lengths, some inside a piece, some past one,
    two identical to the point of the continuation; continuations of 1 to 40 tokens."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, vocab, (260,), generator=g).tolist()
    out = []
    for at, keep in [(200, 1), (40, 5), (100, 40), (201, 3), (250, 1), (0, 2), (130, 1)]:
        text = base[:at] + torch.randint(3, vocab, (260 - at,), generator=g).tolist()
        out.append((text[: 260 - keep], text[260 - keep :]))
    out.append((base[:220], base[220:]))  # the base, its last 40 scored: its last piece starts at 192
    out.append((base[:259], [(base[259] + 1) % vocab]))  # then the base with another last token: 192 reused, not 256
    return out


def one_forward(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The reference: one forward over the whole sequence, float64 log-softmax of the scored positions."""
    ids = torch.tensor([(context + continuation)[:-1]])  # (1, T)
    with torch.no_grad():
        logits = model(ids).logits[0, -len(continuation) :].double()  # (keep, vocab)
    log_probs = torch.log_softmax(logits, -1)
    target = torch.tensor(continuation)
    return float(log_probs.gather(1, target[:, None]).sum()), bool((log_probs.argmax(-1) == target).all())


@pytest.mark.parametrize(("spec", "params"), SPECS, ids=[s for s, _ in SPECS])
def test_scores_are_each_sequences_own_whatever_came_before(spec, params, tmp_path):
    model, tokenizer = tiny_lm()
    pairs = sequences(len(tokenizer))
    with ctxpatch.apply(model, spec, **params):
        log = JsonLog(tmp_path / "scores.jsonl")
        lm = CtxpatchLM(model, tokenizer, max_length=512, state=spec, score_log=log)
        lm.piece = PIECE
        together = lm.score_requests([(("", ""), c, k) for c, k in pairs])
        single = CtxpatchLM(model, tokenizer, max_length=512, state=spec)
        single.piece = PIECE
        alone = [single.score(c, k) for c, k in pairs]  # each from a fresh cache
        whole = [one_forward(model, c, k) for c, k in pairs]
    assert together == alone  # the same bits, shared pieces or not
    torch.testing.assert_close(torch.tensor([s for s, _ in together], dtype=torch.float64),
                               torch.tensor([s for s, _ in whole], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert [g for _, g in together] == [g for _, g in whole]
    reused = [json.loads(line)["reused"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    if spec == "sinks":
        assert reused == [0] * len(pairs)
    else:  # token order: the sequences branching off base at 40, 100, 130, 250, the base twice, 201, 200, then the
        # fresh one; each reuses the last piece start of both (multiples of 32) within what the two share
        assert reused == [0, 32, 96, 128, 192, 192, 192, 192, 0]


@pytest.mark.parametrize("spec", ["dynamic", "longrope"])
def test_a_rope_that_follows_each_forwards_length_scores_sequences_whole(spec, tmp_path):
    """transformers' dynamic and longrope scalings rotate a forward's keys by its length: in pieces, the cached keys
    would carry a shorter piece's frequencies (several nats off one forward on these sequences)."""
    model, tokenizer = tiny_lm()
    pairs = sequences(len(tokenizer))
    with ctxpatch.apply(model, spec, target_len=512):
        lm = CtxpatchLM(model, tokenizer, max_length=512, state=spec, score_log=JsonLog(tmp_path / "scores.jsonl"))
        lm.piece = PIECE
        together = lm.score_requests([(("", ""), c, k) for c, k in pairs])
        whole = [one_forward(model, c, k) for c, k in pairs]
    torch.testing.assert_close(torch.tensor([s for s, _ in together], dtype=torch.float64),
                               torch.tensor([s for s, _ in whole], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert {json.loads(line)["reused"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()} == {0}


def test_a_model_whose_own_rope_follows_the_length_scores_sequences_whole(tmp_path):
    """Phi-3's LongRoPE picks its short or long factors by each forward's length: unpatched, pieces would differ."""
    from test_families import FAMILIES, tiny

    model = tiny(next(f for f in FAMILIES if "LongRoPE" in f.name))
    tokenizer = tiny_lm()[1]
    g = torch.Generator().manual_seed(1)
    base = torch.randint(3, min(model.config.vocab_size, len(tokenizer)), (90,), generator=g).tolist()
    pairs = [(base[:80], base[80:]), (base[:89], [(base[89] + 1) % 50 + 3])]  # past 16 (its L) and past a piece
    lm = CtxpatchLM(model, tokenizer, max_length=256, score_log=JsonLog(tmp_path / "scores.jsonl"))
    lm.piece = 16
    together = lm.score_requests([(("", ""), c, k) for c, k in pairs])
    whole = [one_forward(model, c, k) for c, k in pairs]
    torch.testing.assert_close(torch.tensor([s for s, _ in together], dtype=torch.float64),
                               torch.tensor([s for s, _ in whole], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert {json.loads(line)["reused"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()} == {0}
