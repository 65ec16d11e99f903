"""Task data: deterministic, of exactly the asked length, the key where the doc says; input parsing and its errors."""

from __future__ import annotations

import pytest

import ctxpatch
from ctxpatch.eval import data
from ctxpatch.eval.errors import EvalError
from ctxpatch.eval.options import parse_depths, parse_length, parse_lengths, eval_specs, parse_tasks, resolve_task
from test_eval_fixtures import TRAIN_LEN, generated_text, one_thread, tiny_tokenizer  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def encoder():
    return data.Encoder(tiny_tokenizer())


@pytest.fixture(scope="module")
def corpus(encoder):
    return data.Corpus(encoder, generated_text())

pytestmark = pytest.mark.usefixtures("one_thread")


def encoded(encoder, doc):
    context_ids, continuation_ids = encoder.pair(doc["context"], doc["continuation"])
    return context_ids + continuation_ids


# ---- passkey ---------------------------------------------------------------------------------------------------


def test_passkey_length_and_key_position(encoder):
    request = data.RetrievalRequest(lengths=(256, 384), depths=(0.0, 0.5, 1.0), samples=2, seed=3)
    docs = data.passkey_docs(encoder, request)
    assert len(docs) == 2 * 3 * 2
    for doc in docs:
        ids = encoded(encoder, doc)
        assert len(ids) == doc["length"]
        at_key = encoder.decode(ids[doc["key_position"]:]).lstrip()
        assert at_key.startswith(f"The pass key is {doc['answer']}. Remember it.")
        assert abs(doc["key_depth"] - doc["depth"]) < 0.1  # a sentence of filler at most
        assert doc["continuation"] == " " + doc["answer"] and len(doc["answer"]) == 5
    positions = [d["key_position"] for d in docs if d["length"] == 384 and d["sample"] == 0]
    assert positions == sorted(positions) and positions[0] < 0.3 * 384 < 0.7 * 384 < positions[-1]


def test_passkey_is_deterministic_in_the_seed(encoder):
    request = data.RetrievalRequest(lengths=(256,), depths=(0.5,), samples=3, seed=0)
    first, again = data.passkey_docs(encoder, request), data.passkey_docs(encoder, request)
    assert first == again
    other = data.passkey_docs(encoder, data.RetrievalRequest(lengths=(256,), depths=(0.5,), samples=3, seed=1))
    assert [d["answer"] for d in first] != [d["answer"] for d in other]
    assert len({d["answer"] for d in first}) == 3  # samples differ


def test_passkey_length_too_short_is_an_error(encoder):
    with pytest.raises(EvalError, match="too short for a passkey prompt"):
        data.passkey_docs(encoder, data.RetrievalRequest(lengths=(40,), depths=(0.5,), samples=1, seed=0))


# ---- needle in a haystack ----------------------------------------------------------------------------------------


def test_niah_length_and_needle_position(encoder, corpus):
    request = data.RetrievalRequest(lengths=(256, 512), depths=(0.0, 0.25, 0.75, 1.0), samples=1, seed=0)
    docs = data.niah_docs(encoder, corpus, request)
    for doc in docs:
        ids = encoded(encoder, doc)
        assert len(ids) == doc["length"]
        at_needle = encoder.decode(ids[doc["key_position"]:]).lstrip()
        assert at_needle.startswith(f"The special magic number is {doc['answer']}.")
        assert doc["depth"] <= doc["key_depth"]  # the next sentence end at or after the depth
        if doc["length"] == 512:
            assert doc["key_depth"] < doc["depth"] + 0.15
        assert doc["context"].count(doc["answer"]) == 1
    assert data.niah_docs(encoder, corpus, request) == docs


def test_niah_moves_its_haystack_when_every_separator_hits_a_gap(encoder, corpus, monkeypatch):
    request = data.RetrievalRequest(lengths=(256,), depths=(0.5,), samples=1, seed=0)
    (whole,) = data.niah_docs(encoder, corpus, request)
    fit, misses = data.fit_exact, iter(range(len(data.SEPARATORS)))  # the first start: every separator misses
    monkeypatch.setattr(data, "fit_exact", lambda *a, **k: None if next(misses, None) is not None else fit(*a, **k))
    (moved,) = data.niah_docs(encoder, corpus, request)
    assert moved["start_token"] == whole["start_token"] + 1
    ids = encoded(encoder, moved)
    assert len(ids) == 256 and moved["context"] != whole["context"]
    assert encoder.decode(ids[moved["key_position"]:]).lstrip().startswith(
        f"The special magic number is {moved['answer']}.")


# ---- perplexity windows ------------------------------------------------------------------------------------------


