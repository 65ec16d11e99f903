"""Data-parallel evaluation: `torchrun --nproc_per_node 2 -m ctxpatch compare ...` on 2 gloo CPU processes writes
the leaderboard of the one-process run, once — including a length whose tasks have fewer requests than processes,
generation, per-length targets and a refused cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctxpatch.cli import main
from ctxpatch.eval.distributed import Launch, launch_from_env
from ctxpatch.eval.errors import EvalError
from test_eval_fixtures import model_folder, one_thread, text_file  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def test_launch_reads_the_launchers_environment():
    assert launch_from_env({}) == Launch(0, 1, 0)
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(EvalError, match="outside WORLD_SIZE"):
        launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shares_cover_every_item_once():
    items = list(range(7))
    shares = [Launch(rank, 3).share(items) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert Launch(1, 9).share([0, 1]) == [1] and Launch(5, 9).share([0, 1]) == []


def compare_argv(model_folder, text_file, out):  # noqa: F811
    # string is refused at 384 (> 2L - W = 352), so its cells there are "refused"; passkey_gen generates;
    # with target_len auto each length runs alone: 1 perplexity window for 2 processes
    return ["compare", "--model", str(model_folder), "--patches", "none,selfextend,string", "--lengths", "160,384",
            "--tasks", "ppl,passkey,passkey_gen", "--depths", "0,1", "--tail", "24", "--text", str(text_file),
            "--target-len", "auto", "--out", str(out)]


def test_two_processes_write_the_one_process_leaderboard(model_folder, text_file, tmp_path, capsys):  # noqa: F811
    argv = compare_argv(model_folder, text_file, tmp_path / "two")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ctxpatch",
         *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("**Perplexity ratio**") == 1  # rank 0 alone prints (and writes)
    assert "on 2 processes" in launched.stderr

    assert main(compare_argv(model_folder, text_file, tmp_path / "one")) == 0
    capsys.readouterr()
    two = json.loads((tmp_path / "two" / "leaderboard.json").read_text())
    one = json.loads((tmp_path / "one" / "leaderboard.json").read_text())
    for board in (one, two):  # the seconds differ, nothing else may
        del board["seconds"]
        for row in board["summary"].values():
            if isinstance(row, dict):
                row.pop("seconds", None)
    assert two == one
    assert one["forwards"] > 0 and one["summary"]["string"]["refused"]["384"].startswith("string reaches at most")
    assert {r["spec"] for r in one["records"]} == {"reference", "none", "selfextend", "string"}
    assert {(r["task"], r["length"]) for r in one["records"] if r["spec"] == "selfextend"} == {
        (task, n) for task in ("ppl", "passkey", "passkey_gen") for n in (160, 384)}


def test_an_error_in_one_process_is_raised_in_every_process(monkeypatch):
    from ctxpatch.eval import distributed
    from ctxpatch.eval.errors import TruncationError

    launch = Launch(rank=0, world_size=2)
    other_rank = ({}, TruncationError("a prompt of 999 tokens does not fit"))
    monkeypatch.setattr(distributed, "all_gather_object", lambda launch, mine: [mine, other_rank])
    with pytest.raises(TruncationError, match="999 tokens"):  # rank 0's own share went fine
        distributed.merged(launch, lambda: {"a": 1})
    monkeypatch.setattr(distributed, "all_gather_object", lambda launch, mine: [mine, ({"b": 2}, None)])
    assert distributed.merged(launch, lambda: {"a": 1}) == {"a": 1, "b": 2}
    sent = []
    monkeypatch.setattr(distributed, "all_gather_object", lambda launch, mine: sent.append(mine) or [mine, ({}, None)])

    def fails():
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        distributed.merged(launch, fails)
    assert isinstance(sent[0][1], ValueError)  # the others are told, not left waiting
