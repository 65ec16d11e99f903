"""`ctxpatch.json`: what a fine-tune run, each of its checkpoints, a merged model and a patched model's
`save_pretrained` record about themselves (the patch spec with resolved parameters, the ctxpatch version, the
base model and its fingerprint), and the patch's own tensors beside them.

It sits beneath `patch` (only the standard library, torch and safetensors) so that a patched model's
`save_pretrained` can write the record `ctxpatch.load` reads."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from ._compat import transformers as hf

CTXPATCH_JSON = "ctxpatch.json"
PATCH_PARAMETERS_FILE = "ctxpatch_parameters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CONFIG_KEY = "ctxpatch"  # the key of a merged model's config.json that holds the record
REPLACED_CONFIG = "replaced_config"  # a native merge's record: the base's config values it replaced
FORMAT = 1


def make_record(
    patch, base: dict[str, Any], kind: str, *, train_len: int, has_patch_parameters: bool, training: dict | None = None
) -> dict[str, Any]:
    """What ctxpatch.json holds."""
    from ._version import __version__

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


def carries_patch(name: str | Path) -> bool:
    """True for a folder holding `ctxpatch.json` or a config.json with a `ctxpatch` entry."""
    if not Path(name).is_dir():
        return False
    try:
        return read_record(name) is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not ours to judge: loading it as a plain model says what is wrong


def is_native(record: dict[str, Any] | None) -> bool:
    """True for a merged model whose patch transformers computes by itself (written as native rope_parameters)."""
    return bool(record and record.get(REPLACED_CONFIG))


# ---- the patch's own tensors (KERPLE's r1, r2) -----------------------------------------------------------


def relative_name(name: str) -> str:
    """A parameter name relative to the transformers model (no DDP / peft prefixes)."""
    for prefix in ("module.", "base_model.model."):
        name = name.removeprefix(prefix)
    return name


def patch_parameter_state(state: dict[str, Any]) -> dict[str, Any]:
    """The patch's tensors of a full state dict, named relative to the transformers model (peft's
    `base_model.model.` and DDP's `module.` prefixes removed)."""
    out = {}
    for name, tensor in state.items():
        if ".ctxpatch." in f".{name}":
            out[relative_name(name)] = tensor.detach().to("cpu").contiguous().clone()
    return out


def save_patch_parameters(state: dict[str, Any], folder: Path) -> bool:
    """Write the patch's tensors found in `state`; False when the patch has none."""
    from safetensors.torch import save_file

    tensors = patch_parameter_state(state)
    if not tensors:
        return False
    save_file(tensors, str(folder / PATCH_PARAMETERS_FILE))
    return True


# ---- save_pretrained of a patched model --------------------------------------------------------------------


def record_on_save(model: Any, patch: Any, train_len: int) -> Callable[[], None]:
    """Make this model instance's `save_pretrained` also write ctxpatch.json (and the patch's tensors) and warn
    that plain transformers loads the folder unpatched; returns what undoes it (`Patch.remove`)."""
    plain = model.save_pretrained  # the class's method, bound: the instance attribute shadows it only

    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        out = plain(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        base = {"name_or_path": hf.model_source(model.config) or None, "dtype": dtype}
        has_parameters = save_patch_parameters(model.state_dict(), folder)
        write_json(folder / CTXPATCH_JSON, make_record(patch, base, "merged", train_len=train_len,
                                                       has_patch_parameters=has_parameters))
        warnings.warn(
            f"{str(folder)!r} holds a model patched with {patch.spec!r}: transformers' from_pretrained (and vLLM, "
            f"TGI) will load it WITHOUT the patch; {CTXPATCH_JSON} records it: load the folder with "
            f"ctxpatch.load({str(folder)!r})",
            stacklevel=2,
        )
        return out

    had_own = "save_pretrained" in vars(model)
    previous = vars(model).get("save_pretrained")
    model.save_pretrained = save_pretrained

    def undo() -> None:
        if had_own:
            model.save_pretrained = previous
        else:
            del model.save_pretrained

    return undo
