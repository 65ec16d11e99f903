"""Fine-tune runs and merged models: `ctxpatch.load`, `ctxpatch.merge`.

A fine-tune run's `output_dir` (and each of its checkpoints) holds a peft adapter, `ctxpatch.json` (see
`record`) and, when the patch has trainable tensors (KERPLE's r1, r2), their trained values in
`ctxpatch_parameters.safetensors`. `load(dir)` rebuilds base model + patch + adapter. The adapter's
`base_model_name_or_path` names the base (an absolute folder or a hub id; for a GGUF base, the folder, with the
file in ctxpatch.json's `base_model.gguf_file`), so peft's `AutoPeftModelForCausalLM` loads it too — without
the patch.

`merge(dir, dst)` folds the adapter into the weights and writes a standalone safetensors model with the record
under config.json's `ctxpatch` key (and in a `ctxpatch.json` beside it). A patch that is one rope scaler
transformers knows is written as the config's own `rope_parameters` (see `native`), so any transformers-based
loader computes it; any other patch is only recorded, and `load(dst)` re-applies it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._compat import transformers as hf
from ..errors import UserInputError
from .assets import DEFAULT_MODEL
from .base import (
    display_name,
    fingerprint,
    load_base_model,
    load_base_tokenizer,
    load_model,
    placement,
    resolve_dtype,
)
from .reference import CHATGLM_PREFIX, model_ref
from .native import config_values, native_rope_config
from ..record import (
    ADAPTER_CONFIG,
    CONFIG_KEY,
    CTXPATCH_JSON,
    PATCH_PARAMETERS_FILE,
    REPLACED_CONFIG,
    carries_patch,
    is_native,
    patch_parameter_state,  # noqa: F401  (ctxpatch.loading re-exports it from here)
    read_record,
    relative_name,
    save_patch_parameters,
    write_json,
)


class NotACtxpatchModelError(UserInputError, FileNotFoundError):
    """A path that holds neither a fine-tune run nor a merged ctxpatch model."""


class DestinationExistsError(UserInputError, ValueError):
    """`merge` was asked to write into a folder that already holds files."""


# ---- the patch's own trainable tensors (KERPLE's r1, r2) -----------------------------------------


def load_patch_parameters(model: nn.Module, folder: Path) -> None:
    """Copy saved patch tensors into a patched model (a transformers model or a peft wrapper)."""
    from safetensors.torch import load_file

    file = Path(folder) / PATCH_PARAMETERS_FILE
    if not file.is_file():
        return
    saved = load_file(str(file))
    params = {relative_name(name): param for name, param in model.named_parameters()}
    own = {name for name in params if ".ctxpatch." in f".{name}"}
    if set(saved) != own:
        raise UserInputError(
            f"{file} holds tensors {sorted(saved)[:3]} that do not match the patch's {sorted(own)[:3]}: "
            "the folder was written for another patch or model"
        )
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


# ---- load / merge --------------------------------------------------------------------------------


def recorded_base(base: dict[str, Any]) -> str:
    """The model name to load a run's base by: the absolute folder (or folder/file.gguf) recorded at training
    time, so a run trained on a relative path loads from any working directory; "default", chatglm:PATH and
    runs recorded before ctxpatch wrote `name_or_path` keep the name as the recipe wrote it."""
    name, where = base["model"], base.get("name_or_path")
    if name == DEFAULT_MODEL or name.startswith(CHATGLM_PREFIX) or not where:
        return name
    return str(Path(where) / base["gguf_file"]) if base.get("gguf_file") else where


def _check_fingerprint(record: dict[str, Any], net: nn.Module) -> None:
    base = record.get("base_model", {})
    saved = base.get("fingerprint")
    if not saved or saved.get("kind") == "hub":
        return
    try:
        now = fingerprint(recorded_base(base), net)
    except (OSError, ValueError):
        return
    if now.get("sha256") != saved.get("sha256"):
        warnings.warn(
            f"the base model {base['model']!r} differs from the one this adapter was trained on "
            f"(fingerprint {now.get('sha256', '?')[:12]} vs {saved.get('sha256', '?')[:12]})",
            stacklevel=3,
        )


def apply_record(model: nn.Module, record: dict[str, Any]):
    """Apply the patch a record describes, with its resolved parameters, layers and target length."""
    from ..patch import apply, spec_from_dict

    saved = record["patch"]
    return apply(model, spec_from_dict(saved), backend=saved.get("backend", "blockwise"),
                 target_len=saved.get("target_len"), fine_tuned=True)  # the record names the patch it was trained under


def load(path: str | Path, *, dtype: str | torch.dtype | None = None, merge: bool = False, **model_kwargs: Any):
    """(model, tokenizer) for a fine-tune run or checkpoint folder, or a merged ctxpatch model.

    A run folder gives the base model with the patch it was trained with and the peft adapter on
    top (a `peft.PeftModel`, unmerged, so its logits are those the training computed); `merge=True`
    folds the adapter in and returns the plain transformers model (patched). A merged folder
    (config.json with a `ctxpatch` entry) is loaded with transformers and the patch re-applied (once: a
    natively written rope scaler is put back to the base's rope first). Eval mode either way. `dtype`
    defaults to the dtype the run loaded its base in; `model_kwargs` (device_map, ...) go to from_pretrained.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise NotACtxpatchModelError(f"{str(folder)!r} is not a folder")
    record = read_record(folder)
    if record is None:
        raise NotACtxpatchModelError(
            f"{str(folder)!r} is neither a ctxpatch fine-tune run (ctxpatch.json + a peft adapter) nor a merged "
            "ctxpatch model (config.json with a 'ctxpatch' entry): load a plain model with ctxpatch.load_model"
        )
    dtype = dtype or record.get("base_model", {}).get("dtype", "float32")  # "auto": the checkpoint's own
    if (folder / ADAPTER_CONFIG).is_file():
        model, tokenizer = _load_adapter_run(folder, record, dtype, merge, model_kwargs)
    else:
        model, tokenizer = _load_merged(folder, record, dtype, model_kwargs)
    return model.eval(), tokenizer


def _load_adapter_run(folder: Path, record: dict[str, Any], dtype: str | torch.dtype, merge: bool, model_kwargs: dict):
    """Base model, then the recorded patch, then the peft adapter and the patch's trained tensors."""
    from peft import PeftModel

    base = record["base_model"]
    name = recorded_base(base)
    net = load_base_model(name, dtype, **model_kwargs)
    _check_fingerprint(record, net)
    tokenizer = load_base_tokenizer(name, base.get("tokenizer"), base.get("trust_remote_code", False))
    apply_record(net, record)
    model = PeftModel.from_pretrained(net, str(folder))
    load_patch_parameters(model, folder)
    return (model.merge_and_unload() if merge else model), tokenizer


def _load_merged(folder: Path, record: dict[str, Any], dtype: str | torch.dtype, model_kwargs: dict):
    """A standalone model written by `merge`: transformers loads it (with the base's own rope, if the merge
    wrote the patch natively), the recorded patch goes back on."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(folder))
    for key, value in record.get(REPLACED_CONFIG, {}).items():
        setattr(config, key, value)
    net = AutoModelForCausalLM.from_pretrained(
        str(folder), config=config, dtype=resolve_dtype(dtype, config), **model_kwargs
    )
    remote = record.get("base_model", {}).get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=remote)
    apply_record(net, record)
    load_patch_parameters(net, folder)
    return net, tokenizer


def merge(src: str | Path, dst: str | Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write run `src` as a standalone model in `dst`: adapter merged into the weights (safetensors),
    the record under config.json's `ctxpatch` key and in ctxpatch.json, the tokenizer, and the
    patch's trained tensors. A patch that is one rope scaler transformers knows goes into the config as
    native `rope_parameters` (plain transformers then computes it); `ctxpatch.load(dst)` re-applies the patch."""
    from ..patch import current_patch

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
    native = native_rope_config(patch, model)
    patch.remove()  # the saved weights are the model's own; the patch is re-applied on load
    hf.forget_dequantized_gguf(model)
    if native is not None:
        merged[REPLACED_CONFIG] = config_values(model.config, native)
        for key, value in native.items():
            setattr(model.config, key, value)
    setattr(model.config, CONFIG_KEY, merged)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / CTXPATCH_JSON, merged)
    (tmp / "README.md").write_text(merged_notes(dst, merged), encoding="utf-8")
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return dst


