"""A comparison killed part way resumes from `scores.jsonl`: no finished forward is repeated, and the leaderboard
equals an uninterrupted run's; a folder of another run or another model setup is refused."""

from __future__ import annotations

import json

import pytest

from ctxpatch.cli import main
from ctxpatch.eval import compare
from ctxpatch.eval.errors import EvalError
from ctxpatch.eval.runner import SCORES
from test_eval_fixtures import model_folder, one_thread, text_file, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = ["none", "window[window=48]", "selfextend[group=2,window=32]"]


def config(path):
    return dict(lengths=[256], tasks=["ctxpatch_ppl", "ctxpatch_passkey"], depths=[0.0, 1.0], tail=24,
                text_files=[str(path)])


def summary(board):
    return sorted((r.spec, r.task, r.length, r.depth, r.value) for r in board.records)


@pytest.fixture(scope="module")
def pair():
    return tiny_lm()


def test_a_killed_comparison_resumes_without_repeating_a_forward(pair, text_file, tmp_path):  # noqa: F811
    model, tokenizer = pair
    whole = compare(model, tokenizer, SPECS, **config(text_file))
    out = tmp_path / "run"
    compare(model, tokenizer, SPECS, out_dir=out, **config(text_file))
    rows = (out / SCORES).read_text().splitlines()
    assert len(rows) == whole.forwards  # one line per forward, written as computed
    assert {json.loads(r)["tokens"] for r in rows} >= {256}  # what each cost: its tokens and seconds
    assert all(json.loads(r)["seconds"] > 0 for r in rows)
    # the kill: the last two scores never written, the one before cut in the middle of its line
    (out / SCORES).write_text("\n".join(rows[:-3] + [rows[-3][:20]]) + "\n")
    resumed = compare(model, tokenizer, SPECS, out_dir=out, resume=True, **config(text_file))
    assert resumed.forwards == 3
    assert summary(resumed) == summary(whole)
    again = compare(model, tokenizer, SPECS, out_dir=out, resume=True, **config(text_file))
    assert again.forwards == 0 and summary(again) == summary(whole)


