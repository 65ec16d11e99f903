"""Backend-level test harness shared by test_formulas.py (Llama geometry) and test_glm.py (GLM's).

A `Geometry` holds one attention shape (heads, head dim, rotary dim and pair layout, trained
length, input length) and builds: the positions of a test batch, random float64 q/k/v, a layer
runtime for a spec, a backend run, and the whole spec's formula (`reference`), evaluated with
tests/formulas.py without ctxpatch's code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import formulas as f
import torch
from torch.testing import assert_close
from transformers import GlmConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ctxpatch.backends import get_backend
from ctxpatch.compose import build_plan
from ctxpatch.plan import AttentionCall, make_runtime
from ctxpatch.registry import ModelInfo
from ctxpatch.rotary import Rotary, RotaryLayout

SCALERS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
BASE = 10000.0

# One case per registered method (tests/formulas.py's table), at parameters that make it act inside the
# geometries' 16/22-token sequences; each geometry's test file adds its own compositions.
METHOD_CASES = [(name, formula.case) for name, formula in f.FORMULAS.items()]


@dataclass
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    interleaved: bool
    train_len: int
    length: int  # T: keys per test input
    config: Any  # a transformers config of the family (its rotary class is built from it)
    rotary_class: Any

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.train_len, 1, self.heads, self.kv_heads, self.head_dim, self.rotary_dim)

    def make_call(self, kind: str):
        """Positions of a batch of two: row 1 left-padded by 3, or with position ids that skip ahead."""
        t = self.length
        k_pos = torch.arange(t).repeat(2, 1)
        padding = None
        if kind == "padded":
            padding = torch.ones(2, t, dtype=torch.bool)
            padding[1, :3] = False
            k_pos[1] = (padding[1].long().cumsum(0) - 1).clamp(min=0)
        elif kind == "skips":
            k_pos[1] = torch.cat([torch.arange(8), torch.arange(8, t) + 9])  # a PoSE-style jump of 9
        elif kind == "stretched":  # fractional ids as the `stretched` scheme gives (spacings exact in fp32: differences too)
            k_pos = torch.stack([torch.arange(t) * 1.5, torch.arange(t) * (55 / 32)]).float()
        return k_pos, padding

    def inputs(self, tq: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(2, self.heads, tq, self.head_dim, generator=g, dtype=torch.float64)
        k = torch.randn(2, self.kv_heads, self.length, self.head_dim, generator=g, dtype=torch.float64)
        v = torch.randn(2, self.kv_heads, self.length, self.head_dim, generator=g, dtype=torch.float64)
        return q, k, v

    def runtime_for(self, spec: str, params: dict, seed: int = 0):
        _, plans = build_plan(spec, params, self.info)
        layout = RotaryLayout(interleaved=self.interleaved, rotary_dim=self.rotary_dim)
        rotary = Rotary(self.rotary_class(self.config).double(), layout)
        runtime = make_runtime(plans[0], rotary, self.config, self.info, torch.device("cpu"))
        if runtime.tensors is not None:  # trainable per-head values: make them differ per head
            g = torch.Generator().manual_seed(seed)
            for p in runtime.tensors.parameters():
                with torch.no_grad():
                    p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
        return runtime

    def run(self, backend: str, runtime, q, k, v, k_pos, padding, tq):
        t = self.length
        call = AttentionCall(q_pos=k_pos[:, t - tq :], k_pos=k_pos, key_padding=padding, scaling=self.head_dim**-0.5)
        return get_backend(backend)(q, k, v, call, runtime).transpose(1, 2)  # (B, H, Tq, d)

    def real_rows(self, out, padding, tq):
        """Outputs of real (non-padding) queries only: a padding query's output is arbitrary."""
        if padding is None:
            return out
        return out.masked_fill(~padding[:, None, self.length - tq :, None], 0.0)

    def check_dense_against_formula(self, spec: str, params: dict, kind: str, tq: int) -> None:
        k_pos, padding = self.make_call(kind)
        q, k, v = self.inputs(tq)
        runtime = self.runtime_for(spec, params)
        got = self.run("dense", runtime, q, k, v, k_pos, padding, tq)
        expected = self.reference(spec, params, runtime, q, k, v, k_pos, padding, tq)
        # transformers computes rotary angles in fp32 even for fp64 inputs: 1e-6 is that, not slack
        assert_close(self.real_rows(got, padding, tq), self.real_rows(expected, padding, tq), rtol=1e-6, atol=1e-6)

    def check_backend_against_dense(self, backend: str, spec: str, params: dict, kind: str, tq: int) -> None:
        k_pos, padding = self.make_call(kind)
        q, k, v = self.inputs(tq)
        runtime = self.runtime_for(spec, params)
        expected = self.run("dense", runtime, q, k, v, k_pos, padding, tq)
        got = self.run(backend, runtime, q, k, v, k_pos, padding, tq)
        assert_close(self.real_rows(got, padding, tq), self.real_rows(expected, padding, tq), rtol=1e-7, atol=1e-7)

    # ---- the formula ------------------------------------------------------------------------------

    def theta_and_scaling(self, scaler: str, params: dict, max_pos: int):
        """Pair frequencies: transformers' own initialisers for the scalers, textbook RoPE otherwise."""
        d_r, factor = self.rotary_dim, params.get("factor", 2.0)
        if scaler == "ntk":
            return f.default_theta(d_r, BASE * factor ** (d_r / (d_r - 2))), 1.0
        if scaler not in SCALERS:
            return f.default_theta(d_r, BASE), 1.0
        cfg = copy.deepcopy(self.config)
        rope = {
            "rope_type": scaler, "rope_theta": BASE, "factor": factor,
            "original_max_position_embeddings": self.train_len, "partial_rotary_factor": d_r / self.head_dim,
        }
        if scaler == "llama3":
            rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
        if scaler == "longrope":
            rope.update(short_factor=[1.0] * (d_r // 2), long_factor=[factor] * (d_r // 2))
        cfg.rope_parameters = rope
        if scaler == "dynamic":
            inv, scale = ROPE_INIT_FUNCTIONS["dynamic"](cfg, None, seq_len=max(max_pos + 1, self.train_len))
        elif scaler == "longrope" and max_pos + 1 <= self.train_len:
            _, scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=self.train_len)
            rope["long_factor"] = rope["short_factor"]
            inv, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=self.train_len)
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[scaler](cfg, None, seq_len=max_pos + 1)
        assert inv.numel() == d_r // 2  # the initialisers read the partial rotary factor
        return inv.double(), scale

    def reference(self, spec, params, runtime, q, k, v, k_pos, padding, tq):
        """The formula of a whole spec: every component applied the way DESIGN.md composes them."""
        names = spec.split("+")
        i = k_pos[:, None, self.length - tq :, None]  # (B, 1, Tq, 1)
        j = k_pos[:, None, None, :]  # (B, 1, 1, Tk)
        key_real = None if padding is None else padding[:, None, None, :]
        pairs = f.Pairs(
            i=i, j=j, params=params, heads=self.heads, rotary_dim=self.rotary_dim, train_len=self.train_len,
            tensors=runtime.params_of, visible=f.causal(i, j, key_real), rel=(i - j).double(),
            q=q, k=k, key_real=key_real, names=tuple(names),
        )
        for name in names:
            f.FORMULAS[name].apply(pairs)
        theta, att = self.theta_and_scaling(pairs.scaler, params, k_pos.max().item())  # a float for fractional ids
        scores = f.rotary_scores(
            q, k, pairs.rel, theta, self.rotary_dim, interleaved=self.interleaved, attention_scaling=att,
            pair_weights=pairs.weights,
        )
        return f.attention(q, k, v, scores * self.head_dim**-0.5 * pairs.kappa + pairs.bias, pairs.visible)


# The two attention geometries every backend suite uses: Llama's half-split rotary over the whole head, and GLM's
# interleaved rotary over half of it (partial_rotary_factor 0.5); 16 trained positions, 22-key inputs.
LLAMA_GEOMETRY = Geometry(
    heads=4, kv_heads=2, head_dim=8, rotary_dim=8, interleaved=False, train_len=16, length=22,
    config=LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16),
    rotary_class=LlamaRotaryEmbedding,
)
GLM_GEOMETRY = Geometry(
    heads=4, kv_heads=2, head_dim=16, rotary_dim=8, interleaved=True, train_len=16, length=22,
    config=GlmConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16),
    rotary_class=GlmRotaryEmbedding,
)
