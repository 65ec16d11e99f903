"""`ctxpatch eval` / `ctxpatch compare` end to end on a tiny model folder, lm-eval's own runner on ctxpatch's task
configs, and every bad-input path with its message."""

from __future__ import annotations

import json

import pytest

import ctxpatch
from ctxpatch.cli import main
from ctxpatch.eval import TASKS_DIR
from ctxpatch.loading import run as loading_run
from test_eval_fixtures import model_folder, one_thread, text_file, tiny_lm  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """`ctxpatch eval` without --out writes runs/eval-...: in a scratch folder, not the repository."""
    monkeypatch.chdir(tmp_path)


def test_compare_end_to_end(model_folder, text_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    status = main([
        "compare", "--model", str(model_folder), "--patches", "none,window[window=48]", "--lengths", "160,384",
        "--tasks", "ppl,passkey,niah", "--depths", "0,1", "--tail", "24", "--text", str(text_file), "--out", str(out),
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "**Perplexity ratio**" in printed and "| `window[window=48]` |" in printed and "**niah**" in printed
    record = json.loads((out / "leaderboard.json").read_text())
    assert record["train_len"] == 192 and record["config"]["lengths"] == [160, 384]
    assert set(record["summary"]) == {"native_perplexity", "none", "window[window=48]"}
    tasks = {(r["spec"], r["task"]) for r in record["records"]}
    assert ("reference", "ppl") in tasks and ("window[window=48]", "niah") in tasks
    for name in ("leaderboard.md", "perplexity.png", "passkey.png", "niah.png"):
        assert (out / name).stat().st_size > 0


def test_eval_one_patch_with_params(model_folder, text_file, capsys):  # noqa: F811
    status = main(["eval", "--model", str(model_folder), "--patch", "window", "--param", "window=32",
                   "--lengths", "256", "--tasks", "passkey", "--depths", "1"])
    assert status == 0
    assert "| `window[window=32]` |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "passkey,pxl"], "unknown task 'pxl'"),
    (["--tasks", "niah_single_2"], "downloads a data set"),
    (["--lengths", "16x"], "length '16x' is not a number"),
    (["--text", "/no/such/file.txt"], "text file '/no/such/file.txt' does not exist"),
    (["--patch", "windw"], "Did you mean 'window'?"),
    (["--tail", "9000"], "tail=9000"),
    (["--depths", "0.5,3"], "outside [0, 1]"),
    (["--model", "./no-such-model"], "does not exist"),
])
def test_bad_input_is_a_clear_error_before_loading(argv, message, capsys):
    assert main(["eval", "--model", "./no-such-model", *argv] if "--model" not in argv else ["eval", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("ctxpatch eval: error:")


def test_unknown_task_suggests_the_closest(capsys):
    assert main(["eval", "--tasks", "pasky"]) == 2
    assert "Did you mean 'passkey'?" in capsys.readouterr().err


def test_a_length_beyond_the_text_is_an_error(model_folder, text_file, capsys):  # noqa: F811
    status = main(["eval", "--model", str(model_folder), "--lengths", "300k", "--tasks", "ppl", "--tail", "24",
                   "--text", str(text_file)])
    assert status == 2
    assert "tokens but this request needs" in capsys.readouterr().err


def test_a_run_folder_is_loaded_with_ctxpatch_load(model_folder, monkeypatch, capsys):  # noqa: F811
    (model_folder / "ctxpatch.json").write_text(json.dumps({"patch": {"spec": "window"}}))

    def fake_load(path, dtype=None, **placement):
        model, tokenizer = tiny_lm()
        ctxpatch.apply(model, "window", window=64)
        return model, tokenizer

    monkeypatch.setattr(loading_run, "load", fake_load)
    assert main(["eval", "--model", str(model_folder), "--patch", "dynamic", "--lengths", "256", "--tasks", "passkey"]) == 2
    assert "carries its own patch" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_folder), "--lengths", "256", "--tasks", "passkey", "--depths", "1"]) == 0
    assert "reference: window (carried)" in capsys.readouterr().out


def test_lm_eval_runs_ctxpatch_tasks_from_the_include_path(model_folder):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"pretrained": str(model_folder), "lengths": [256], "depths": [0.0, 1.0]})
    results = simple_evaluate(model="hf", model_args=f"pretrained={model_folder},max_length=300,device=cpu",
                              tasks=["ctxpatch_passkey"], task_manager=manager, bootstrap_iters=0)
    scores = results["results"]["ctxpatch_passkey"]
    samples = results["samples"]["ctxpatch_passkey"]
    assert len(samples) == 2
    expected = [float(all_argmax(model_folder, s["doc"]["context"], s["doc"]["continuation"])) for s in samples]
    assert [s["256"] for s in samples] == expected
    assert scores["256,none"] == sum(expected) / len(expected)
    assert scores["4096,none"] == -1  # RULER's convention: no sample at that length


def all_argmax(folder, context: str, continuation: str) -> bool:
    """The reference for the passkey score: every continuation token is the argmax after the tokens before it,
    tokenized as HFLM does (trailing spaces of the context move to the continuation; no special tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    answer = whole[len(tokenizer(context, add_special_tokens=False).input_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, -len(answer):]  # (answer tokens, vocab)
    return bool((logits.argmax(-1) == torch.tensor(answer)).all())
