"""Two processes (torchrun, gloo on CPU, through accelerate) compute the same steps as one process
with the same global batch: the same losses and the same adapter, within float tolerance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune_helpers import make_model_dir, reset_accelerate, tiny_overrides, write_text
from torch.testing import assert_close

from ctxpatch.finetune import load_recipe, train

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    model_dir = make_model_dir(tmp_path / "llama")
    text = write_text(tmp_path / "plays.txt", 3000)
    extra = dict(
        patch="kerple_log",
        max_steps=3,
        global_batch=4,
        micro_batch=1,
        checkpoint_every=100,
        eval_every=3,
        **{"trainable.norms": "true"},
    )

    two, recipe = tmp_path / "two", tmp_path / "tiny.yaml"
    recipe.write_text("# everything comes from the overrides\n", encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [
            TORCHRUN,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "ctxpatch.finetune",
            str(recipe),
            *tiny_overrides(model_dir, text, two, **extra),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es) on cpu, MULTI_CPU" in done.stdout
    assert "= 1 x 2 x 2 accumulation" in done.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reset_accelerate()
        one = train(load_recipe(None, tiny_overrides(model_dir, text, tmp_path / "one", **extra)))
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)

    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    assert_close(
        torch.tensor([r["loss"] for r in rows_two]),
        torch.tensor([r["loss"] for r in one.metrics]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert_close(
        torch.tensor(rows_two[-1]["val_loss"]), torch.tensor(one.metrics[-1]["val_loss"]), rtol=1e-5, atol=1e-6
    )
    for name in ("adapter_model.safetensors", "ctxpatch_parameters.safetensors"):
        expected, got = load_file(str(tmp_path / "one" / name)), load_file(str(two / name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert json.loads((two / "ctxpatch.json").read_text())["training"]["processes"] == 2
