"""What an adapter gives the patch: the attention modules, the rotary map, the model facts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .._compat.transformers import rope_parameters
from ..registry import ModelInfo
from ..rotary import Rotary


class LayoutProbeError(Exception):
    """Checking a model's own rotation failed; `find_adapter` chains it under `UnsupportedModelError`."""


@dataclass
class Adapter:
    """A recognised model: where its parts are."""

    families: ClassVar[str] = ""
    requirement: ClassVar[str] = ""

    model: nn.Module
    base: nn.Module  # the module owning the decoder layers and the rotary embedding
    attentions: list[nn.Module]  # one per layer, in order
    rotary: Rotary
    info: ModelInfo
    layer_rotaries: list[Rotary] | None = None  # per layer, when layers rotate differently (Gemma 3); None: `rotary`

    def rotary_of(self, layer: int) -> Rotary:
        """The model's own rotary map of one layer."""
        return self.rotary if self.layer_rotaries is None else self.layer_rotaries[layer]

    @classmethod
    def find(cls, model: nn.Module) -> "Adapter | None":
        raise NotImplementedError


def train_len(config) -> int:
    """L: rope_parameters' original_max_position_embeddings if present, else max_position_embeddings."""
    rope = rope_parameters(config)
    return int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
