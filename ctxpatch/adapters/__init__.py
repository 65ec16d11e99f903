"""Adapters find a model's attention modules, rotary embedding and layout by structure.

The first adapter whose `find` recognises the model wins; none -> `UnsupportedModelError` saying
what was found and what is supported.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, LayoutProbeError
from .families import check_config
from .llama import LlamaFamilyAdapter

ADAPTERS: list[type[Adapter]] = [LlamaFamilyAdapter]


def find_adapter(model: nn.Module) -> Adapter:
    check_config(getattr(model, "config", None))
    cause = None
    for cls in ADAPTERS:
        try:
            adapter = cls.find(model)
        except LayoutProbeError as error:  # recognised the structure, but its rotation could not be checked
            cause = error
            continue
        if adapter is not None:
            return adapter
    raise UnsupportedModelError(describe_unsupported(model)) from cause


def describe_unsupported(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "?")
    attention = sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith(("attn", "attention"))})
    found = ", ".join(attention) or "no module named *attn/*attention"
    supported = "; ".join(f"{cls.families} ({cls.requirement})" for cls in ADAPTERS)
    return (
        f"ctxpatch cannot patch {type(model).__name__} (model_type {model_type!r}): found {found}. "
        f"Supported: {supported}."
    )
