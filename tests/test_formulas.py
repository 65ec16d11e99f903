"""Each method against a direct float64 evaluation of its DESIGN.md formula, on every backend.

The library's `dense` backend must equal the formula (tests/formulas.py, written without ctxpatch
code); `blockwise` (with tiny blocks, so chunking and key-block selection are exercised) and
`flex` (FlexAttention's eager path on CPU) must equal `dense`.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import ctxpatch
import formulas as f
from ctxpatch.backends import blockwise
from harness import LLAMA_GEOMETRY, METHOD_CASES

G = LLAMA_GEOMETRY
T, D = G.length, G.head_dim
make_call, inputs, runtime_for, run, reference, real_rows = G.make_call, G.inputs, G.runtime_for, G.run, G.reference, G.real_rows


CASES = METHOD_CASES + [
    ("xpos+rerope", {"window": 5, "scale_base": 16.0}),
    ("xpos+yarn+window", {"window": 9, "scale_base": 16.0, "factor": 2.0}),
    ("selfextend+logn", {"window": 5, "group": 4, "train_len": 6}),
    ("rerope+alibi", {"window": 6}),
    ("hybrid+rerope", {"window": 5, "global_tokens": 2}),
    ("leaky_rerope+kerple_log+bca", {"window": 4, "leak": 2.0, "block_size": 8}),
    ("sinks+logn+sandwich", {"global_tokens": 2, "window": 6, "train_len": 8, "sandwich_dim": 8}),
    ("sinks+xpos", {"global_tokens": 2, "window": 6, "scale_base": 8.0}),
    ("dca", {"chunk_len": 4, "local_window": 3}),  # chunks aligned with the 4-key blocks
    ("dca", {"chunk_len": 7, "local_window": 1}),  # chunk boundaries inside key blocks
    ("dca+logn", {"chunk_len": 6, "local_window": 3, "train_len": 6}),
    ("xpos+dca+alibi", {"chunk_len": 5, "local_window": 4, "scale_base": 16.0}),
    ("string", {"offset": 9, "local_window": 0}),
    ("string+kerple_log", {"offset": 4, "local_window": 3}),
]


def test_every_registered_method_has_a_formula_case():
    assert {name for name, _ in METHOD_CASES} == {m.name for m in ctxpatch.methods()}


@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES, ids=[c[0] for c in CASES])
def test_dense_matches_formula(spec, params, kind, tq):
    G.check_dense_against_formula(spec, params, kind, tq)


@pytest.mark.parametrize("backend", ["blockwise", "flex"])
@pytest.mark.parametrize("kind", ["plain", "padded", "skips"])
@pytest.mark.parametrize("tq", [T, 3])
@pytest.mark.parametrize("spec,params", CASES + [("hybrid", {"window": 3, "global_tokens": 2, "random_blocks": 2, "block_size": 2})], ids=[c[0] for c in CASES] + ["hybrid_random"])
def test_backends_match_dense(spec, params, kind, tq, backend, monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK", 4)  # many chunks and key blocks on a short input
    G.check_backend_against_dense(backend, spec, params, kind, tq)


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


@pytest.mark.parametrize("spec,params", [c for c in CASES if c[0] in ("rerope", "selfextend", "sinks", "xpos+rerope", "rerope+alibi", "hybrid+rerope", "dca", "xpos+dca+alibi", "string")])
def test_two_view_rules_agree_on_both_blockwise_paths(spec, params, monkeypatch):
    """Inference merges one fused call per view by log-sum-exp; with gradients one call holds the
    views side by side. Both must equal dense."""
    monkeypatch.setattr(blockwise, "BLOCK", 4)
    k_pos, padding = make_call("padded")
    q, k, v = inputs(T)
    runtime = runtime_for(spec, params)
    expected = run("dense", runtime, q, k, v, k_pos, padding, T)
    merged = run("blockwise", runtime, q, k, v, k_pos, padding, T)
    side_by_side = run("blockwise", runtime, q.clone().requires_grad_(), k, v, k_pos, padding, T)
    for got in (merged, side_by_side.detach()):
        assert_close(real_rows(got, padding, T), real_rows(expected, padding, T), rtol=1e-7, atol=1e-7)
