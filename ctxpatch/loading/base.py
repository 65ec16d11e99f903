"""Base models by name: dtypes, loading, and the name-level helpers over `ModelRef` (`reference.py`, where a
name is read: "default", a model folder, a .gguf file, a run folder, a hub id or `chatglm:PATH`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._compat import transformers as hf
from ..adapters.families import check_config
from ..dtypes import DTYPE_CHOICES, DTYPES, InvalidDtypeError, checkpoint_dtype, resolve_dtype  # noqa: F401
from ..errors import UserInputError
from ..record import is_native, read_record
from .assets import DEFAULT_MODEL, DEFAULT_MODEL_NAME
from .reference import (  # noqa: F401  (the errors: loading's public names)
    ModelNotFoundError,
    ModelRef,
    NotAModelFolderError,
    UnknownTrainedLengthError,
    model_ref,
)


# ---- names ---------------------------------------------------------------------------------------


def resolve_model(name: str | ModelRef) -> tuple[str, dict[str, Any]]:
    """(absolute folder or hub id, extra from_pretrained kwargs) of a model name."""
    return model_ref(name).from_pretrained()


def check_model(name: str | ModelRef) -> ModelRef:
    """Refuse a model name whose weights cannot be loaded as a plain model, before anything slow happens:
    a path that does not exist, a folder without config.json, an adapter run folder."""
    return model_ref(name).base_weights()


def display_name(name: str) -> str:
    """How reports name a model."""
    return DEFAULT_MODEL_NAME if name == DEFAULT_MODEL else name


def base_reference(name: str | ModelRef) -> dict[str, Any]:
    """Where other tools find the base model: `name_or_path` (an absolute folder or a hub id, what peft's
    `base_model_name_or_path` must hold) and `gguf_file` (the file inside that folder, or None)."""
    ref = model_ref(name)
    return {"name_or_path": ref.source, "gguf_file": ref.gguf_file}


def model_config(name: str | ModelRef, gguf_file: str | None = None):
    """The config of a model name (no weights loaded; ChatGLM's config.json as a dict); `gguf_file` overrides
    the name's own."""
    ref = model_ref(name)
    if gguf_file:
        ref = ModelRef(ref.name, ref.kind, ref.source, gguf_file)
    return ref.config()


def base_train_len(name: str | ModelRef, gguf_file: str | None = None) -> int:
    """The length the model was trained on (what ctxpatch's methods call L), read from its config."""
    from .reference import config_train_len

    return config_train_len(model_config(name, gguf_file), str(getattr(name, "name", name)))


# ---- loading -------------------------------------------------------------------------------------


def placement(device: str | torch.device | None, device_map: Any) -> dict[str, Any]:
    """from_pretrained's placement keyword: `device` ("cuda", "cuda:1", "cpu") is a one-device device_map."""
    if device is not None and device_map is not None:
        raise UserInputError("pass device= or device_map=, not both")
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
    ref = check_model(name)
    if ref.is_chatglm:
        from ..chatglm import load_chatglm

        if device_map is not None:
            raise UserInputError("a chatglm: model is read by ctxpatch.load_chatglm: pass device=, not device_map=")
        net = load_chatglm(ref.source, dtype=resolve_dtype(dtype, ref.config()))
        return (net.to(device) if device is not None else net).eval()
    from transformers import AutoModelForCausalLM

    source, extra = ref.from_pretrained()
    _warn_if_patched(source)
    config = ref.config()
    check_config(config)  # a family ctxpatch cannot patch is refused before its weights load
    dtype = resolve_dtype(dtype, config if dtype in (None, "auto") else None)
    net = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **place, **kwargs)
    return net.eval()


def load_base_tokenizer(name: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model name (or the `tokenizer` folder / hub id, when given)."""
    from transformers import AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    ref = model_ref(name)  # a missing folder is that, not a trust_remote_code problem
    if ref.is_chatglm:
        path = ref.source
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as error:  # noqa: BLE001 - say what to do instead
            raise UserInputError(
                f"cannot load the tokenizer of {path!r} ({type(error).__name__}: {error}). Convert the folder with "
                "`ctxpatch convert-chatglm SRC DST` (it writes a fast tokenizer), or set trust_remote_code=true, "
                "or tokenizer=FOLDER naming a transformers tokenizer"
            ) from None
    source, extra = ref.from_pretrained()
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
    ref = model_ref(name)
    if ref.gguf_file:
        gguf = Path(ref.source) / ref.gguf_file
        return {"kind": "sha256", "file": gguf.name, "sha256": _sha256(gguf)}
    folder = Path(ref.source)
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
