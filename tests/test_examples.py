"""Every script in examples/ runs, as a user runs it (a subprocess of this Python, the repository on
PYTHONPATH), on a tiny random model folder, and prints what it says it does: none of them can rot. So do the
Python snippets of the README and the docs that run on a model loaded beforehand."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_chatglm_tokenizer import checkpoint_with_tokenizer, train_spm
from test_eval_fixtures import TRAIN_LEN, generated_text, one_thread, tiny_lm, tiny_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, status: int = 0) -> str:
    """stdout + stderr of a command run from `cwd`; fails the test with both unless it exits with `status`."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(command, check=False, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == status, f"{command} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def example(name: str, *args: str, cwd: Path, status: int = 0) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args], cwd, status=status)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A 3-layer random Llama trained to 192 positions, with its tokenizer (test_eval_fixtures.tiny_lm)."""
    model, tokenizer = tiny_lm()
    folder = tmp_path_factory.mktemp("examples") / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("examples") / "text.txt"
    path.write_text(generated_text(), encoding="utf-8")
    return path


def test_every_example_is_tested_and_listed():
    tested = {"quickstart.py", "compare_methods.py", "finetune_and_load.py", "serve_merged.py", "chatglm3.py",
              "lm_eval_harness.sh"}
    scripts = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh")}
    assert scripts == tested
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"[`{name}`]({name})" in listed for name in scripts)


def test_quickstart_generates_past_the_trained_length_and_removes_the_patch(model_folder, text_file, tmp_path):
    out = example("quickstart.py", "--model", str(model_folder), "--target-len", "512", "--length", "300",
                  "--new-tokens", "4", "--text", str(text_file), cwd=tmp_path)
    assert "Patch('selfextend', backend='blockwise', target_len=512, active)" in out
    assert "group from target_len" in out  # the parameter target_len chose is shown
    assert f"prompt: 300 tokens (trained length {TRAIN_LEN})" in out
    assert "generated:" in out
    assert "Patch('selfextend', backend='blockwise', target_len=512, removed)" in out


def test_compare_methods_prints_and_writes_the_leaderboard(model_folder, text_file, tmp_path):
    out = example("compare_methods.py", "--model", str(model_folder), "--patches", "none", "window[window=48]",
                  "--lengths", "256", "--tail", "24", "--depths", "1", "--text", str(text_file),
                  "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert "**Perplexity ratio**" in out and "| `window[window=48]` |" in out and "**passkey**" in out
    record = json.loads((tmp_path / "cmp" / "leaderboard.json").read_text())
    assert record["config"]["lengths"] == [256] and record["config"]["text_files"] == [str(text_file)]
    assert set(record["summary"]) == {"native_perplexity", "none", "window[window=48]"}


def test_finetune_load_merge_then_plain_transformers_serves_the_merge(model_folder, text_file, tmp_path):
    run_dir, merged = tmp_path / "run", tmp_path / "merged"
    out = example("finetune_and_load.py", "--merged", str(merged), f"model={model_folder}",
                  f"data.files=[{text_file}]", "seq_len=16", "target_len=512", "max_steps=1",
                  f"output_dir={run_dir}", "progress=false", cwd=tmp_path)
    assert "recipe " in out and "patch 'yarn'" in out  # recipes/smollm2-135m-32k.yaml, yarn x4
    assert "trained 1 steps" in out and (run_dir / "adapter_config.json").is_file()
    assert "loaded: Patch('yarn'" in out and "yarn(factor=4.0" in out
    assert f"merged into {merged}" in out
    rope = json.loads((merged / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["original_max_position_embeddings"] == TRAIN_LEN

    out = example("serve_merged.py", str(merged), "--length", "300", "--new-tokens", "4", "--device", "cpu",
                  "--text", str(text_file), cwd=tmp_path)
    assert "'rope_type': 'yarn'" in out and "prompt: 300 tokens" in out and "generated:" in out


def test_serve_merged_refuses_a_patch_transformers_does_not_compute(model_folder, tmp_path):
    config = json.loads((model_folder / "config.json").read_text())
    config["ctxpatch"] = {"kind": "merged", "patch": {"spec": "logn+window"}}  # recorded, not native
    folder = tmp_path / "recorded-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = example("serve_merged.py", str(folder), cwd=tmp_path, status=2)  # before any model loads
    assert "serve_merged.py: error:" in out and "WITHOUT it" in out and f"ctxpatch.load({str(folder)!r})" in out


def test_chatglm3_converts_and_chats_without_remote_code(tmp_path):
    src, dst = tmp_path / "chatglm3", tmp_path / "chatglm3-glm"
    checkpoint_with_tokenizer(src, train_spm())  # its remote-code files raise if run
    out = example("chatglm3.py", str(src), "--converted", str(dst), "--new-tokens", "4", "--prompt", "Hi there",
                  "--device", "cpu", cwd=tmp_path)
    assert f"converted {src} -> {dst}" in out and "tokenizer.json" in out
    assert "Patch('logn+window'" in out and "user: Hi there" in out and "assistant:" in out
    specials = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in specials
    assert "stop ids: [2, " in out  # </s>, <|user|>, <|observation|> from the converted generation config


def test_lm_eval_harness_script_runs_lm_eval_with_a_patch(model_folder, tmp_path):
    env = {"PYTHON": sys.executable, "MODEL": str(model_folder), "TARGET_LEN": "384", "LENGTHS": "[256]",
           "DEPTHS": "[1.0]", "TASKS": "ctxpatch_passkey", "DEVICE": "cpu", "OUT": str(tmp_path / "results")}
    out = run(["bash", str(EXAMPLES / "lm_eval_harness.sh")], tmp_path, env)
    assert "'patch': 'selfextend', 'target_len': 384" in out
    written = list((tmp_path / "results").rglob("results_*.json"))
    assert len(written) == 1
    scores = json.loads(written[0].read_text())["results"]["ctxpatch_passkey"]
    assert scores["256,none"] in (0.0, 1.0) and scores["8192,none"] == -1


@pytest.mark.parametrize("name", ["serve_merged.py", "chatglm3.py"])
def test_an_example_run_with_no_arguments_prints_its_usage(name, tmp_path):
    out = example(name, cwd=tmp_path, status=2)  # its default folder is not in an empty directory
    assert out.startswith(f"usage: {name}") and f"{name}: error: " in out and "Traceback" not in out


def python_block(doc: str, first_line: str) -> str:
    """The ```python block of `doc` (a path under the repository) that starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), flags=re.DOTALL)
    return next(block for block in blocks if block.startswith(first_line))


@pytest.mark.parametrize("doc, first_line", [
    ("README.md", "import ctxpatch"),
    ("docs/index.md", "import ctxpatch"),
    ("docs/methods.md", 'ctxpatch.apply(model, "retrieval")'),
])
@pytest.mark.usefixtures("one_thread")
def test_a_doc_snippet_runs_as_written(doc, first_line, monkeypatch):
    """The snippet, in order, on a tiny model shaped as the default one where the snippets' explicit values
    assume it (trained to 8,192 positions, 30 layers): it stands in for `load_model("default")`, a short text for
    the file read, and `ids` and `model` are given to the snippets that assume them."""
    from conftest import tiny_model

    import ctxpatch

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=8192, num_hidden_layers=30,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    monkeypatch.setattr(ctxpatch, "load_model", lambda *args, **kwargs: (model, tokenizer))
    text = generated_text(words=150, seed=3)
    ids = tokenizer(text, return_tensors="pt").input_ids
    namespace = {"ctxpatch": ctxpatch, "model": model, "ids": ids, "open": lambda *args, **kwargs: io.StringIO(text)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target length far past the tiny model's warns; that is not tested here
        exec(compile(python_block(doc, first_line), doc, "exec"), namespace)
