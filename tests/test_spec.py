"""The one spec grammar (`ctxpatch.parse_spec`): every form against the method objects it should give, the same
grammar in `apply`, eval/compare and recipes, and every error with its message."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ctxpatch
from conftest import token_ids
from ctxpatch.eval.options import eval_spec
from ctxpatch.finetune.recipe import RecipeError, load_recipe, patch_arguments
from ctxpatch.registry import at_least, number_in, positive_number


def described(parsed) -> list[tuple[str, dict, list | None]]:
    return [(m.name, m.values, m.layers) for m in parsed.methods]


# ---- every form ----------------------------------------------------------------------------------------------

FORMS = [
    ("window", [("window", {}, None)]),
    ("logn+window", [("logn", {}, None), ("window", {}, None)]),
    (" logn + window ", [("logn", {}, None), ("window", {}, None)]),
    ("yarn[factor=4]", [("yarn", {"factor": 4}, None)]),
    ("yarn[factor=4.5, beta_fast=16]", [("yarn", {"factor": 4.5, "beta_fast": 16}, None)]),
    ("hybrid[window=8192]+rerope[window=4096]", [("hybrid", {"window": 8192}, None), ("rerope", {"window": 4096}, None)]),
    ("hybrid[window=8192]+rerope", [("hybrid", {"window": 8192}, None), ("rerope", {}, None)]),
    ("window[window=64,layers=[0,1]]", [("window", {"window": 64}, [0, 1])]),
    ("window[layers=2]", [("window", {}, [2])]),
    ("longrope[short_factor=[1.0,2.0],long_factor=[3, 4]]",
     [("longrope", {"short_factor": [1.0, 2.0], "long_factor": [3, 4]}, None)]),
    ("yarn[attention_factor=None]", [("yarn", {"attention_factor": None}, None)]),
    ("none", []),
    ("NONE", []),
]


@pytest.mark.parametrize("text,expected", FORMS, ids=[f[0] for f in FORMS])
def test_text_forms_give_these_methods(text, expected):
    assert described(ctxpatch.parse_spec(text)) == expected


def test_a_bare_word_value_is_a_string():
    from ctxpatch.spec import parse_params

    assert parse_params("mode=linear, path=a/b.txt, n=3", where="x") == {"mode": "linear", "path": "a/b.txt", "n": 3}


def test_method_objects_lists_and_mixed_lists():
    window = ctxpatch.method("window", window=8)
    assert described(ctxpatch.parse_spec(window)) == [("window", {"window": 8}, None)]
    assert described(ctxpatch.parse_spec(["logn", window])) == [("logn", {}, None), ("window", {"window": 8}, None)]
    assert described(ctxpatch.parse_spec(["yarn[factor=3]", "window"])) == [("yarn", {"factor": 3}, None),
                                                                            ("window", {}, None)]
    assert ctxpatch.parse_spec([]).methods == []  # an empty list is "none", as Patch.to_dict() of "none" records


def test_a_dict_and_a_json_file_give_the_recorded_methods_and_target_len(tmp_path):
    record = {"spec": "yarn+window", "backend": "blockwise", "target_len": 65536,
              "methods": [{"name": "yarn", "params": {"factor": 4.0}, "layers": None},
                          {"name": "window", "params": {"window": 16}, "layers": [0, 2]}]}
    for spec in (record, str(tmp_path / "tuned.json"), tmp_path / "tuned.json"):
        (tmp_path / "tuned.json").write_text(json.dumps(record))
        parsed = ctxpatch.parse_spec(spec)
        assert described(parsed) == [("yarn", {"factor": 4.0}, None), ("window", {"window": 16}, [0, 2])]
        assert parsed.target_len == 65536 and parsed.meta["backend"] == "blockwise"
    assert ctxpatch.parse_spec({"spec": "yarn[factor=2]"}).methods[0].values == {"factor": 2}
    run_record = {"format": 1, "patch": {"spec": "yarn", "methods": [{"name": "yarn", "params": {"factor": 8}}]},
                  "training": {"target_len": 32768}}
    parsed = ctxpatch.parse_spec(run_record)  # a fine-tune run's ctxpatch.json
    assert described(parsed) == [("yarn", {"factor": 8}, None)] and parsed.target_len == 32768


# ---- the same grammar in apply ------------------------------------------------------------------------------


def test_apply_takes_brackets_per_method_and_keywords_for_every_method_taking_them(llama):
    with ctxpatch.apply(llama, "hybrid[window=8]+rerope[window=4]") as patch:
        assert {m.name: m.values["window"] for m in patch.methods} == {"hybrid": 8, "rerope": 4}
    with ctxpatch.apply(llama, "hybrid[window=8]+rerope", window=6) as patch:  # the bracket wins on hybrid
        assert {m.name: m.values["window"] for m in patch.methods} == {"hybrid": 8, "rerope": 6}
    with ctxpatch.apply(llama, "window[layers=[0]]+logn[layers=[1,2]]") as patch:
        assert {m.name: m.layers for m in patch.methods} == {"window": [0], "logn": [1, 2]}


def test_apply_none_returns_a_patch_that_changes_nothing(llama):
    ids = token_ids(1, 12)
    with torch.no_grad():
        before = llama(ids).logits
        patch = ctxpatch.apply(llama, "none")
        assert ctxpatch.current_patch(llama) is None and patch.methods == []
        assert patch.to_dict()["spec"] == "none" and patch.to_dict()["methods"] == []
        torch.testing.assert_close(llama(ids).logits, before, rtol=0, atol=0)
        patch.remove()
        with pytest.raises(TypeError, match="window not taken by none"):
            ctxpatch.apply(llama, "none", window=4)


def test_apply_none_to_a_patched_model_needs_replace(llama):
    ctxpatch.apply(llama, "window", window=4)
    with pytest.raises(ctxpatch.AlreadyPatchedError):
        ctxpatch.apply(llama, "none")
    ctxpatch.apply(llama, "none", replace=True)
    assert ctxpatch.current_patch(llama) is None


def test_apply_reads_its_own_to_dict_and_json_file(llama, tmp_path):
    ids = token_ids(1, 40)
    with torch.no_grad():
        with ctxpatch.apply(llama, "yarn[factor=4]+window[window=8]") as patch:
            expected, record = llama(ids).logits, patch.to_dict()
        with ctxpatch.apply(llama, record):
            torch.testing.assert_close(llama(ids).logits, expected, rtol=0, atol=0)
        (tmp_path / "spec.json").write_text(json.dumps({**record, "target_len": 128}))
        with ctxpatch.apply(llama, str(tmp_path / "spec.json")):
            torch.testing.assert_close(llama(ids).logits, expected, rtol=0, atol=0)


# ---- errors ---------------------------------------------------------------------------------------------------

BAD = [
    (None, TypeError, r"no spec given \(None\): pass a spec, e\.g\. 'logn\+window'"),
    (3, TypeError, r"a spec is text, a list, a dict or a method object, not int"),
    ([None], TypeError, r"a spec list holds method names and method objects, not NoneType"),
    ("", ValueError, r"bad spec '': write method names joined by '\+'"),
    ("logn+", ValueError, r"bad spec 'logn\+'"),
    ("windw", ctxpatch.UnknownMethodError, r"Did you mean 'window'"),
    ("yarn[factor=4", ctxpatch.SpecError, r"unbalanced '\['"),
    ("yarn[factor=4]]", ctxpatch.SpecError, r"unbalanced '\]'"),
    ("yarn[factor]", ctxpatch.SpecError, r"'factor' is not key=value"),
    ("yarn[factor=4,factor=5]", ctxpatch.SpecError, r"factor is given twice"),
    ("yarn[factor=nan]", ctxpatch.SpecError, r"factor=nan: non-finite numbers are refused"),
    ("yarn[factor=inf]", ctxpatch.SpecError, r"non-finite"),
    ("yarn[factor=1e999]", ctxpatch.SpecError, r"non-finite"),
    ("yarn[factor=(]", ctxpatch.SpecError, r"unbalanced|not a value"),
    ("yarn[factor=4 5]", ctxpatch.SpecError, r"factor='4 5' is not a value"),
    ("yarn[fctor=4]", TypeError, r"yarn\(\) got unknown parameter\(s\) fctor; it takes .*factor"),
    ("window[layers=abc]", TypeError, r"layers='abc' is not a layer index.*layers takes ints"),
    ("none+window", ctxpatch.SpecError, r"'none' \(no patch\) cannot be combined"),
    ("none[window=3]", ctxpatch.SpecError, r"'none' \(no patch\) cannot be combined"),
    ("yarn+yarn[factor=3]", ctxpatch.CompositionError, r"'yarn' appears twice"),
    ("missing.json", ctxpatch.SpecError, r"spec file 'missing\.json' does not exist"),
    ({"name": "yarn"}, ctxpatch.SpecError, r"has no 'methods' list"),
    ({"methods": {"name": "yarn"}}, ctxpatch.SpecError, r"'methods' must be a list"),
    ({"methods": [{"params": {}}]}, ctxpatch.SpecError, r"methods\[0\] must be an object with a 'name'"),
    ({"methods": [{"name": "yarn", "params": 4}]}, ctxpatch.SpecError, r"methods\[0\]\.params must map"),
    ({"methods": [{"name": "yarn", "params": {"factor": math.nan}}]}, ctxpatch.SpecError, r"non-finite"),
    ({"methods": [], "target_len": -1}, ctxpatch.SpecError, r"target_len=-1 must be a positive number"),
]


@pytest.mark.parametrize("spec,error,message", BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_a_bad_spec_is_a_clear_error(spec, error, message):
    with pytest.raises(error, match=message) as caught:
        ctxpatch.parse_spec(spec)
    assert isinstance(caught.value, ctxpatch.UserInputError)


def test_bad_json_files_say_what_is_wrong(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ctxpatch.SpecError, match=r"broken\.json' is not valid JSON"):
        ctxpatch.parse_spec(str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ctxpatch.SpecError, match=r"must hold a JSON object.*not list"):
        ctxpatch.parse_spec(str(tmp_path / "list.json"))


@pytest.mark.parametrize("spec,params,error,message", [
    (None, {}, TypeError, r"no spec given \(None\)"),
    ("window", {"layers": "abc"}, TypeError, r"layers='abc' is not a layer index.*layers takes ints"),
    ("window", {"layers": [0, "1"]}, TypeError, r"layers takes ints"),
    ("window", {"layers": True}, TypeError, r"layers takes ints"),
    ("yarn", {"factor": math.nan}, ValueError, r"yarn: factor=nan must be a number >= 1"),
    ("yarn", {"factor": math.inf}, ValueError, r"yarn: factor=inf must be a number >= 1"),
    ("kerple_log", {"r1": math.nan}, ValueError, r"r1=nan must be a finite number > 0"),
    ("kerple_log", {"r1": math.inf}, ValueError, r"r1=inf must be a finite number > 0"),
    ("kerple_power", {"r2": math.nan}, ValueError, r"r2=nan must be a number in \(0, 2\]"),
])
def test_apply_refuses_these_with_a_clear_error(llama, spec, params, error, message):
    with pytest.raises(error, match=message) as caught:
        ctxpatch.apply(llama, spec, **params)
    assert isinstance(caught.value, ctxpatch.UserInputError)
    assert ctxpatch.current_patch(llama) is None


@pytest.mark.parametrize("check", [positive_number, number_in(0, 2), number_in(0, 2, low_open=False), at_least(1)])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1"])
def test_number_checks_refuse_non_finite_and_non_numbers(check, value):
    assert check(value) is not None


@pytest.mark.parametrize("check", [positive_number, number_in(0, 2), at_least(1)])
def test_number_checks_accept_finite_numbers(check):
    assert check(1) is None and check(1.5) is None


# ---- the same grammar in eval/compare and recipes -----------------------------------------------------------


def test_eval_specs_are_the_core_grammar():
    spec = eval_spec("hybrid[window=64]+rerope[window=32]")
    assert described(spec.parsed) == [("hybrid", {"window": 64}, None), ("rerope", {"window": 32}, None)]
    assert spec.label == "hybrid[window=64]+rerope[window=32]"
    assert eval_spec("window", {"window": 32}).label == "window[window=32]"
    assert eval_spec("logn+window", {"full_layers": 2}).label == "logn+window (full_layers=2)"
    assert eval_spec("none").is_none and eval_spec("none").label == "none"
    with pytest.raises(ctxpatch.SpecError, match="non-finite"):
        eval_spec("yarn[factor=nan]")


def test_recipe_patch_takes_the_core_grammar(tmp_path):
    methods, _ = patch_arguments(load_recipe(None, ["output_dir=x", "patch=hybrid[window=64]+rerope[window=32]"]))
    assert [(m.name, m.values) for m in methods] == [("hybrid", {"window": 64}), ("rerope", {"window": 32})]
    methods, _ = patch_arguments(load_recipe(None, ["output_dir=x", "patch=yarn[factor=4]", "patch_params.yarn.beta_fast=8"]))
    assert methods[0].values == {"factor": 4, "beta_fast": 8}
    (tmp_path / "tuned.json").write_text(json.dumps({"methods": [{"name": "window", "params": {"window": 16}}]}))
    methods, _ = patch_arguments(load_recipe(None, ["output_dir=x", f"patch={tmp_path / 'tuned.json'}"]))
    assert [(m.name, m.values) for m in methods] == [("window", {"window": 16})]
    with pytest.raises(RecipeError, match=r"yarn's factor is set both in patch \(a bracket\) and in patch_params\.yarn"):
        patch_arguments(load_recipe(None, ["output_dir=x", "patch=yarn[factor=4]", "patch_params.yarn.factor=8"]))
    with pytest.raises(RecipeError, match=r"patch='yarn\[factor=nan\]' is refused: factor=nan: non-finite"):
        patch_arguments(load_recipe(None, ["output_dir=x", "patch=yarn[factor=nan]"]))

