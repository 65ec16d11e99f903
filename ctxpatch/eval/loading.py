"""Loading the model to evaluate: "default", a .gguf file, a folder, a hub name — or a ctxpatch run folder.

A run folder of the fine-tune (`ctxpatch.json` beside the weights, or a merged model whose config has a
`ctxpatch` entry) is loaded with `ctxpatch.load`, and the model comes back carrying its patch: it is evaluated
as loaded, and asking for another patch on top is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..loading import load, read_record
from .errors import EvalError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def carries_patch(name: str) -> bool:
    """True for a folder holding `ctxpatch.json` or a config.json with a `ctxpatch` entry."""
    if not Path(name).is_dir():
        return False
    try:
        return read_record(name) is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # not ours to judge: loading it as a plain model says what is wrong


def check_exists(name: str) -> None:
    """A name that looks like a path (./x, /x, x/y that is not a hub id, x.gguf) must exist."""
    if name == "default":
        return
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model {name!r} does not exist: give 'default', a model folder, a .gguf file or a hub name")


def load_for_eval(name: str, dtype: str | torch.dtype | None = None, device: str | None = None,
                  device_map: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer); a run folder comes back carrying its patch (and its peft adapter).

    `dtype`: None = float32 on the CPU, the checkpoint's own dtype on a GPU or spread by `device_map`; "auto" =
    the checkpoint's own; a run folder's default is the dtype it was trained in. `device` ("cpu", "cuda",
    "cuda:1") loads the weights straight onto it; `device_map` ("auto") spreads them with accelerate."""
    check_exists(name)
    kwargs = placement(device, device_map)
    if carries_patch(name):
        model, tokenizer = load(name, dtype=None if dtype in (None, "auto") else dtype, **kwargs)
    else:
        from ..models import load_model

        model, tokenizer = load_model(name, dtype=eval_dtype(dtype, device, device_map), **kwargs)
    if device is not None and device_map is None and model_device(model) != torch.device(device):
        model = model.to(device)  # a loader that does not take device_map (ChatGLM's)
    return model.eval(), tokenizer


def placement(device: str | None, device_map: str | None) -> dict[str, Any]:
    """from_pretrained's placement keyword: accelerate's `device_map`, or one device as a device map; nothing
    for the CPU (where from_pretrained puts the weights anyway)."""
    if device_map is not None:
        return {"device_map": device_map}
    if device is not None and torch.device(device).type != "cpu":
        return {"device_map": str(torch.device(device))}
    return {}


def eval_dtype(dtype: str | torch.dtype | None, device: str | None, device_map: str | None) -> torch.dtype | str:
    """The dtype for from_pretrained: as given ("auto" = the checkpoint's); by default float32 on the CPU (what
    ctxpatch always measured with) and the checkpoint's own dtype on accelerators."""
    if dtype is None:
        on_cpu = device_map is None and (device is None or torch.device(device).type == "cpu")
        return torch.float32 if on_cpu else "auto"
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise EvalError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device
