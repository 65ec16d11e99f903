"""Each method against a direct float64 evaluation of its DESIGN.md formula, on every backend.

The library's `dense` backend must equal the formula (tests/formulas.py, written without ctxpatch
code); `blockwise` (with tiny blocks, so chunking and key-block selection are exercised) and
`flex` (FlexAttention's eager path on CPU) must equal `dense`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import formulas as f
from ctxpatch.backends import blockwise, get_backend
from ctxpatch.backends.common import AttentionCall
from ctxpatch.compose import build_plan
from ctxpatch.patch import make_runtime
from ctxpatch.registry import ModelInfo
from ctxpatch.rotary import Rotary, RotaryLayout

L, H, HK, D, T = 16, 4, 2, 8, 22
BASE = 10000.0
INFO = ModelInfo(train_len=L, num_layers=1, num_heads=H, num_kv_heads=HK, head_dim=D, rotary_dim=D)
CONFIG = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=HK, max_position_embeddings=L)


def make_call(kind: str):
    """Positions of a batch of two: row 1 left-padded by 3, or with position ids that skip ahead."""
    k_pos = torch.arange(T).repeat(2, 1)
    padding = None
    if kind == "padded":
        padding = torch.ones(2, T, dtype=torch.bool)
        padding[1, :3] = False
        k_pos[1] = (padding[1].long().cumsum(0) - 1).clamp(min=0)
    elif kind == "skips":
        k_pos[1] = torch.cat([torch.arange(8), torch.arange(8, T) + 9])  # a PoSE-style jump of 9
    return k_pos, padding


def inputs(tq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, tq, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, HK, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, HK, T, D, generator=g, dtype=torch.float64)
    return q, k, v


def runtime_for(spec: str, params: dict, seed: int = 0):
    _, plans = build_plan(spec, params, INFO)
    rotary = Rotary(LlamaRotaryEmbedding(CONFIG).double(), RotaryLayout(False, D))
    runtime = make_runtime(plans[0], rotary, CONFIG, INFO, torch.device("cpu"))
    if runtime.tensors is not None:  # trainable per-head values: make them differ per head
        g = torch.Generator().manual_seed(seed)
        for p in runtime.tensors.parameters():
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
    return runtime


def run(backend: str, runtime, q, k, v, k_pos, padding, tq):
    call = AttentionCall(
        q_pos=k_pos[:, T - tq :], k_pos=k_pos, key_padding=padding, scaling=D**-0.5
    )
    return get_backend(backend)(q, k, v, call, runtime).transpose(1, 2)  # (B, H, Tq, d)


# ---- the formulas of every method, as (scores, visible) for the reference ----------------------


def theta_and_scaling(spec: str, params: dict, max_pos: int):
    """Frequencies from transformers' own initialisers for the scalers, textbook RoPE otherwise."""
    factor = params.get("factor", 2.0)
    if spec == "ntk":
        return f.default_theta(D, BASE * factor ** (D / (D - 2))), 1.0
    if spec in ("linear", "dynamic", "yarn", "llama3", "longrope"):
        cfg = copy.deepcopy(CONFIG)
        rope = {"rope_type": spec, "rope_theta": BASE, "factor": factor, "original_max_position_embeddings": L}
        if spec == "llama3":
            rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
        if spec == "longrope":
            rope.update(short_factor=[1.0] * (D // 2), long_factor=[factor] * (D // 2))
        cfg.rope_parameters = rope
        if spec == "dynamic":
            inv, scale = ROPE_INIT_FUNCTIONS["dynamic"](cfg, None, seq_len=max(max_pos + 1, L))
        elif spec == "longrope" and max_pos + 1 <= L:
            inv, scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=L)
            rope["long_factor"] = rope["short_factor"]
            inv, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, None, seq_len=L)
        else:
            inv, scale = ROPE_INIT_FUNCTIONS[spec](cfg, None, seq_len=max_pos + 1)
        return inv.double(), scale
    return f.default_theta(D, BASE), 1.0


SCALERS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")


