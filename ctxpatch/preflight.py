"""What can be checked before a model loads: that a model name names something loadable, and that a
spec's plan fits the model's config (layer indices, parameters whose defaults come from the model).

Loading a real model takes from seconds to minutes; a typo should cost neither. Every failure is a
`ModelPathError` or another `UserInputError` whose message says what to give instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelPathError
from .registry import Method, ModelInfo

CHATGLM_PREFIX = "chatglm:"
CONFIG = "config.json"
RUN_RECORD = "ctxpatch.json"
WHAT_TO_GIVE = "give 'default', a model folder (holding config.json), a .gguf file, a ctxpatch run folder or a hub name"


def check_model(name: str) -> None:
    """Refuse a model name that cannot load: a missing path, a folder without config.json, ..."""
    if not isinstance(name, str) or not name.strip():
        raise ModelPathError(f"no model given: {WHAT_TO_GIVE}")
    if name == "default":
        from .loading.assets import default_gguf

        try:
            default_gguf()
        except FileNotFoundError as error:
            raise ModelPathError(f"the default model is not installed ({error})") from None
        return
    if name.startswith(CHATGLM_PREFIX):
        check_chatglm_folder(name[len(CHATGLM_PREFIX) :])
        return
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path, name)
    elif path.is_file():
        if not name.endswith(".gguf"):
            raise ModelPathError(f"model {name!r} is a file but not a .gguf file: {WHAT_TO_GIVE}")
    elif looks_like_a_path(name):
        raise ModelPathError(f"model {name!r} does not exist: {WHAT_TO_GIVE}")
    else:
        check_hub_name(name)


def check_model_folder(path: Path, name: str) -> None:
    if (path / CONFIG).is_file() or (path / RUN_RECORD).is_file():
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise ModelPathError(f"{name!r} holds {ggufs[0]} but no {CONFIG}: name the .gguf file itself as the model")
    raise ModelPathError(
        f"no {CONFIG} in {name!r}: name a folder holding a transformers model (config.json and weights), "
        "a .gguf file, or a ctxpatch run folder"
    )


def check_chatglm_folder(folder: str) -> None:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelPathError(
            f"ChatGLM folder {folder!r} does not exist: give model=chatglm:FOLDER, FOLDER holding a ChatGLM2/3 "
            "checkpoint (config.json and weights)"
        )
    if not (path / CONFIG).is_file():
        raise ModelPathError(f"no {CONFIG} in the ChatGLM folder {folder!r}: point chatglm: at the checkpoint folder")


def check_tokenizer(name: str | None) -> None:
    """A tokenizer given as a path must exist (a hub name is left to transformers)."""
    if name and looks_like_a_path(name) and not Path(name).expanduser().exists():
        raise ModelPathError(f"tokenizer {name!r} does not exist: give a tokenizer folder or a hub name, or null")


def looks_like_a_path(name: str) -> bool:
    """./x, /x, ~/x, x.gguf, a/b/c, a\\b, or a/b whose first part is a local folder: not a hub name."""
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def check_hub_name(name: str) -> None:
    """A hub name must be in the local cache when the hub is offline (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = isinstance(try_to_load_from_cache(name, CONFIG), str)
    except HFValidationError:
        raise ModelPathError(f"model {name!r} is neither a local path nor a hub name: {WHAT_TO_GIVE}") from None
    if not cached and constants.HF_HUB_OFFLINE:
        raise ModelPathError(
            f"model {name!r} is neither a local path nor in the Hugging Face cache, and the hub is offline "
            f"(HF_HUB_OFFLINE): {WHAT_TO_GIVE}"
        )


# ---- a spec's plan against a model's config ----------------------------------------------------------


def model_config(name: str) -> Any | None:
    """The transformers config of a model name (None for a ChatGLM folder, whose config is its own)."""
    from transformers import AutoConfig

    from .loading.base import resolve_model

    if name.startswith(CHATGLM_PREFIX):
        return None
    source, extra = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelPathError(f"cannot read the config of model {name!r} ({first}): {WHAT_TO_GIVE}") from None


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` a config (a transformers config, or a ChatGLM config.json as a dict) sets."""
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


def info_from_config(config: Any, train_len: int | None = None) -> ModelInfo | None:
    """The `ModelInfo` an adapter would find, read off the config (no weights); None when the config does not
    say (a layout only the loaded model tells: the adapter judges it then). A ChatGLM config.json (a dict)
    is read when the caller knows `train_len`."""
    from .adapters.base import train_len as config_train_len

    from .adapters.families import check_config

    if not isinstance(config, dict):
        check_config(config)  # a family ctxpatch cannot reproduce: said before anything loads

    def get(*names: str) -> Any:
        return config_value(config, *names)

    heads, layers, hidden = get("num_attention_heads"), get("num_hidden_layers", "num_layers"), get("hidden_size")
    if config is None or not all(isinstance(v, int) for v in (heads, layers, hidden)):
        return None
    if train_len is None:
        if isinstance(config, dict) or not isinstance(get("max_position_embeddings"), int):
            return None
        train_len = config_train_len(config)
    head_dim = get("head_dim", "kv_channels") or hidden // heads
    rope = get("rope_parameters") or {}
    half = isinstance(config, dict)  # ChatGLM2/3 rotate half of each head
    factor = get("partial_rotary_factor") or rope.get("partial_rotary_factor") or (0.5 if half else 1.0)
    return ModelInfo(
        train_len=train_len,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", "multi_query_group_num") or heads,
        head_dim=head_dim,
        rotary_dim=2 * (int(head_dim * factor) // 2),
    )


def check_plan(methods: list[Method], params: dict[str, Any], info: ModelInfo | None) -> None:
    """Plan the spec on a model of this shape: every refusal `apply` would raise, raised now."""
    from .compose import build_plan

    if info is not None:
        build_plan(methods, dict(params), info)
