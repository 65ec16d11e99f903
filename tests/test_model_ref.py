"""One model reference: every kind of name is read once, by `model_ref`, into the `ModelRef` every verb and
`load_model` use; each verb's rule on run folders is a rule on that one reading; one `ModelInfo` rule per family
(from the config before loading = from the adapter after); one ChatGLM trained-length rule."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import ARCHS, tiny_config, tiny_model
from test_chatglm import chatglm_config, chatglm_weights, write_checkpoint

import ctxpatch
from ctxpatch import loading
from ctxpatch.adapters import find_adapter
from ctxpatch.cli import main
from ctxpatch.loading import reference
from ctxpatch.preflight import info_from_config

PACKAGE = Path(ctxpatch.__file__).resolve().parent


@pytest.fixture
def folders(tmp_path):
    """A model folder, a .gguf file, an adapter run folder (ctxpatch.json, no config.json) and a merged one."""
    model = tmp_path / "model"
    tiny_config("llama").save_pretrained(model)
    gguf = tmp_path / "m.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    run = tmp_path / "run"
    run.mkdir()
    (run / "ctxpatch.json").write_text(json.dumps({"kind": "adapter", "patch": {"spec": "yarn"}}))
    merged = tmp_path / "merged"
    tiny_config("llama", ctxpatch={"kind": "merged", "patch": {"spec": "yarn"}}).save_pretrained(merged)
    return {"model": model, "gguf": gguf, "run": run, "merged": merged}


def test_every_kind_of_name_is_read_once(folders, tmp_path):
    assert loading.model_ref(str(folders["model"])) == reference.ModelRef(
        str(folders["model"]), reference.FOLDER, str(folders["model"].absolute()))
    gguf = loading.model_ref(str(folders["gguf"]))
    assert (gguf.kind, gguf.from_pretrained()) == (reference.GGUF, (str(tmp_path), {"gguf_file": "m.Q8_0.gguf"}))
    assert loading.model_ref(str(folders["run"])).carries_patch and loading.model_ref(str(folders["merged"])).carries_patch
    assert loading.model_ref("org/model") == reference.ModelRef("org/model", reference.HUB, "org/model")
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text(json.dumps({"seq_length": 64}))
    ref = loading.model_ref(f"chatglm:{glm}")
    assert (ref.kind, ref.source, ref.train_len()) == (reference.CHATGLM, str(glm.absolute()), 64)
    assert loading.model_ref(ref) is ref  # a reference is taken as it is


def test_the_verbs_rules_on_run_folders_are_rules_on_one_reading(folders, tmp_path, capsys):
    run, merged = str(folders["run"]), str(folders["merged"])
    loading.check_loadable(run), loading.check_loadable(merged)  # eval: both, with their patch
    with pytest.raises(loading.NotAModelFolderError, match=r"is a ctxpatch fine-tune run .* ctxpatch.load\("):
        loading.check_model(run)  # load_model: an adapter is no whole model
    assert loading.check_model(merged).kind == reference.RUN  # a merged model is one (it warns when loaded)
    for name in (run, merged):
        assert main(["tune", "--model", name, "--target-len", "64", "--out", str(tmp_path / "out")]) == 2
        assert "carries its own patch (a ctxpatch run folder): tune the base model" in capsys.readouterr().err


def test_chatglm_prefix_and_path_rule_are_defined_once():
    """The literal "chatglm:" and a path heuristic live in loading/reference.py only."""
    prefixes, heuristics = [], []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "chatglm:":
                prefixes.append(path.relative_to(PACKAGE).as_posix())
            if isinstance(node, ast.FunctionDef) and node.name in ("looks_like_a_path", "looks_local"):
                heuristics.append(path.relative_to(PACKAGE).as_posix())
    assert prefixes == ["loading/reference.py"] and heuristics == ["loading/reference.py"]


@pytest.mark.parametrize("arch", ARCHS)
def test_model_info_from_the_config_is_the_adapters(arch):
    config = tiny_config(arch)
    assert info_from_config(config) == find_adapter(tiny_model(arch)).info


def test_chatglm_info_and_trained_length_from_the_config_are_the_loaded_models(tmp_path):
    config = chatglm_config()
    write_checkpoint(tmp_path / "glm", config, chatglm_weights(config))
    ref = loading.model_ref(f"chatglm:{tmp_path / 'glm'}")
    model = loading.load_base_model(ref, "float32")
    assert ref.train_len() == config["seq_length"] == model.config.max_position_embeddings
    assert info_from_config(ref.config()) == find_adapter(model).info
    assert ctxpatch.chatglm.train_len({"max_sequence_length": 2048}) == 2048  # the first ChatGLM's name


def test_eval_refuses_a_target_len_for_a_run_folder_before_loading(folders, capsys):
    argv = ["eval", "--model", str(folders["run"]), "--target-len", "64", "--lengths", "64", "--tail", "16"]
    assert main(argv) == 2
    assert "carries its own patch, applied as it loads: a target length cannot change it" in capsys.readouterr().err