def test_resumed_scores_are_the_logged_ones_not_recomputed(pair, text_file, tmp_path):  # noqa: F811
    """A resumed run reads its scores from the log: change one there and the leaderboard shows the change."""
    model, tokenizer = pair
    out = tmp_path / "run"
    first = compare(model, tokenizer, ["none"], out_dir=out, **{**config(text_file), "tasks": ["ctxpatch_ppl"]})
    rows = [json.loads(line) for line in (out / SCORES).read_text().splitlines()]
    for row in rows:
        row["logprob"] *= 2
    (out / SCORES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = compare(model, tokenizer, ["none"], out_dir=out, resume=True,
                      **{**config(text_file), "tasks": ["ctxpatch_ppl"]})
    assert resumed.forwards == 0
    before, after = first.perplexity("none", 256), resumed.perplexity("none", 256)
    assert after == pytest.approx(before**2, rel=1e-9)  # exp(-2 * mean log p) = ppl^2


def test_a_folder_with_scores_needs_resume_or_overwrite(pair, text_file, tmp_path):  # noqa: F811
    model, tokenizer = pair
    out = tmp_path / "run"
    compare(model, tokenizer, ["none"], out_dir=out, **config(text_file))
    with pytest.raises(EvalError, match="--resume to continue it"):
        compare(model, tokenizer, ["none"], out_dir=out, **config(text_file))
    fresh = compare(model, tokenizer, ["none"], out_dir=out, overwrite=True, **config(text_file))
    assert fresh.forwards > 0
    assert len((out / SCORES).read_text().splitlines()) == fresh.forwards


def test_resume_refuses_another_model_setup(pair, text_file, tmp_path):  # noqa: F811
    model, tokenizer = pair
    out = tmp_path / "run"
    compare(model, tokenizer, ["none"], out_dir=out, name="first", **config(text_file))
    with pytest.raises(EvalError, match="model 'first' -> 'second'.*the same --model as that run"):
        compare(model, tokenizer, ["none"], out_dir=out, name="second", resume=True, **config(text_file))
    refused = r"reference 'none' -> 'base \(unpatched base\)'\): resume with the same --reference as that run"
    with pytest.raises(EvalError, match=refused):
        compare(model, tokenizer, ["none"], out_dir=out, name="first", resume=True, reference_model=model,
                reference_name="base", **config(text_file))
    with pytest.raises(EvalError, match="backend 'blockwise' -> 'dense'.*the same --backend as that run"):
        compare(model, tokenizer, ["none"], out_dir=out, name="first", resume=True, backend="dense",
                **config(text_file))


def test_cli_resume_and_its_mistakes(model_folder, text_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_folder), "--lengths", "256", "--tasks", "passkey", "--depths", "1",
            "--text", str(text_file), "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "--resume to continue it" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert "0 forward passes" in capsys.readouterr().err
    assert main(argv[:-2] + ["--resume"]) == 2
    assert "name its folder with --out" in capsys.readouterr().err


def test_a_report_reads_the_scores_so_far_and_runs_nothing(pair, text_file, tmp_path):  # noqa: F811
    """`report=True` on a run cut short: the scored samples exactly as the whole run has them, none of the others,
    the count of forwards still to run, and not a line added to the log."""
    model, tokenizer = pair
    whole = compare(model, tokenizer, SPECS, **config(text_file))
    out = tmp_path / "run"
    compare(model, tokenizer, SPECS, out_dir=out, **config(text_file))
    rows = (out / SCORES).read_text().splitlines()
    (out / SCORES).write_text("\n".join(rows[:-4]) + "\n")
    report = compare(model, tokenizer, SPECS, out_dir=out, report=True, **config(text_file))
    assert report.forwards == 0 and report.unscored == 4
    assert len((out / SCORES).read_text().splitlines()) == len(rows) - 4
    assert set(summary(report)) < set(summary(whole))
    assert len(summary(whole)) - len(summary(report)) == 4  # one record per forward of the cut-off specs
    assert "4 forward(s) not scored yet" in report.markdown()
    assert json.loads((out / "leaderboard.json").read_text())["unscored"] == 4
    finished = compare(model, tokenizer, SPECS, out_dir=out, resume=True, **config(text_file))
    assert finished.forwards == 4 and finished.unscored == 0 and summary(finished) == summary(whole)


def test_a_report_needs_scores_and_logged_tasks(pair, text_file, tmp_path):  # noqa: F811
    model, tokenizer = pair
    with pytest.raises(EvalError, match="holds none"):
        compare(model, tokenizer, ["none"], out_dir=tmp_path / "empty", report=True, **config(text_file))
    out = tmp_path / "run"
    compare(model, tokenizer, ["none"], out_dir=out, **config(text_file))
    with pytest.raises(EvalError, match="drop it from --tasks"):
        compare(model, tokenizer, ["none"], out_dir=out, report=True,
                **{**config(text_file), "tasks": ["ctxpatch_ppl", "ctxpatch_passkey_gen"]})


def test_cli_report(model_folder, text_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = ["compare", "--model", str(model_folder), "--patches", "none,window[window=48]", "--lengths", "256",
            "--tasks", "passkey", "--depths", "0,1", "--text", str(text_file), "--out", str(out)]
    assert main(argv + ["--report"]) == 2
    assert "holds none" in capsys.readouterr().err
    assert main(argv + ["--report", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main(argv) == 0
    rows = (out / SCORES).read_text().splitlines()
    (out / SCORES).write_text("\n".join(rows[:-1]) + "\n")
    capsys.readouterr()
    assert main(argv + ["--report", "--resume"]) == 0  # as a resumable script passes it
    captured = capsys.readouterr()
    assert "0 forward passes" in captured.err and "1 not scored yet" in captured.err
    assert "1 forward(s) not scored yet" in captured.out
    records = json.loads((out / "leaderboard.json").read_text())["records"]
    assert sorted((r["spec"], r["depth"]) for r in records) == [("none", 0.0), ("none", 1.0),
                                                                 ("window[window=48]", 0.0)]
