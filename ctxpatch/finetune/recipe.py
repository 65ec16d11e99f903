"""Fine-tune recipes: the schema, YAML loading, dotted `key=value` overrides and validation.

A recipe is a YAML mapping (see `recipes/`). Every knob has a default, a check and a one-line
description here; loading a recipe checks every key and value before anything else happens:

  * an unknown key is a `RecipeError` naming the closest valid key ("did you mean 'lora.r'?");
  * a value of the wrong type or out of range names the key and what it accepts;
  * knobs that constrain each other (seq_len <= target_len, batch sizes, resume vs overwrite)
    are checked together.

Overrides are `key=value` strings with dotted keys (`lora.r=16`, `patch_params.yarn.factor=8`);
values are parsed as YAML (`true`, `16`, `2e-4`, `[a.txt, b.txt]`).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserInputError
from ..lengths import parse_length
from ..dtypes import DTYPE_CHOICES as DTYPES
from ..registry import positive_number  # one validator for method parameters and recipe knobs

Check = Callable[[Any], "str | None"]  # what the value should be when it is wrong, else None

SCHEMES = ("contiguous", "pose", "randomized", "stretched")
STRETCH_DISTRIBUTIONS = ("uniform", "log_uniform")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
BACKENDS = ("blockwise", "dense", "flex")


class RecipeError(UserInputError, ValueError):
    """A recipe (or an override) that cannot be run as written; the message says what to change."""


class RecipeNotFoundError(RecipeError, FileNotFoundError):
    """The recipe file does not exist."""


# ---- value checks ------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(minimum: int) -> Check:
    return lambda v: None if _is_int(v) and v >= minimum else f"an integer >= {minimum}"


def number_between(low: float, high: float, *, low_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = _is_number(v) and (v > low if low_open else v >= low) and v <= high
        return None if ok else f"a number in {'(' if low_open else '['}{low}, {high}]"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def non_empty_string(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "a non-empty string"


def optional_string(v: Any) -> str | None:
    return None if v is None or (isinstance(v, str) and v.strip()) else "a non-empty string, or null"


def string_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(isinstance(s, str) and s for s in v) else "a list of strings"


def non_empty_string_list(v: Any) -> str | None:
    return None if string_list(v) is None and v else "a non-empty list of strings"


def mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) and all(isinstance(k, str) for k in v) else "a mapping of names to values"


def tokens(v: Any) -> Any:
    """A length as the CLI reads it ("4k" -> 4096); a value that is not one is left to the check to refuse."""
    if isinstance(v, str):
        try:
            return parse_length(v)
        except UserInputError:
            return v
    return v


def betas_pair(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
    return None if ok else "a list of two numbers in [0, 1), e.g. [0.9, 0.999]"


@dataclass(frozen=True)
class Knob:
    """One recipe key: its default, its check and what it does."""

    default: Any
    check: Check
    doc: str
    free_form: bool = False  # a mapping whose inner keys are not part of the schema (patch_params)
    read: Callable[[Any], Any] | None = None  # what the value means, before the check ("4k" -> 4096)


# ---- the schema: every key a recipe may hold ----------------------------------------------------

SCHEMA: dict[str, Any] = {
    "model": Knob(
        "default", non_empty_string, "'default' (SmolLM2-135M), a folder, a .gguf file, a hub name, or chatglm:PATH"
    ),
    "tokenizer": Knob(None, optional_string, "tokenizer folder or hub name; null = the model's own"),
    "trust_remote_code": Knob(False, boolean, "let the tokenizer folder's own code run (ChatGLM's tokenizer needs it)"),
    "model_dtype": Knob(
        "float32", one_of(*DTYPES), "dtype the base weights are loaded in (auto: the checkpoint's own)"
    ),
    "patch": Knob(
        "yarn", non_empty_string,
        "the ctxpatch spec trained under, e.g. 'yarn', 'yarn[factor=4]', 'logn+window' or a .json spec file",
    ),
    "patch_params": Knob(
        {}, mapping, "per-method parameters keyed by method name; other keys go to ctxpatch.apply", True
    ),
    "backend": Knob("blockwise", one_of(*BACKENDS), "ctxpatch attention backend"),
    "output_dir": Knob(None, non_empty_string, "where the adapter, checkpoints and metrics go (required)"),
    "seed": Knob(0, int_at_least(0), "seed of data order, positions, LoRA init and dropout"),
    "resume": Knob(False, boolean, "continue from the last checkpoint in output_dir"),
    "overwrite": Knob(False, boolean, "delete an existing run in output_dir and start again"),
    "seq_len": Knob(2048, int_at_least(2), "tokens per training sample (e.g. 2048 or 2k)", read=tokens),
    "target_len": Knob(
        32768, int_at_least(2), "positions the samples cover: every position id is < target_len (e.g. 32k)",
        read=tokens,
    ),
    "positions": {
        "scheme": Knob("pose", one_of(*SCHEMES), "contiguous | pose | randomized | stretched position ids"),
        "chunks": Knob(2, int_at_least(1), "pose: contiguous chunks per sample, separated by random skips"),
        "distribution": Knob(
            "uniform",
            one_of(*STRETCH_DISTRIBUTIONS),
            "stretched: how the span n of a sample is drawn from [seq_len - 1, target_len - 1]",
        ),
    },
    "data": {
        "files": Knob(
            [], string_list, "local text files, one document each; [] = the 'train' split of Shakespeare's plays"
        ),
        "eval_files": Knob(
            [],
            string_list,
            "files held apart for evaluation, never trained on; [] = by data.holdout (default plays: the held-out split)",
        ),
        "holdout": Knob(
            0.0,
            number_between(0, 1),
            "share of data.files (by file: the last ceil(share x n)) held apart for evaluation",
        ),
        "val_sequences": Knob(
            2, int_at_least(1), "seq_len-token sequences held apart (end of the text) for validation"
        ),
    },
    "lora": {
        "r": Knob(8, int_at_least(1), "LoRA rank"),
        "alpha": Knob(16, positive_number, "LoRA alpha (scale = alpha / r)"),
        "dropout": Knob(0.0, number_between(0, 1, low_open=False), "dropout on the LoRA input"),
        "target_modules": Knob(
            ["q_proj", "k_proj", "v_proj", "o_proj"], non_empty_string_list, "module names LoRA wraps"
        ),
    },
    "trainable": {
        "patch_params": Knob(True, boolean, "train the patch's own parameters (KERPLE's r1, r2) when it has any"),
        "embeddings": Knob(False, boolean, "train the input embeddings (tied output head follows)"),
        "norms": Knob(False, boolean, "train every normalisation layer's weights"),
    },
    "optim": {
        "lr": Knob(2e-4, positive_number, "peak learning rate (AdamW)"),
        "weight_decay": Knob(0.0, number_between(0, 1), "AdamW weight decay"),
        "betas": Knob([0.9, 0.999], betas_pair, "AdamW betas"),
        "schedule": Knob("cosine", one_of(*SCHEDULES), "learning-rate schedule (transformers.get_scheduler)"),
        "warmup_steps": Knob(0, int_at_least(0), "linear warm-up steps"),
        "max_grad_norm": Knob(1.0, positive_number, "gradient clipping norm"),
    },
    "global_batch": Knob(1, int_at_least(1), "sequences per optimizer step, over all processes"),
    "micro_batch": Knob(1, int_at_least(1), "sequences per forward pass per process; accumulation makes up the rest"),
    "max_steps": Knob(100, int_at_least(1), "optimizer steps"),
    "gradient_checkpointing": Knob(True, boolean, "recompute activations in backward (less memory, slower)"),
    "precision": Knob("auto", one_of(*PRECISIONS), "auto = bf16 on a CUDA GPU that has it, else fp32"),
    "device": Knob("auto", one_of(*DEVICES), "auto = CUDA when visible, else CPU"),
    "checkpoint_every": Knob(50, int_at_least(1), "write a checkpoint every this many steps"),
    "keep_checkpoints": Knob(2, int_at_least(1), "how many of the latest checkpoints to keep"),
    "eval_every": Knob(50, int_at_least(1), "validation loss every this many steps (and at the end)"),
    "log_every": Knob(1, int_at_least(1), "write a metrics line every this many steps"),
    "progress": Knob(True, boolean, "show a progress bar (loss, tokens/s, ETA)"),
}

# keys that may differ between a run and its resumption; any other difference is refused
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "max_steps", "checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "progress"}
)


def _flatten(schema: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Knob]]:
    for key, value in schema.items():
        if isinstance(value, Knob):
            yield prefix + key, value
        else:
            yield from _flatten(value, f"{prefix}{key}.")


KNOBS: dict[str, Knob] = dict(_flatten(SCHEMA))


def defaults() -> dict[str, Any]:
    """The nested recipe every key of which is its default."""
    out: dict[str, Any] = {}
    for dotted, knob in KNOBS.items():
        _set_dotted(out, dotted, copy.deepcopy(knob.default))
    return out


# ---- YAML with floats such as 2e-4 (YAML 1.1 reads them as strings) ---------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(f"{where} is not valid YAML{at}: {problem}") from None


# ---- loading, overrides, validation --------------------------------------------------------------


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in Path("recipes").glob("*.yaml")) if Path("recipes").is_dir() else []
        hint = f" Recipes in ./recipes: {', '.join(shipped)}." if shipped else ""
        raise RecipeNotFoundError(f"recipe file {str(path)!r} does not exist.{hint}")
    data = parse_yaml(path.read_text(encoding="utf-8"), f"recipe {str(path)!r}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a YAML mapping of keys to values, not a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`lora.r=16` -> ("lora.r", 16)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r} must look like key=value, with dotted keys for sections (lora.r=16)")
    value = parse_yaml(raw, f"the value of override {key!r}") if raw.strip() else ""
    return key, value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set {dotted!r}: {'.'.join(parents[: i + 1])!r} is a value, not a section")
        node = child
    node[last] = value


# a section that may be given as one value: that value sets this key of it (`positions=stretched`)
SHORTHANDS = {"positions": "scheme"}


def expand_shorthands(tree: dict[str, Any]) -> dict[str, Any]:
    """`positions: stretched` -> `positions: {scheme: stretched}`."""
    out = dict(tree)
    for section, key in SHORTHANDS.items():
        if section in out and not isinstance(out[section], dict):
            out[section] = {key: out[section]}
    return out


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        if key in SHORTHANDS and not isinstance(value, dict):
            key = f"{key}.{SHORTHANDS[key]}"
        root = key.split(".")[0]
        _check_key(root if root in _free_form_roots() else key, SCHEMA)  # free-form: only the root is schema
        _set_dotted(out, key, value)
    return out


def _free_form_roots() -> set[str]:
    return {dotted for dotted, knob in KNOBS.items() if knob.free_form}


def closest_key(key: str) -> str | None:
    """The valid dotted key nearest to `key`: one with the same last part, else the closest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, str] = {}
    for dotted in KNOBS:
        by_leaf.setdefault(dotted.rsplit(".", 1)[-1], dotted)
    if leaf in by_leaf and by_leaf[leaf] != key:
        return by_leaf[leaf]
    sections = sorted({dotted.rsplit(".", 1)[0] for dotted in KNOBS if "." in dotted})
    match = difflib.get_close_matches(key, list(KNOBS) + sections, n=1, cutoff=0.6)
    if match:
        return match[0]
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    return by_leaf[match[0]] if match else None


