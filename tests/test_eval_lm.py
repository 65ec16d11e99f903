"""CtxpatchLM and compare on a tiny random Llama: perplexity equals a direct computation, nothing is truncated or
capped silently, the native reference is shared, the model comes back unpatched, RULER runs offline."""

from __future__ import annotations

import math

import pytest
import torch
from lm_eval.api.instance import Instance

import ctxpatch
from ctxpatch.eval import CtxpatchLM, EvalConfig, TruncationError, compare, data
from ctxpatch.eval.errors import EvalError
from ctxpatch.eval.ruler import sample_indices
from ctxpatch.eval.runner import load_tasks, selected_samples
from test_eval_fixtures import TRAIN_LEN, one_thread, text_file, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_tail_perplexity(model, ids: list[int], tail: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of ids, all of ids as context: the plain formula."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (n, vocab)
    nll = torch.nn.functional.cross_entropy(logits[-tail - 1 : -1], torch.tensor(ids[-tail:]))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def pair():
    return tiny_lm()


@pytest.fixture(scope="module")
def board_and_model(pair, tmp_path_factory):
    model, tokenizer = pair
    path = tmp_path_factory.mktemp("text") / "text.txt"
    from test_eval_fixtures import generated_text

    path.write_text(generated_text(), encoding="utf-8")
    board = compare(model, tokenizer, ["none", "window[window=48]"], lengths=[160, 384], tasks=["ppl", "passkey"],
                    depths=[0.5], tail=24, samples=2, text_files=[str(path)])
    return board, model, tokenizer, path


def test_perplexity_matches_direct_computation(board_and_model):
    board, model, tokenizer, path = board_and_model
    encoder = data.Encoder(tokenizer)
    corpus = data.Corpus(encoder, path.read_text(encoding="utf-8"))
    docs = data.ppl_docs(encoder, corpus, data.PplRequest((160, 384), 24, TRAIN_LEN, 2, 0))
    for length in (160, 384):
        full = [d for d in docs if d["length"] == length and d["context_kind"] == "full"]
        native = [d for d in docs if d["length"] == length and d["context_kind"] == "native"]
        expected_full = [direct_tail_perplexity(model, sum(encoder.pair(d["context"], d["continuation"]), []), 24)
                         for d in full]
        expected_native = [direct_tail_perplexity(model, sum(encoder.pair(d["context"], d["continuation"]), []), 24)
                           for d in native]
        got_full = sorted(r.value for r in board.records if r.spec == "none" and r.length == length and r.task == "ppl")
        got_native = sorted(r.value for r in board.records if r.spec == "reference" and r.length == length)
        torch.testing.assert_close(torch.tensor(got_full), torch.tensor(sorted(expected_full)), rtol=1e-4, atol=0)
        torch.testing.assert_close(torch.tensor(got_native), torch.tensor(sorted(expected_native)), rtol=1e-4, atol=0)
        geometric = math.exp(sum(math.log(v) for v in expected_full) / 2)
        assert board.perplexity("none", length) == pytest.approx(geometric, rel=1e-4)
    assert board.ratio("none", 160) == pytest.approx(1.0)  # inside the trained length: the same tokens, same model
    assert board.ratio("window[window=48]", 384) != pytest.approx(board.ratio("none", 384))


def test_reference_is_computed_once_and_model_is_restored(board_and_model):
    board, model, tokenizer, _ = board_and_model
    # reference: 2 windows x 2 lengths; none: only 384 is new (160 equals the reference); window: 4 windows;
    # passkey: 2 specs x 2 lengths x 1 depth x 2 samples
    assert board.forwards == 4 + 2 + 4 + 8
    assert ctxpatch.current_patch(model) is None
    assert model.config._attn_implementation != "ctxpatch"
    assert {r.task for r in board.records} == {"ppl", "passkey"}
    assert all(r.value in (0.0, 1.0) for r in board.records if r.task == "passkey")
    assert "| `window[window=48]` |" in board.markdown()


def strict_lm(pair, max_length):
    model, tokenizer = pair
    return CtxpatchLM(model, tokenizer, max_length=max_length)


def test_an_over_long_loglikelihood_request_is_an_error(pair):
    lm = strict_lm(pair, max_length=50)
    ids = list(range(1, 61))
    with pytest.raises(TruncationError, match="does not fit max_length=50"):
        lm._loglikelihood_tokens([(("ctx", "cont"), ids[:-5], ids[-5:])])
    lm._loglikelihood_tokens([(("ctx", "cont"), ids[:46], ids[46:51])])  # 50 tokens in: fits


def generation_request(text: str, max_gen_toks: int) -> Instance:
    return Instance(request_type="generate_until", doc={}, idx=0,
                    arguments=(text, {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}))


def test_an_over_long_prompt_is_an_error_not_a_cut(pair):
    lm = strict_lm(pair, max_length=64)
    text = " ".join(["the grass is green"] * 40)
    with pytest.raises(TruncationError, match="minus the generation budget"):
        lm.generate_until([generation_request(text, 8)])


def test_generation_budget_is_the_tasks_not_the_generation_configs(pair):
    model, tokenizer = pair
    lm = strict_lm(pair, max_length=64)
    model.generation_config.max_new_tokens = 2
    model.generation_config.eos_token_id = None
    try:
        out = lm.generate_until([generation_request("the grass is green", 7)])[0]
    finally:
        model.generation_config.max_new_tokens = None
    assert len(tokenizer(out, add_special_tokens=False).input_ids) >= 6  # 7 tokens generated, not 2
    assert model.generation_config.max_new_tokens is None


def test_a_carried_patch_is_evaluated_as_loaded_only(pair, text_file):  # noqa: F811
    model, tokenizer = pair
    with ctxpatch.apply(model, "window", window=32):
        with pytest.raises(EvalError, match="already carries the patch 'window'"):
            compare(model, tokenizer, ["dynamic"], lengths=[192], tasks=["passkey"], depths=[1.0])
        board = compare(model, tokenizer, ["none"], lengths=[192], tasks=["passkey"], depths=[1.0])
        assert board.reference == "window (carried)"
        assert {r.spec for r in board.records} == {"window (carried)"}  # the row names the carried patch
        assert ctxpatch.current_patch(model) is not None  # still carried


def test_ruler_samples_are_taken_per_length():
    docs = {"max_length": [512] * 4 + [640] * 3}
    assert sample_indices(docs, 2) == [0, 1, 4, 5]  # lm-eval's limit=4 would take 512 only


def test_ruler_data_builds_offline(pair, tmp_path):
    pytest.importorskip("wonderwords")
    model, tokenizer = pair
    config = EvalConfig(lengths=[512], tasks=["niah_single_1"], samples=2)
    tasks = load_tasks(config, tokenizer, TRAIN_LEN, tmp_path)
    docs = tasks["main"]["tasks"]["niah_single_1"].eval_docs
    chosen = selected_samples(tasks["main"], config)["niah_single_1"]
    assert [docs[i]["max_length"] for i in chosen] == [512, 512]
    longest = max(len(tokenizer(docs[i]["input"] + docs[i]["gen_prefix"]).input_ids) for i in chosen)
    assert longest + 128 <= config.context_length  # RULER's answer prefix and budget fit max_length's margin
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()  # RULER loads its tokenizer by name


@pytest.mark.slow
def test_ruler_task_runs_offline(pair):
    pytest.importorskip("wonderwords")
    model, tokenizer = pair
    board = compare(model, tokenizer, ["none"], lengths=[512], tasks=["niah_single_1"], samples=1)
    records = [r for r in board.records if r.task == "niah_single_1"]
    assert len(records) == 1 and records[0].length == 512 and 0.0 <= records[0].value <= 1.0


def test_a_bad_spec_fails_before_anything_runs(pair):
    model, tokenizer = pair
    with pytest.raises(TypeError, match="windw"):
        compare(model, tokenizer, ["none", "window[windw=3]"], lengths=[192], tasks=["passkey"], depths=[1.0])
    assert ctxpatch.current_patch(model) is None