def held_apart_text(name: str) -> list[str] | None:
    """The text files a fine-tune run held apart (`eval_text` in its ctxpatch.json), or None: the default."""
    if not carries_patch(name):
        return None
    return read_record(name).get("eval_text") or None


def check_loadable(name: str) -> None:
    """Refuse, before anything slow, a name that neither `load` (a run or merged folder) nor `load_model` takes."""
    model_ref(name)


def load_for_eval(
    name: str, dtype: str | torch.dtype | None = None, device: str | None = None, device_map: str | None = None
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any model name or a ctxpatch run / merged folder; a run folder comes
    back carrying its patch (and its peft adapter).

    `dtype`: None = float32 on the CPU (what ctxpatch always measured with), the checkpoint's own on a GPU or
    spread by `device_map`; "auto" = the checkpoint's own; a run folder's default is the dtype it was trained
    in. `device` ("cpu", "cuda", "cuda:1") loads the weights straight onto it; `device_map` ("auto") spreads
    them with accelerate."""
    if carries_patch(name):
        model, tokenizer = load(name, dtype=None if dtype in (None, "auto") else dtype, **placement(device, device_map))
    else:
        if dtype is None:
            on_cpu = device_map is None and (device is None or torch.device(device).type == "cpu")
            dtype = "float32" if on_cpu else "auto"
        model, tokenizer = load_model(name, dtype=dtype, device=device, device_map=device_map)
    if device is not None and device_map is None and next(model.parameters()).device != torch.device(device):
        model = model.to(device)  # a loader that does not place weights itself
    return model.eval(), tokenizer


def base_name(name: str) -> str:
    """How reports name the base of a ctxpatch run or merged folder: as its ctxpatch.json names it ("default" is
    the default model's display name), never the folder its files were found in, which differs between machines
    (a resumed measurement is matched by this name)."""
    record = read_record(name)
    if record is None:
        raise NotACtxpatchModelError(f"{name!r} is not a ctxpatch run or merged folder: it has no base model")
    return display_name(record["base_model"]["model"])


def load_base_for_eval(name: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                       device_map: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the base a ctxpatch run or merged folder was made from: unpatched, without its
    adapter, in the dtype the run used unless `dtype` says otherwise (the yardstick of a fine-tune)."""
    record = read_record(name)
    if record is None:
        raise NotACtxpatchModelError(f"{name!r} is not a ctxpatch run or merged folder: it has no base model to load")
    base = record["base_model"]
    return load_for_eval(recorded_base(base), dtype=dtype or base.get("dtype"), device=device, device_map=device_map)


# ---- what other tools read in a run folder -----------------------------------------------------------


def point_adapter_at_base(peft_model: nn.Module, base: dict[str, Any]) -> None:
    """Make the adapter's `base_model_name_or_path` the base's absolute folder or hub id (`base_reference`),
    so that peft's AutoPeftModelForCausalLM finds it from anywhere; called before `save_pretrained`."""
    if base.get("name_or_path"):
        for config in getattr(peft_model, "peft_config", {}).values():
            config.base_model_name_or_path = base["name_or_path"]


def peft_load_line(folder: str | Path, record: dict[str, Any]) -> str:
    """The line that loads a run folder with peft alone (no patch)."""
    gguf = record.get("base_model", {}).get("gguf_file")
    extra = f", gguf_file={gguf!r}" if gguf else ""
    return f"AutoPeftModelForCausalLM.from_pretrained({str(folder)!r}{extra})"


def run_notes(folder: Path, record: dict[str, Any]) -> str:
    """The README.md body of a run folder: how to load it, and what peft alone gives."""
    spec, train_len = record["patch"]["spec"], record.get("train_len")
    return (
        f"# ctxpatch fine-tune under `{spec}`\n\n"
        f"A peft LoRA adapter trained with the ctxpatch patch `{spec}` on its base model (trained length "
        f"{train_len}). The patch is part of the model: load it with ctxpatch.\n\n"
        "```python\nimport ctxpatch\n\n"
        f"model, tokenizer = ctxpatch.load({str(folder)!r})\n```\n\n"
        "**peft alone loads the adapter without the patch**: "
        f"`{peft_load_line(folder, record)}` gives the base model with this adapter and the model's native "
        f"attention and positions, which is not what was trained past {train_len} tokens.\n\n"
        f"`ctxpatch merge {folder} DST` writes a standalone model. If the patch is one rope scaler transformers "
        "knows (linear, ntk, dynamic, yarn, llama3, longrope), DST's config.json holds it as native "
        "`rope_parameters` and any transformers-based loader reproduces it; otherwise load DST with "
        "`ctxpatch.load`.\n"
    )


def write_run_notes(folder: Path, record: dict[str, Any]) -> None:
    """Replace peft's empty model-card template in README.md with `run_notes` (its YAML header is kept)."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    header = ""
    if text.startswith("---\n") and "\n---\n" in text[4:]:
        header = text[: text.index("\n---\n", 4) + 5] + "\n"
    readme.write_text(header + run_notes(folder, record), encoding="utf-8")


def merged_notes(folder: Path, record: dict[str, Any]) -> str:
    """The README.md of a merged folder: which loaders reproduce the patch."""
    spec = record["patch"]["spec"]
    head = f"# Merged ctxpatch fine-tune under `{spec}`\n\nStandalone weights (the LoRA adapter folded in). "
    load = f"```python\nimport ctxpatch\n\nmodel, tokenizer = ctxpatch.load({str(folder)!r})\n```\n"
    if is_native(record):
        return head + (
            f"`{spec}` is written as this config's own `rope_parameters`, so plain transformers "
            "(`AutoModelForCausalLM.from_pretrained`), vLLM and TGI compute it. The length-dependent scalers "
            "(dynamic, longrope) are exact there for a full forward only; under a KV cache ctxpatch keeps each "
            "key at the scaling it was written with:\n\n" + load
        )
    return head + (
        f"**The patch `{spec}` is recorded in config.json (`ctxpatch`) but is not something transformers "
        "computes: `AutoModelForCausalLM.from_pretrained` (and vLLM, TGI) load this model without it.** "
        "Load it with ctxpatch:\n\n" + load
    )