def reference(spec, params, runtime, q, k, v, k_pos, padding, tq):
    """The formula of a whole spec: every component applied the way DESIGN.md composes them."""
    names = spec.split("+")
    i = k_pos[:, None, T - tq :, None]  # (B, 1, Tq, 1)
    j = k_pos[:, None, None, :]  # (B, 1, 1, Tk)
    key_real = None if padding is None else padding[:, None, None, :]
    scaler = next((n for n in names if n in SCALERS), "default")
    theta, att = theta_and_scaling(scaler, params, int(k_pos.max()))
    rel, weights, kappa, bias = (i - j).double(), None, 1.0, 0.0
    visible = f.causal(i, j, key_real)
    w = params.get("window")
    for name in names:
        if name == "window":
            visible = visible & f.window(i, j, w)
        elif name == "bca":
            visible = visible & f.bca(i, j, params["block_size"])
        elif name == "hybrid":
            visible = visible & (f.window(i, j, w) | (j < params["global_tokens"]))
        elif name == "sinks":
            visible = visible & f.sinks_visible(i, j, params["global_tokens"], w)
            rel = f.sinks_relative(i, j, params["global_tokens"], w)
        elif name == "logn":
            kappa = f.logn(i, params.get("train_len", L))
        elif name == "alibi":
            bias = bias + f.alibi(H, i, j)
        elif name == "sandwich":
            bias = bias + f.sandwich(H, params.get("sandwich_dim", 128), i, j)
        elif name in ("kerple_log", "kerple_power"):
            r = runtime.params_of(name)
            bias = bias + getattr(f, name)(r["r1"].detach(), r["r2"].detach(), i, j)
        elif name == "rerope":
            rel = f.rerope(i, j, w)
        elif name == "leaky_rerope":
            rel = f.leaky_rerope(i, j, w, params["leak"])
        elif name == "selfextend":
            rel = f.selfextend(i, j, w, params["group"])
        elif name == "xpos":
            weights = f.xpos_weights(i, j, D, params["scale_base"])
    scores = f.rotary_scores(q, k, rel, theta, D, attention_scaling=att, pair_weights=weights) * D**-0.5
    return f.attention(q, k, v, scores * kappa + bias, visible)


CASES = [
    ("window", {"window": 5}),
    ("bca", {"block_size": 4}),
    ("hybrid", {"window": 4, "global_tokens": 3}),
    ("logn", {"train_len": 6}),
    ("alibi", {}),
    ("sandwich", {"sandwich_dim": 16}),
    ("kerple_log", {}),
    ("kerple_power", {}),
    ("linear", {"factor": 3.0}),
    ("ntk", {"factor": 4.0}),
    ("dynamic", {"factor": 2.0}),
    ("yarn", {"factor": 4.0}),
    ("llama3", {"factor": 8.0}),
    ("longrope", {"factor": 2.0}),
    ("xpos", {"scale_base": 16.0}),
    ("rerope", {"window": 6}),
    ("leaky_rerope", {"window": 6, "leak": 4.0}),
    ("selfextend", {"window": 6, "group": 3}),
    ("sinks", {"global_tokens": 3, "window": 7}),
    ("xpos+rerope", {"window": 5, "scale_base": 16.0}),
    ("xpos+yarn+window", {"window": 9, "scale_base": 16.0, "factor": 2.0}),
    ("selfextend+logn", {"window": 5, "group": 4, "train_len": 6}),
    ("rerope+alibi", {"window": 6}),
    ("hybrid+rerope", {"window": 5, "global_tokens": 2}),
    ("leaky_rerope+kerple_log+bca", {"window": 4, "leak": 2.0, "block_size": 8}),
    ("sinks+logn+sandwich", {"global_tokens": 2, "window": 6, "train_len": 8, "sandwich_dim": 8}),
    ("sinks+xpos", {"global_tokens": 2, "window": 6, "scale_base": 8.0}),
]


def real_rows(out, padding, tq):
    """Outputs of real (non-padding) queries only: a padding query's output is arbitrary."""
    if padding is None:
        return out
    return out.masked_fill(~padding[:, None, T - tq :, None], 0.0)


