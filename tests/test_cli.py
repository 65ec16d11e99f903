"""The command line as a Python user expects it: `python -m ctxpatch`, `--version`, defaults in every help, and one
error policy: a user's mistake is one line `ctxpatch VERB: error: ...` with exit status 2, checked before any model
loads; a traceback is left for bugs. No real model is loaded: tiny configs saved to tmp folders, or bare folders."""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ctxpatch
from conftest import tiny_config, tiny_model
from ctxpatch.cli import build_parser, main
from ctxpatch import loading as model_loading

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def run_module(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ctxpatch", *argv], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=env, timeout=300)


@pytest.fixture
def no_loading(monkeypatch):
    """Every check under test happens before loading: loading fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(model_loading, "load_for_eval", refuse)
    monkeypatch.setattr("ctxpatch.finetune.loop.train", refuse)


@pytest.fixture
def config_folder(tmp_path):
    """A folder holding only a tiny Llama's config.json (3 layers, trained length 32): enough for every check."""
    folder = tmp_path / "tiny"
    tiny_config("llama").save_pretrained(folder)
    return folder


def one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctxpatch {verb}: error: "), err
    return lines[0]


# ---- python -m ctxpatch, --version, help --------------------------------------------------------------------


def test_python_dash_m_ctxpatch_prints_the_version():
    done = run_module("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ctxpatch {ctxpatch.__version__}"


def test_the_version_lives_in_its_own_module():
    from ctxpatch._version import __version__

    assert ctxpatch.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", __version__)


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_verb_is_there_and_every_help_shows_its_defaults():
    verbs = subparsers(build_parser())
    assert {"methods", "eval", "compare", "tasks", "finetune", "merge", "convert-chatglm"} <= set(verbs)
    for verb, parser in verbs.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
                continue
            assert f"(default: {action.default})" in text, (verb, action.dest)


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s", out, re.MULTILINE) for name in ("window", "yarn", "logn", "sinks"))


def test_nothing_in_the_package_imports_the_package_root():
    """Modules import what they need from its own module: the package root from inside the package is a cycle."""
    package = ROOT / "ctxpatch"
    offenders = []
    for file in package.rglob("*.py"):
        if file == package / "__init__.py":
            continue
        depth = len(file.relative_to(package).parts) - 1  # 0: a module right under ctxpatch/
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name == "ctxpatch" for a in node.names):
                offenders.append(f"{file.name}:{node.lineno}: import ctxpatch")
            elif isinstance(node, ast.ImportFrom) and (
                (node.level == depth + 1 and node.module is None) or (node.level == 0 and node.module == "ctxpatch")
            ):
                names = [a.name for a in node.names if not (package / f"{a.name}.py").is_file()
                         and not (package / a.name).is_dir()]
                if names:
                    offenders.append(f"{file.name}:{node.lineno}: {', '.join(names)} from the package root")
    assert not offenders


# ---- one error policy: user mistakes are one line and exit 2, before anything loads --------------------------


def test_a_missing_model_folder(tmp_path, monkeypatch, capsys, no_loading):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "runs/nothere", "--lengths", "64", "--tail", "16"]) == 2
    assert "model 'runs/nothere' does not exist: give 'default', a model folder" in one_error_line(capsys, "eval")


def test_an_empty_model_folder(tmp_path, capsys, no_loading):
    assert main(["compare", "--model", str(tmp_path), "--lengths", "64", "--tail", "16"]) == 2
    assert f"no config.json in '{tmp_path}'" in one_error_line(capsys, "compare")


def test_a_folder_with_only_a_gguf_and_a_file_that_is_no_model(tmp_path, capsys, no_loading):
    (tmp_path / "model.Q4.gguf").write_bytes(b"")
    assert main(["eval", "--model", str(tmp_path), "--lengths", "64", "--tail", "16"]) == 2
    assert "holds model.Q4.gguf but no config.json: name the .gguf file itself" in one_error_line(capsys, "eval")
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["eval", "--model", str(tmp_path / "notes.txt"), "--lengths", "64", "--tail", "16"]) == 2
    assert "is a file but not a .gguf file" in one_error_line(capsys, "eval")