def _check_key(dotted: str, schema: dict[str, Any]) -> None:
    node: Any = schema
    for depth, part in enumerate(dotted.split(".")):
        if isinstance(node, Knob):
            raise RecipeError(
                f"{'.'.join(dotted.split('.')[:depth])!r} is a value, not a section: {dotted!r} is not a key"
            )
        if part not in node:
            hint = closest_key(dotted)
            did_you_mean = f" Did you mean {hint!r}?" if hint else ""
            raise RecipeError(f"unknown recipe key {dotted!r}.{did_you_mean} Valid keys: {', '.join(KNOBS)}.")
        node = node[part]


def _walk(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        dotted = prefix + str(key)
        knob = KNOBS.get(dotted)
        if isinstance(value, dict) and knob is None:
            yield from _walk(value, dotted + ".")
        else:
            yield dotted, value


def validate(tree: dict[str, Any]) -> dict[str, Any]:
    """The full recipe (defaults filled in) after checking every key and value."""
    for dotted, _ in _walk(tree):
        _check_key(dotted, SCHEMA)
    merged = defaults()
    for dotted, value in _walk(tree):
        knob = KNOBS.get(dotted)
        if knob is None:
            inner = ", ".join(k for k in KNOBS if k.startswith(dotted + "."))
            raise RecipeError(f"recipe key {dotted!r} is a section, not a value: set its keys ({inner})")
        value = knob.read(value) if knob.read is not None else value
        problem = knob.check(value)
        if problem:
            problem = problem if problem.startswith("must be") else f"must be {problem}"  # registry's checks say it
            raise RecipeError(f"recipe key {dotted!r} {problem}; got {value!r}")
        _set_dotted(merged, dotted, value)
    _check_together(merged)
    return merged


def _check_together(r: dict[str, Any]) -> None:
    if not r["output_dir"]:
        raise RecipeError(
            "recipe key 'output_dir' is required: where the adapter and checkpoints go (output_dir=runs/x)"
        )
    if r["seq_len"] > r["target_len"]:
        raise RecipeError(
            f"seq_len={r['seq_len']} is larger than target_len={r['target_len']}: every position id must be "
            "< target_len, so target_len must be >= seq_len"
        )
    if r["positions"]["scheme"] == "pose" and r["positions"]["chunks"] > r["seq_len"]:
        raise RecipeError(f"positions.chunks={r['positions']['chunks']} must be <= seq_len={r['seq_len']}")
    if r["data"]["eval_files"] and r["data"]["holdout"]:
        raise RecipeError("data.eval_files and data.holdout both choose the held-apart text: give one of them")
    if r["global_batch"] % r["micro_batch"]:
        raise RecipeError(
            f"global_batch={r['global_batch']} must be a multiple of micro_batch={r['micro_batch']} "
            "(global_batch = micro_batch x processes x accumulation steps)"
        )
    if r["resume"] and r["overwrite"]:
        raise RecipeError("resume=true and overwrite=true contradict each other: pick one")
    for name, params in r["patch_params"].items():
        if isinstance(params, dict) and not all(isinstance(k, str) for k in params):
            raise RecipeError(f"patch_params.{name} must map parameter names to values")


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; `path=None` starts from the defaults."""
    tree = expand_shorthands(read_recipe_file(path)) if path is not None else {}
    for dotted, _ in _walk(tree):
        _check_key(dotted, SCHEMA)
    return Recipe(validate(command_line_wins(apply_overrides(tree, list(overrides)), list(overrides))))


def _set_in_brackets(patch: Any) -> dict[str, set[str]]:
    """{method: parameters its bracket in `patch` sets}; {} for a spec that does not parse (refused later)."""
    from ..spec import parse_spec

    try:
        parsed = parse_spec(patch)
    except (UserInputError, TypeError, ValueError):
        return {}
    return {m.name: set(m.values) | ({"layers"} if m.layers is not None else set()) for m in parsed.methods}


def command_line_wins(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`tree` (the file with the overrides applied) where a method parameter set both in the file and on the
    command line, once in `patch`'s brackets and once in `patch_params.<method>`, keeps the command line's value
    only: `patch=yarn[factor=8]` beats the file's `patch_params.yarn.factor`, and `patch_params.yarn.factor=8`
    beats the file's `patch: yarn[factor=4]`."""
    keys = [parse_override(o)[0] for o in overrides]
    params = tree.get("patch_params")
    if not isinstance(params, dict):
        return tree

    def from_command_line(method: str, name: str) -> bool:
        return any(k in ("patch_params", f"patch_params.{method}", f"patch_params.{method}.{name}") for k in keys)

    out = copy.deepcopy(tree)
    in_brackets = _set_in_brackets(tree.get("patch"))
    if "patch" in keys:  # the file's patch_params give way to the command line's brackets
        for method, names in in_brackets.items():
            given = out["patch_params"].get(method)
            if isinstance(given, dict):
                for name in names & set(given):
                    if not from_command_line(method, name):
                        del given[name]
        return out
    dropped = {m: {n for n in names if from_command_line(m, n) and isinstance(params.get(m), dict)
                   and n in params[m]} for m, names in in_brackets.items()}
    if any(dropped.values()):  # the file's brackets give way to the command line's patch_params
        out["patch"] = _without(tree["patch"], dropped)
    return out


def _without(patch: str, dropped: dict[str, set[str]]) -> str:
    """`patch` rewritten with the bracket parameters `dropped` names left out."""
    from ..spec import describe, parse_spec

    methods = []
    for m in parse_spec(patch).methods:
        names = dropped.get(m.name, set())
        values = {k: v for k, v in m.values.items() if k not in names}
        methods.append(type(m)(layers=None if "layers" in names else m.layers, **values))
    return describe(methods)


def patch_arguments(recipe: Recipe) -> tuple[list, dict[str, Any]]:
    """(method objects, keyword arguments for ctxpatch.apply) from `patch` and `patch_params`.

    `patch` is any spec `ctxpatch.parse_spec` reads (brackets set their own method's parameters). A
    `patch_params` key naming a registered method holds that method's parameters (used when the method is
    in `patch`, ignored otherwise; a parameter set both there and in a bracket is refused); any other key
    goes to `ctxpatch.apply` itself, for every method taking it.
    """
    from ..compose import distribute
    from ..registry import method_class, methods
    from ..spec import parse_spec

    try:
        parsed = parse_spec(recipe.patch)
    except UserInputError as error:
        raise RecipeError(f"patch={recipe.patch!r} is refused: {error}") from None
    per_method, apply_kwargs = {}, {}
    for key, value in recipe.patch_params.items():
        if key in {m.name for m in methods()}:
            if not isinstance(value, dict):
                raise RecipeError(f"patch_params.{key} must map {key}'s parameter names to values, not {value!r}")
            per_method[key] = value
        elif isinstance(value, dict):
            try:
                method_class(key)
            except UserInputError as error:
                raise RecipeError(f"patch_params.{key}: {error}") from None
        else:
            apply_kwargs[key] = value
    methods = [with_recipe_params(m, per_method.get(m.name, {})) for m in parsed.methods]
    try:
        distribute(methods, dict(apply_kwargs))
    except UserInputError as error:
        raise RecipeError(f"patch_params: {error}") from None
    return methods, apply_kwargs


def with_recipe_params(method: Any, params: dict[str, Any]) -> Any:
    """`method` with `patch_params.<name>` added; a value its bracket in `patch` also sets is refused."""
    params = dict(params)
    layers = params.pop("layers", None)
    twice = sorted(set(params) & set(method.values)) + (["layers"] if layers is not None and method.layers else [])
    if twice:
        raise RecipeError(
            f"{method.name}'s {', '.join(twice)} is set both in patch (a bracket) and in patch_params.{method.name}: "
            "set it in one place"
        )
    try:
        return type(method)(layers=method.layers if method.layers is not None else layers, **method.values, **params)
    except UserInputError as error:
        raise RecipeError(f"patch_params.{method.name}: {error}") from None


class Recipe:
    """A validated recipe with attribute access: `recipe.lora.r`, `recipe["lora"]["r"]`."""

    def __init__(self, tree: dict[str, Any]):
        self._tree = tree

    def __getattr__(self, name: str) -> Any:
        tree = self.__dict__.get("_tree", {})
        if name not in tree:
            raise AttributeError(name)
        value = tree[name]
        return Recipe(value) if isinstance(value, dict) and name not in _free_form_roots() else value

    def __getitem__(self, name: str) -> Any:
        return self._tree[name]

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._tree)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Dotted keys whose values differ from `other` (a recipe as a dict)."""
        mine, theirs = dict(_walk(self._tree)), dict(_walk(other))
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))

    def to_yaml(self, header: str = "") -> str:
        return header + yaml.safe_dump(self._tree, sort_keys=False, default_flow_style=None)

    def __repr__(self) -> str:
        return f"Recipe({self._tree!r})"
