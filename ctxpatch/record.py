"""`ctxpatch.json`: what a fine-tune run, each of its checkpoints and a merged model record about themselves
(the patch spec with resolved parameters, the ctxpatch version, the base model and its fingerprint)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    from .._version import __version__

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