def test_finetune_with_a_missing_model_folder(tmp_path, capsys, no_loading):
    argv = ["finetune", str(RECIPES / "smollm2-135m-32k.yaml"), "model=/nope", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "model '/nope' does not exist" in one_error_line(capsys, "finetune")


def test_finetune_with_an_empty_model_folder(tmp_path, capsys, no_loading):
    argv = ["finetune", str(RECIPES / "smollm2-135m-32k.yaml"), f"model={tmp_path}", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "no config.json in" in one_error_line(capsys, "finetune")


def test_a_chatglm_recipe_whose_folder_does_not_exist(tmp_path, capsys, no_loading):
    argv = ["finetune", str(RECIPES / "chatglm3-6b-32k.yaml"), f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    line = one_error_line(capsys, "finetune")
    assert "ChatGLM folder '/path/to/chatglm3-6b-32k' does not exist: give model=chatglm:FOLDER" in line
    assert "trust_remote_code" not in line


def test_python_dash_m_ctxpatch_finetune_has_the_same_policy(tmp_path, capsys, no_loading):
    from ctxpatch.finetune.__main__ import main as finetune_main

    assert finetune_main([str(RECIPES / "smollm2-135m-32k.yaml"), "model=/nope", f"output_dir={tmp_path}"]) == 2
    assert "model '/nope' does not exist" in one_error_line(capsys, "finetune")


def test_a_recipe_patch_that_does_not_fit_the_model_is_refused_before_loading(config_folder, tmp_path, capsys,
                                                                                no_loading):
    argv = ["finetune", str(RECIPES / "smollm2-135m-32k.yaml"), f"model={config_folder}", "patch=window[layers=[5]]",
            f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "layer index 5 is out of range for a model with 3 layers" in one_error_line(capsys, "finetune")


def test_a_recipe_patch_refused_at_its_target_len_is_refused_before_loading(config_folder, tmp_path, capsys,
                                                                          no_loading):
    argv = ["finetune", str(RECIPES / "smollm2-135m-32k.yaml"), f"model={config_folder}", "patch=string",
            "patch_params={}", "seq_len=16", "target_len=4k", f"output_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    assert "string reaches at most 2L - W" in one_error_line(capsys, "finetune")


def test_a_recipe_target_len_within_the_trained_length_warns(config_folder, tmp_path, capsys, no_loading):
    argv = ["finetune", str(RECIPES / "smollm2-135m-32k.yaml"), f"model={config_folder}", "seq_len=16",
            "target_len=32", "positions=contiguous", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(argv)
    assert "ctxpatch finetune: warning: target_len 32 is not above the model's trained length 32" in (
        capsys.readouterr().err)


EVAL_MISTAKES = [
    (["eval", "--param", "window=3"], "--param window is given without a patch"),
    (["eval", "--patch", "none", "--param", "window=3"], "--param window is given without a patch"),
    (["compare", "--patches", "none", "--param", "window=3"], "--param window is given but no patch takes it"),
    (["eval", "--patch", "yarn", "--param", "window=3"], "parameter(s) window not taken by yarn"),
    (["eval", "--patch", "yarn[factor=nan]"], "factor=nan: non-finite numbers are refused"),
    (["eval", "--patch", "yarn", "--param", "factor=inf"], "factor=inf: non-finite numbers are refused"),
    (["eval", "--patch", "window[layers=abc]"], "layers takes ints"),
    (["eval", "--patch", "windw"], "Did you mean 'window'?"),
    (["eval", "--patch", "yarn[factor=4"], "unbalanced '['"),
    (["eval", "--patch", "missing.json"], "spec file 'missing.json' does not exist"),
    (["compare", "--patches", "window[window=8],window[window=8]"], "listed twice"),
    (["eval", "--patch", "window[layers=[5]]"], "layer index 5 is out of range for a model with 3 layers"),
    (["eval", "--patch", "window[window=0]"], "window: window=0 must be a positive integer"),
    (["eval", "--patch", "window+bca"], "two masks, 'window' and 'bca'"),
    (["eval", "--tail", "40", "--lengths", "64"], "--tail 40 must be shorter than the model's trained length (32)"),
    (["eval", "--max-length", "100"], "--max-length 100 is shorter than the longest length (128)"),
    (["eval", "--max-length", "0"], "--max-length 0 must be a positive number of tokens"),
    (["eval", "--patch", "string", "--target-len", "1000"], "string reaches at most 2L - W = "),
    (["compare", "--patches", "none,string", "--target-len", "1000"], "target_len=1000 needs a rule that remaps"),
]


@pytest.mark.parametrize("argv,message", EVAL_MISTAKES, ids=[" ".join(a) for a, _ in EVAL_MISTAKES])
def test_eval_mistakes_are_one_line_before_loading(argv, message, config_folder, capsys, no_loading):
    defaults = ["--model", str(config_folder), "--lengths", "64,128", "--tail", "16"]
    given = {a for a in argv if a.startswith("--")}
    extra = [x for i in range(0, len(defaults), 2) if defaults[i] not in given for x in defaults[i:i + 2]]
    assert main([*argv, *extra]) == 2
    assert message in one_error_line(capsys, argv[0])


def test_a_target_at_or_below_the_trained_length_warns_in_one_line(config_folder, tmp_path, capsys, no_loading):
    argv = ["eval", "--model", str(config_folder), "--patch", "selfextend", "--target-len", "32", "--lengths", "64",
            "--tail", "16", "--out", str(tmp_path / "out")]
    with pytest.raises(AssertionError, match="the model was loaded"):  # a warning, not a refusal: it goes on
        main(argv)
    err = capsys.readouterr().err
    assert err.strip() == ("ctxpatch eval: warning: --target-len 32 is not above the model's trained length 32: "
                           "there is nothing to extend; pass a longer target (e.g. 64) or leave it out")


def test_an_unknown_backend_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--backend", "fast"])
    assert exit_.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback():
    """Only user mistakes become messages: anything else (a bug in ctxpatch) propagates with its traceback."""
    from ctxpatch.cli import run_verb

    def broken(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_verb("methods", broken, None)
    assert run_verb("methods", lambda args: (_ for _ in ()).throw(ctxpatch.SpecError("a mistake")), None) == 2


def test_a_user_mistake_through_python_dash_m_has_no_traceback(tmp_path):
    done = run_module("eval", "--model", str(tmp_path), "--lengths", "64", "--tail", "16")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"ctxpatch eval: error: no config.json in '{tmp_path}': name a folder holding a transformers model "
        "(config.json and weights), a .gguf file, or a ctxpatch run folder"
    )


def test_the_chatglm_tokenizer_of_a_missing_folder_says_the_folder_is_missing():
    from ctxpatch.loading import load_base_tokenizer

    with pytest.raises(ctxpatch.ModelPathError, match=r"ChatGLM folder '/nope/glm' does not exist") as caught:
        load_base_tokenizer("chatglm:/nope/glm", trust_remote_code=False)
    assert "trust_remote_code" not in str(caught.value)


def test_error_classes_a_python_caller_can_catch():
    from ctxpatch.eval.errors import EvalError, TruncationError
    from ctxpatch.finetune.recipe import RecipeError

    for error in (EvalError, TruncationError, RecipeError, ctxpatch.SpecError, ctxpatch.ModelPathError,
                  ctxpatch.UnknownMethodError, ctxpatch.CompositionError):
        assert issubclass(error, ctxpatch.UserInputError)
    assert issubclass(ctxpatch.ModelPathError, FileNotFoundError) and issubclass(ctxpatch.SpecError, ValueError)
    assert issubclass(ctxpatch.ParameterTypeError, TypeError) and issubclass(ctxpatch.ParameterValueError, ValueError)


def test_a_hub_name_not_in_the_cache_while_offline(monkeypatch, tmp_path, capsys, no_loading):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert main(["eval", "--model", "someorg/not-cached", "--lengths", "64", "--tail", "16"]) == 2
    assert "'someorg/not-cached' is neither a local path nor in the Hugging Face cache" in one_error_line(capsys, "eval")
    assert main(["eval", "--model", "bad name!!", "--lengths", "64", "--tail", "16"]) == 2
    assert "'bad name!!' is neither a local path nor a hub name" in one_error_line(capsys, "eval")


HEAVY = ("torch", "transformers", "lm_eval", "peft", "accelerate")
HELP_PROBE = f"""
import sys, time
began = time.perf_counter()
from ctxpatch.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
seconds = time.perf_counter() - began
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("HEAVY", ",".join(heavy), "SECONDS", round(seconds, 3), file=sys.stderr)
"""


VERB_NAMES = ("methods", "convert-chatglm", "eval", "compare", "tasks", "finetune", "merge", "tune")


@pytest.mark.parametrize("argv", [["--help"], *[[verb, "--help"] for verb in VERB_NAMES]], ids=" ".join)
def test_help_answers_without_importing_torch_or_transformers(argv):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert "usage: ctxpatch" in done.stdout
    probe = re.search(r"HEAVY (\S*) SECONDS (\S+)", done.stderr)
    assert probe, done.stderr
    # no wall-clock bound: under a loaded CI machine it failed at 1.7 s; not importing the heavy modules is the point
    assert probe.group(1) == "", f"`ctxpatch {' '.join(argv)}` imported {probe.group(1)}"


def test_every_verb_is_in_the_parser_and_the_chatglm_choices_match_the_conversion():
    from ctxpatch import chatglm, cli_chatglm

    verbs = build_parser()._subparsers._group_actions[0].choices
    assert set(verbs) == set(VERB_NAMES)
    assert cli_chatglm.ROPE_RATIO_AS == chatglm.ROPE_RATIO_AS


def test_the_lazy_package_names_are_the_ones_type_checkers_see():
    """ctxpatch/__init__.py imports its public names on first use (`_LAZY`); its TYPE_CHECKING block must name the
    same ones from the same modules, or IDEs and the API reference would show another API."""
    tree = ast.parse((ROOT / "ctxpatch" / "__init__.py").read_text())
    block = next(node for node in tree.body
                 if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == ctxpatch._LAZY
    for name in ctxpatch._LAZY:
        assert getattr(ctxpatch, name) is getattr(importlib.import_module(f"ctxpatch.{ctxpatch._LAZY[name]}"), name)


def test_every_deliberate_refusal_is_a_user_input_error():
    """What the CLI prints as one line is a UserInputError (the policy of ctxpatch/errors.py)."""
    from ctxpatch.backends import UnknownBackendError
    from ctxpatch.chatglm import ChatGLMConversionError
    from ctxpatch.errors import DeviceError, UnknownTrainedLengthError
    from ctxpatch.tune.errors import BudgetError, TuneError

    for error in (TuneError, BudgetError, ChatGLMConversionError, UnknownBackendError, DeviceError,
                  UnknownTrainedLengthError, ctxpatch.AlreadyPatchedError, model_loading.ModelNotFoundError,
                  model_loading.NotAModelFolderError, model_loading.InvalidDtypeError):
        assert issubclass(error, ctxpatch.UserInputError), error
    with pytest.raises(UnknownBackendError, match="unknown backend 'fast'"):
        ctxpatch.apply(tiny_model("llama"), "window", backend="fast")
    with pytest.raises(ctxpatch.UserInputError, match="pass device= or device_map=, not both"):
        ctxpatch.load_model("default", device="cpu", device_map="auto")