@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES, ids=[c[0] for c in CASES])
def test_dense_matches_formula(spec, params, kind, tq):
    k_pos, padding = make_call(kind)
    q, k, v = inputs(tq)
    runtime = runtime_for(spec, params)
    got = run("dense", runtime, q, k, v, k_pos, padding, tq)
    expected = reference(spec, params, runtime, q, k, v, k_pos, padding, tq)
    # transformers computes rotary angles in fp32 even for fp64 inputs: 1e-6 is that, not slack
    assert_close(real_rows(got, padding, tq), real_rows(expected, padding, tq), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["blockwise", "flex"])
@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES + [("hybrid", {"window": 3, "global_tokens": 2, "random_blocks": 2, "block_size": 2})], ids=[c[0] for c in CASES] + ["hybrid_random"])
def test_backends_match_dense(spec, params, kind, tq, backend, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 4)  # many chunks and key blocks on a short input
    k_pos, padding = make_call(kind)
    q, k, v = inputs(tq)
    runtime = runtime_for(spec, params)
    expected = run("dense", runtime, q, k, v, k_pos, padding, tq)
    got = run(backend, runtime, q, k, v, k_pos, padding, tq)
    assert_close(real_rows(got, padding, tq), real_rows(expected, padding, tq), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
@pytest.mark.parametrize("spec,params", CASES, ids=[c[0] for c in CASES])
def test_bf16_matches_float64(spec, params, backend, monkeypatch):
    """bf16 inputs: the result is the float64 result of the same (rounded) inputs, to bf16 precision."""
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    k_pos, padding = make_call("padded")
    q, k, v = (x.bfloat16() for x in inputs(T))
    runtime = runtime_for(spec, params)
    expected = run("dense", runtime, q.double(), k.double(), v.double(), k_pos, padding, T)
    got = run(backend, runtime, q, k, v, k_pos, padding, T).double()
    assert_close(real_rows(got, padding, T), real_rows(expected, padding, T), rtol=0.03, atol=0.03)


def test_alibi_folded_into_fused_kernel_matches_dense_in_fp32(monkeypatch):
    """fp32 takes the folded path (extra q/k dims); it must agree with the dense fp32 result."""
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    k_pos, padding = make_call("padded")
    q, k, v = (x.float() for x in inputs(T))
    for spec in ("alibi", "sandwich", "alibi+sandwich"):
        runtime = runtime_for(spec, {"sandwich_dim": 16} if "sandwich" in spec else {})
        runtime.rotary.module.float()
        expected = run("dense", runtime, q, k, v, k_pos, padding, T)
        got = run("blockwise", runtime, q, k, v, k_pos, padding, T)
        assert_close(real_rows(got, padding, T), real_rows(expected, padding, T), rtol=1e-4, atol=1e-4)


def test_alibi_slopes_follow_the_paper():
    from ctxpatch.biases.alibi import alibi_slopes

    assert_close(alibi_slopes(8).double(), torch.tensor([2.0**-k for k in range(1, 9)], dtype=torch.float64))
    six = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]  # P=4 slopes, then every other of 2P=8
    assert_close(alibi_slopes(6).double(), torch.tensor(six, dtype=torch.float64))
    assert_close(alibi_slopes(6).double(), f.alibi_slopes(6))


def test_kerple_gradients_reach_r1_r2_and_agree_across_backends(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    k_pos, padding = make_call("padded")
    for spec in ("kerple_log", "kerple_power"):
        grads = {}
        for backend in ("dense", "blockwise"):
            runtime = runtime_for(spec, {})
            q, k, v = inputs(T)
            out = run(backend, runtime, q, k, v, k_pos, padding, T)
            real_rows(out, padding, T).square().sum().backward()
            grads[backend] = [p.grad.clone() for p in runtime.tensors.parameters()]
            assert all(g.abs().sum() > 0 for g in grads[backend])
        for a, b in zip(grads["dense"], grads["blockwise"]):
            assert_close(a, b, rtol=1e-6, atol=1e-6)
