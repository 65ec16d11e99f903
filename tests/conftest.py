"""Tiny random-weight models built from configs: no downloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

# the models are tiny: one thread avoids thread start-up costs that dwarf the arithmetic
torch.set_num_threads(1)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "glm", "glm4")
TRAIN_LEN = 32


def tiny_config(arch: str = "llama", **overrides):
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TRAIN_LEN,
        initializer_range=0.35,  # large weights: well-separated logits, so greedy argmax has no ties
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,  # generation runs its full length: no row stops early
        tie_word_embeddings=False,
    )
    family = {
        "mistral": {"sliding_window": None},
        "qwen3": {"head_dim": 8},
        # GLM: head_dim 16 with partial_rotary_factor 0.5 (4 interleaved pairs), qkv bias
        "glm": {"head_dim": 16, "attention_bias": True},
        "glm4": {"head_dim": 16, "attention_bias": True},
    }
    if arch not in ("llama", "qwen2", *family):
        raise ValueError(arch)
    return AutoConfig.for_model(arch, **{**common, **family.get(arch, {}), **overrides})


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="sdpa")
    with torch.no_grad():  # biases start at zero: give them values so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.35)
    return model.to(dtype).eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def llama():
    return tiny_model("llama")


def token_ids(batch: int, length: int, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)
