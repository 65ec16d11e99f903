"""Recipes: every shipped recipe validates; overrides; every way a recipe can be wrong gets an error
that names the key and says what it accepts (or the closest valid key) — before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctxpatch.finetune import RecipeError, RecipeNotFoundError, load_recipe
from ctxpatch.finetune.loop import accumulation_steps, patch_arguments, resolve_device, resolve_precision
from ctxpatch.finetune.recipe import KNOBS, parse_override

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_documents_every_knob(path):
    recipe = load_recipe(path)
    assert recipe.output_dir
    text = path.read_text(encoding="utf-8")
    header = text.split("\n\n")[0]
    assert all(line.startswith("#") for line in header.splitlines())
    assert f"ctxpatch finetune recipes/{path.name}" in header or f"-m ctxpatch.finetune recipes/{path.name}" in header
    for line in text.splitlines():  # an inline comment on every knob
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert " # " in line, f"{path.name}: no inline comment on {line!r}"


def test_the_cpu_recipe_takes_the_overrides_the_issue_names(tmp_path):
    recipe = load_recipe(
        RECIPES[[p.name for p in RECIPES].index("smollm2-135m-32k.yaml")],
        [
            "model=other",
            "patch=selfextend",
            "max_steps=50",
            "seq_len=512",
            "target_len=16384",
            f"output_dir={tmp_path}",
            "lora.r=16",
        ],
    )
    assert (recipe.model, recipe.patch, recipe.max_steps, recipe.seq_len, recipe.target_len, recipe.lora.r) == (
        "other",
        "selfextend",
        50,
        512,
        16384,
        16,
    )
    assert recipe.output_dir == str(tmp_path)


@pytest.mark.parametrize("name", ["smollm2-135m-64k.yaml", "smollm2-135m-32k.yaml"])
def test_the_cpu_recipes_compare_pose_and_stretched_with_one_override(name, tmp_path):
    path = RECIPES[[p.name for p in RECIPES].index(name)]
    pose = load_recipe(path, [f"output_dir={tmp_path}"])
    stretched = load_recipe(path, [f"output_dir={tmp_path}", "positions=stretched"])
    assert pose.positions.scheme == "pose" and stretched.positions.scheme == "stretched"
    assert pose.differences(stretched.to_dict()) == ["positions.scheme"]
    assert stretched.positions.distribution == "uniform"


def test_the_64k_recipe_trains_under_dca_to_64k():
    recipe = load_recipe(RECIPES[[p.name for p in RECIPES].index("smollm2-135m-64k.yaml")])
    assert (recipe.model, recipe.patch, recipe.target_len) == ("default", "dca", 65536)
    assert recipe.data.files == [] and recipe.data.eval_files == []  # the plays' train split; the romances held apart


def test_positions_shorthand_in_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\npositions: stretched\n", encoding="utf-8")
    recipe = load_recipe(path)
    assert recipe.positions.scheme == "stretched" and recipe.positions.chunks == 2


def test_override_values_are_yaml():
    assert parse_override("optim.lr=2e-4") == ("optim.lr", 2e-4)  # YAML 1.1 would read "2e-4" as a string
    assert parse_override("resume=true") == ("resume", True)
    assert parse_override("data.files=[a.txt, b.txt]") == ("data.files", ["a.txt", "b.txt"])
    assert parse_override("patch=logn+window") == ("patch", "logn+window")


def test_dotted_overrides_reach_free_form_patch_params():
    recipe = load_recipe(None, ["output_dir=x", "patch_params.yarn.factor=8", "patch_params.full_layers=2"])
    assert recipe.patch_params == {"yarn": {"factor": 8}, "full_layers": 2}


# every knob's default, written out here (not read from KNOBS): a recipe that names nothing gets these
DEFAULTS = {
    "model": "default", "tokenizer": None, "trust_remote_code": False, "model_dtype": "float32",
    "patch": "yarn", "patch_params": {}, "backend": "blockwise", "output_dir": "x", "seed": 0,
    "resume": False, "overwrite": False, "seq_len": 2048, "target_len": 32768,
    "positions.scheme": "pose", "positions.chunks": 2, "positions.distribution": "uniform",
    "data.files": [], "data.eval_files": [], "data.holdout": 0.0, "data.val_sequences": 2,
    "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "trainable.patch_params": True, "trainable.embeddings": False, "trainable.norms": False,
    "optim.lr": 2e-4, "optim.weight_decay": 0.0, "optim.betas": [0.9, 0.999], "optim.schedule": "cosine",
    "optim.warmup_steps": 0, "optim.max_grad_norm": 1.0, "global_batch": 1, "micro_batch": 1, "max_steps": 100,
    "gradient_checkpointing": True, "precision": "auto", "device": "auto", "checkpoint_every": 50,
    "keep_checkpoints": 2, "eval_every": 50, "log_every": 1, "progress": True,
}


def test_defaults_are_the_documented_ones_for_every_knob():
    recipe = load_recipe(None, ["output_dir=x"]).to_dict()
    assert set(KNOBS) == set(DEFAULTS)  # a new knob gets its expected default here
    for dotted, expected in DEFAULTS.items():
        node = recipe
        for part in dotted.split("."):
            node = node[part]
        assert node == expected, dotted


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,closest",
    [
        ("lora.rank=4", "lora.r"),
        ("lr=1e-3", "optim.lr"),
        ("max_step=3", "max_steps"),
        ("seq_length=64", "seq_len"),
        ("positions.schem=pose", "positions.scheme"),
        ("scheme=pose", "positions.scheme"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(override, closest):
    with pytest.raises(RecipeError, match=f"unknown recipe key '{override.split('=')[0]}'. Did you mean '{closest}'"):
        load_recipe(None, ["output_dir=x", override])


def test_unknown_key_in_the_file_names_the_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\nlora:\n  alpah: 4\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="'lora.alpah'. Did you mean 'lora.alpha'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "override,accepts",
    [
        ("lora.r=abc", "'lora.r' must be an integer >= 1; got 'abc'"),
        ("lora.r=0", "'lora.r' must be an integer >= 1; got 0"),
        ("lora.dropout=1.5", r"'lora.dropout' must be a number in \[0, 1\]; got 1.5"),
        (
            "positions.scheme=poes",
            "'positions.scheme' must be one of contiguous, pose, randomized, stretched; got 'poes'",
        ),
        ("positions=poes", "'positions.scheme' must be one of contiguous, pose, randomized, stretched; got 'poes'"),
        ("positions.distribution=gauss", "'positions.distribution' must be one of uniform, log_uniform; got 'gauss'"),
        ("data.holdout=1.5", r"'data.holdout' must be a number in \[0, 1\]; got 1.5"),
        ("data.eval_files=a.txt", "'data.eval_files' must be a list of strings"),
        ("resume=yes please", "'resume' must be true or false"),
        ("optim.lr=-1", "'optim.lr' must be a finite number > 0; got -1"),
        ("lora.target_modules=q_proj", "'lora.target_modules' must be a non-empty list of strings"),
        ("precision=fp8", "'precision' must be one of auto, fp32, bf16, fp16"),
        ("max_steps=2.5", "'max_steps' must be an integer >= 1; got 2.5"),
    ],
)
def test_wrong_type_or_range_names_the_key_and_what_it_accepts(override, accepts):
    with pytest.raises(RecipeError, match=accepts):
        load_recipe(None, ["output_dir=x", override])


def test_a_section_set_to_a_value_is_refused():
    with pytest.raises(RecipeError, match="'lora' is a section, not a value: set its keys .*lora.r"):
        load_recipe(None, ["output_dir=x", "lora=3"])


def test_missing_recipe_file():
    with pytest.raises(RecipeNotFoundError, match="recipe file 'nope/missing.yaml' does not exist"):
        load_recipe("nope/missing.yaml")


def test_invalid_yaml_says_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\nlora:\n  r: [1, 2\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"is not valid YAML at line \d+, column \d+"):
        load_recipe(path)


def test_a_recipe_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="must be a YAML mapping of keys to values, not a list"):
        load_recipe(path)


def test_malformed_override():
    with pytest.raises(RecipeError, match="override 'lora.r' must look like key=value"):
        load_recipe(None, ["output_dir=x", "lora.r"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["seq_len=64", "target_len=32"], "seq_len=64 is larger than target_len=32"),
        (["global_batch=3", "micro_batch=2"], "global_batch=3 must be a multiple of micro_batch=2"),
        (["resume=true", "overwrite=true"], "resume=true and overwrite=true contradict each other"),
        (["positions.chunks=9", "seq_len=8", "target_len=64"], "positions.chunks=9 must be <= seq_len=8"),
        (["data.eval_files=[b.txt]", "data.holdout=0.2"], "data.eval_files and data.holdout both choose"),
    ],
)
def test_knobs_checked_together(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, ["output_dir=x", *overrides])


def test_output_dir_is_required():
    with pytest.raises(RecipeError, match="'output_dir' is required"):
        load_recipe(None, [])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["patch=yarnn"], "patch='yarnn' is refused: unknown method 'yarnn'. Did you mean 'yarn'"),
        (["patch=window+bca"], None),  # refused only once layers are known: see test_finetune.py
        (["patch_params.yarn.fctor=3"], "patch_params.yarn: yarn.. got unknown parameter.s. fctor; it takes .*factor"),
        (["patch_params.windw={window: 3}"], "patch_params.windw: unknown method 'windw'. Did you mean 'window'"),
        (["patch=yarn", "patch_params.window_size=3"], "patch_params: parameter.s. window_size not taken by yarn"),
        (["patch_params.yarn=4"], "patch_params.yarn must map yarn's parameter names to values"),
    ],
)
def test_a_patch_spec_the_engine_refuses_is_caught_before_loading(overrides, message):
    recipe = load_recipe(None, ["output_dir=x", *overrides])
    if message is None:
        patch_arguments(recipe)
        return
    with pytest.raises(RecipeError, match=message):
        patch_arguments(recipe)


def test_patch_params_of_methods_not_in_the_spec_are_ignored():
    recipe = load_recipe(None, ["output_dir=x", "patch=selfextend", "patch_params.yarn.factor=4"])
    methods, kwargs = patch_arguments(recipe)
    assert [m.name for m in methods] == ["selfextend"] and kwargs == {}
    recipe = load_recipe(None, ["output_dir=x", "patch=yarn+logn", "patch_params.yarn.factor=4"])
    methods, _ = patch_arguments(recipe)
    assert methods[0].values == {"factor": 4}


def test_gpu_only_settings_on_cpu_are_refused():
    recipe = load_recipe(None, ["output_dir=x", "device=cpu", "precision=fp16"])
    with pytest.raises(RecipeError, match="precision=fp16 needs a CUDA GPU.*on CPU use precision=fp32 or bf16"):
        resolve_precision(recipe, resolve_device(recipe))
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="device=cuda but no CUDA GPU is visible"):
            resolve_device(load_recipe(None, ["output_dir=x", "device=cuda"]))
        assert resolve_precision(load_recipe(None, ["output_dir=x"]), "cpu") == "no"  # auto: fp32 on CPU


def test_global_batch_must_split_over_processes():
    recipe = load_recipe(None, ["output_dir=x", "global_batch=6", "micro_batch=2"])
    assert accumulation_steps(recipe, 1) == 3
    with pytest.raises(RecipeError, match="global_batch=6 is not a multiple of micro_batch x processes = 2 x 2"):
        accumulation_steps(recipe, 2)


def test_lengths_read_as_the_command_line_reads_them():
    recipe = load_recipe(None, ["output_dir=x", "target_len=4k", "seq_len=1.5k"])
    assert (recipe.target_len, recipe.seq_len) == (4096, 1536)
    with pytest.raises(RecipeError, match="'target_len' must be an integer >= 2; got 'lots'"):
        load_recipe(None, ["output_dir=x", "target_len=lots"])


def test_a_command_line_patch_beats_the_files_patch_params():
    path = RECIPES[0].parent / "smollm2-135m-32k.yaml"  # patch: yarn, patch_params.yarn.factor: 4.0
    methods, _ = patch_arguments(load_recipe(path, ["patch=yarn[factor=8]"]))
    assert [(m.name, m.values) for m in methods] == [("yarn", {"factor": 8})]


def test_command_line_patch_params_beat_the_files_brackets(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: x\npatch: 'yarn[factor=4]+logn'\n", encoding="utf-8")
    recipe = load_recipe(path, ["patch_params.yarn.factor=8"])
    methods, _ = patch_arguments(recipe)
    assert [(m.name, m.values) for m in methods] == [("yarn", {"factor": 8}), ("logn", {})]
    with pytest.raises(RecipeError, match="set both in patch .a bracket. and in patch_params.yarn"):
        patch_arguments(load_recipe(None, ["output_dir=x", "patch=yarn[factor=4]", "patch_params.yarn.factor=8"]))