def test_ppl_windows_score_the_same_tail_with_full_and_native_context(encoder, corpus):
    request = data.PplRequest(lengths=(96, 320), tail=32, train_len=TRAIN_LEN, samples=2, seed=0)
    docs = data.ppl_docs(encoder, corpus, request)
    assert len(docs) == 2 * 2 * 2
    ids = corpus.ids(1)
    for full, native in zip(docs[::2], docs[1::2]):
        assert (full["context_kind"], native["context_kind"]) == ("full", "native")
        assert full["continuation"] == native["continuation"]
        n = full["length"]
        full_ids, native_ids = encoded(encoder, full), encoded(encoder, native)
        assert len(full_ids) == n and len(native_ids) == min(n, TRAIN_LEN)
        assert native_ids == full_ids[-min(n, TRAIN_LEN):]  # the native window ends at the same token
        start = full["start_token"]
        assert full_ids == ids[start:start + n]  # the window is the text's own tokens
        _, continuation_ids = encoder.pair(full["context"], full["continuation"])
        assert continuation_ids == full_ids[-32:]
    starts = [d["start_token"] for d in docs if d["length"] == 320]
    assert starts[0] != starts[2]  # two samples, two windows


def test_text_shorter_than_the_request_is_an_error(encoder):
    short = data.Corpus(encoder, generated_text(300))
    with pytest.raises(EvalError, match=r"has \d+ tokens but this request needs"):
        data.ppl_docs(encoder, short, data.PplRequest(lengths=(4096,), tail=32, train_len=128, samples=1, seed=0))


def test_samples_past_the_text_overlap_halfway_and_the_fitting_ones_stay(encoder, corpus):
    length, stride = 256, 256 + data.MAX_SHIFT
    apart = data.window_starts(0, length, 3)
    short = data.Corpus(encoder, encoder.decode(corpus.ids(apart[2])[: apart[1] + stride + 8]))  # two windows
    assert data.sample_starts(short, 0, length, 2) == apart[:2]
    assert data.sample_starts(short, 0, length, 3) == [apart[0], apart[1], apart[0] + stride // 2]
    with pytest.raises(EvalError, match=r"it holds 3: 2 apart and 1 overlapping them\): pass a longer text"):
        data.sample_starts(short, 0, length, 4)
    request = data.RetrievalRequest(lengths=(length,), depths=(0.5,), samples=3, seed=0)
    three = data.niah_docs(encoder, short, request)
    two = data.niah_docs(encoder, short, data.RetrievalRequest(lengths=(length,), depths=(0.5,), samples=2, seed=0))
    assert [d["context"] for d in three[:2]] == [d["context"] for d in two]  # recorded scores stay theirs
    needles = [d["start_token"] + d["key_depth"] * length for d in three]
    assert all(abs(needles[a] - needles[b]) > length / 4 for a in range(3) for b in range(a + 1, 3))


def test_tail_must_fit_the_shortest_length(encoder, corpus):
    with pytest.raises(EvalError, match="tail=200"):
        data.ppl_docs(encoder, corpus, data.PplRequest(lengths=(128,), tail=200, train_len=128, samples=1, seed=0))


def test_empty_text_is_an_error(encoder):
    with pytest.raises(EvalError, match="empty"):
        data.Corpus(encoder, "   ")


# ---- parsing -----------------------------------------------------------------------------------------------------


def test_lengths_parse():
    assert parse_lengths("16k,8k, 8192,1.5k") == [1536, 8192, 16384]
    assert parse_length(300) == 300
    for bad in ("8q", "eight", "-4", "0", "1.3"):
        with pytest.raises(EvalError, match="length"):
            parse_length(bad)


def test_depths_parse():
    assert parse_depths("5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
    with pytest.raises(EvalError, match="outside"):
        parse_depths("0.5,2")
    with pytest.raises(EvalError, match="not a number"):
        parse_depths("half")


def test_tasks_resolve_with_suggestions():
    assert parse_tasks("ppl,passkey,ruler_vt,ctxpatch_niah") == [
        "ctxpatch_ppl", "ctxpatch_passkey", "ruler_vt", "ctxpatch_niah"]
    with pytest.raises(EvalError, match="Did you mean 'passkey'"):
        resolve_task("paskey")
    with pytest.raises(EvalError, match="downloads a data set"):
        resolve_task("niah_single_2")


def test_specs_parse_with_parameters():
    specs = eval_specs("none, yarn[factor=4,attention_factor=1.0], logn+window", shared={"layers": [0]})
    assert [s.spec for s in specs] == ["none", "yarn[factor=4,attention_factor=1.0]", "logn+window"]
    assert specs[0].params == {}  # shared parameters never reach 'none'
    assert specs[1].parsed.methods[0].values == {"factor": 4, "attention_factor": 1.0}
    assert [s.label for s in specs] == [
        "none", "yarn[factor=4,attention_factor=1.0,layers=[0]]", "logn[layers=[0]]+window[layers=[0]]"]
    with pytest.raises(TypeError, match="window not taken by yarn"):
        eval_specs("window,yarn", shared={"window": 64})
    with pytest.raises(EvalError, match="listed twice"):
        eval_specs("none,none")
    with pytest.raises(ctxpatch.SpecError, match="unbalanced"):
        eval_specs("yarn[factor=4")
