"""apply / Patch / methods(): the user-facing contract, and every error path.

Errors must say what to do, and a failed `apply` must leave the model exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import ctxpatch
from conftest import tiny_model, token_ids
from ctxpatch.registry import Method, register


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config._attn_implementation,
        [(n, len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()],
        [n for n, _ in model.named_modules()],
    )


def assert_untouched(model, before):
    state, impl, hooks, names = snapshot(model)
    assert impl == before[1] and hooks == before[2] and names == before[3]
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert ctxpatch.current_patch(model) is None


def test_methods_lists_every_method_with_kind_and_defaults():
    rows = {m.name: m for m in ctxpatch.methods()}
    expected = {
        "window": "mask", "hybrid": "mask", "bca": "mask", "logn": "scale", "alibi": "bias",
        "kerple_log": "bias", "kerple_power": "bias", "sandwich": "bias", "linear": "position",
        "ntk": "position", "dynamic": "position", "yarn": "position", "llama3": "position", "longrope": "position",
    }
    for name, kind in expected.items():
        assert rows[name].kind == kind
    assert rows["hybrid"].params == {
        "window": "L", "global_tokens": "4", "random_blocks": "0", "block_size": "64", "seed": "0"
    }
    assert rows["kerple_power"].params == {"r1": "1.0", "r2": "1.0"}
    assert "window" in str(rows["window"])


def test_patch_repr_lists_resolved_parameters_and_layers(llama):
    with ctxpatch.apply(llama, "logn+window", window=12) as patch:
        text = repr(patch)
    assert "window(window=12)" in text and "layers 0-1" in text
    assert "logn(train_len=32)" in text and "layers 2" in text
    assert "removed" in repr(patch)


def test_logn_window_layout_and_full_layers(llama):
    with ctxpatch.apply(llama, "logn+window", full_layers=2) as patch:
        layers = {m.name: m.layers for m in patch.methods}
    assert layers == {"window": [0], "logn": [1, 2]}
    with ctxpatch.apply(llama, "logn+window", layers=[0, 1, 2]) as patch:  # explicit layers: no layout
        assert {m.name: m.layers for m in patch.methods} == {"window": [0, 1, 2], "logn": [0, 1, 2]}


def test_method_objects_and_per_method_layers(llama):
    spec = [ctxpatch.method("window", window=5, layers=[0, -1]), ctxpatch.method("bca", block_size=3, layers=[1])]
    with ctxpatch.apply(llama, spec) as patch:
        assert [m.layers for m in patch.methods] == [[0, 2], [1]]
        assert [p.mask.name for p in patch.plans] == ["window", "bca", "window"]


def test_keyword_parameter_goes_to_every_method_taking_it(llama):
    with ctxpatch.apply(llama, "alibi+window", window=4096) as patch:
        assert patch.methods[1].values == {"window": 4096}


def test_second_patch_is_refused_unless_replace(llama):
    ids = token_ids(1, 12)
    with torch.no_grad():
        first = ctxpatch.apply(llama, "alibi")
        alibi = llama(ids).logits
        with pytest.raises(ctxpatch.AlreadyPatchedError, match="remove"):
            ctxpatch.apply(llama, "window", window=4)
        assert torch.equal(llama(ids).logits, alibi)  # the refused apply changed nothing
        second = ctxpatch.apply(llama, "window", window=4, replace=True)
        assert not first.active and second.active
        assert ctxpatch.remove(llama) and not ctxpatch.remove(llama)


def test_kerple_parameters_are_model_parameters(llama):
    with ctxpatch.apply(llama, "kerple_power", r1=0.5, r2=1.5) as patch:
        names = [n for n, _ in llama.named_parameters() if "ctxpatch" in n]
        assert len(names) == 6 and all(p.requires_grad for p in patch.parameters())
        assert torch.equal(patch.parameters()[1], torch.full((4,), 1.5))
    assert not [n for n, _ in llama.named_parameters() if "ctxpatch" in n]


# ---- errors: clear message, and the model is untouched -----------------------------------------

BAD = [
    ("windw", {}, ctxpatch.UnknownMethodError, r"unknown method 'windw'\. Did you mean 'window'\?.*Known methods: .*alibi"),
    ("window", {"widow": 3}, TypeError, r"widow.*they take: .*window"),
    ("window", {"window": 0}, ValueError, r"window: window=0 must be a positive integer"),
    ("hybrid", {"global_tokens": -1}, ValueError, r"global_tokens=-1 must be an integer >= 0"),
    ("kerple_power", {"r2": 2.5}, ValueError, r"r2=2.5 must be in \(0, 2\]"),
    ("kerple_log", {"r1": 0}, ValueError, r"r1=0 must be a finite number > 0"),
    ("window", {"layers": [3]}, ValueError, r"layer index 3 is out of range for a model with 3 layers"),
    ("window", {"layers": [-4]}, ValueError, r"out of range"),
    ("window+bca", {}, ctxpatch.CompositionError, r"two masks, 'window' and 'bca'"),
    ("yarn+dynamic", {}, ctxpatch.CompositionError, r"two position rules, 'yarn' and 'dynamic'"),
    ("window+window", {}, ctxpatch.CompositionError, r"appears twice"),
    ("logn+window", {"full_layers": 9}, ValueError, r"full_layers=9 must be an integer in 1\.\.3"),
    ("window", {"full_layers": 1}, TypeError, r"full_layers"),
    ("", {}, ValueError, r"method names joined by '\+'"),
    ("sandwich", {"sandwich_dim": 7}, ValueError, r"must be even"),
    ("yarn", {"factor": 0.5}, ValueError, r"factor=0.5 must be a number >= 1"),
    ("window", {"backend": "fast"}, ValueError, r"unknown backend 'fast'"),
]


@pytest.mark.parametrize("spec,params,error,message", BAD, ids=[f"{s}-{list(p)}" for s, p, _, _ in BAD])
def test_bad_input_is_a_clear_error_and_changes_nothing(spec, params, error, message):
    model = tiny_model("llama")
    ids = token_ids(1, 10)
    before = snapshot(model)
    with torch.no_grad():
        logits = model(ids).logits
        with pytest.raises(error, match=message):
            ctxpatch.apply(model, spec, **params)
        assert torch.equal(model(ids).logits, logits)
    assert_untouched(model, before)


def test_unsupported_model_says_what_it_found_and_what_is_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    before = snapshot(model)
    with pytest.raises(ctxpatch.UnsupportedModelError, match=r"GPT2LMHeadModel.*'gpt2'.*GPT2Attention.*Supported: Llama"):
        ctxpatch.apply(model, "window")
    assert_untouched(model, before)


def test_failure_during_install_rolls_back(monkeypatch):
    model = tiny_model("llama")
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ctxpatch._compat.transformers, "set_attn_implementation", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ctxpatch.apply(model, "kerple_log")
    monkeypatch.undo()
    assert_untouched(model, before)


def test_registry_refuses_a_duplicate_name():
    class Another(Method):
        name, kind = "window", "mask"

    with pytest.raises(ValueError, match="already registered"):
        register(Another)


def test_cache_filled_before_the_patch_is_refused(llama):
    ids = token_ids(1, 12)
    with torch.no_grad():
        cache = llama(ids[:, :8], use_cache=True).past_key_values
        with ctxpatch.apply(llama, "window", window=4), pytest.raises(ctxpatch.CtxpatchError, match="fresh cache"):
            llama(ids[:, 8:], past_key_values=cache, use_cache=True)


def test_to_dict_round_trips_through_spec_from_dict(llama):
    ids = token_ids(1, 40)
    with torch.no_grad():
        with ctxpatch.apply(llama, "logn+window+alibi", window=9, full_layers=2) as patch:
            record = patch.to_dict()
            expected = llama(ids).logits
        with ctxpatch.apply(llama, ctxpatch.spec_from_dict(record), backend=record["backend"]) as again:
            assert again.to_dict() == record
            assert torch.equal(llama(ids).logits, expected)


def test_a_peft_wrapped_model_can_be_patched(llama):
    """LoRA layers wrap the projections (peft): the structural adapter still finds the attention."""
    from peft import LoraConfig, get_peft_model

    ids = token_ids(1, 30)
    with torch.no_grad():
        with ctxpatch.apply(llama, "rerope", window=6):
            expected = llama(ids).logits
        wrapped = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B = 0: no change yet
        with ctxpatch.apply(wrapped, "rerope", window=6):
            got = wrapped(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_unsupported_model_error_keeps_the_cause(llama):
    """When calling the model's own rotary embedding fails, the error says so and chains the cause."""
    rotary = llama.model.rotary_emb

    class BrokenRotary(type(rotary)):
        def forward(self, x, position_ids):
            raise RuntimeError("boom in the rotary embedding")

    rotary.__class__ = BrokenRotary  # this instance only
    with pytest.raises(ctxpatch.UnsupportedModelError) as caught:
        ctxpatch.apply(llama, "window")
    chain = []
    error = caught.value.__cause__
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("boom in the rotary embedding" in text for text in chain), chain


def test_a_method_that_needs_training_warns_once_per_process_unless_fine_tuned(monkeypatch, recwarn):
    from ctxpatch import patch as patch_module

    monkeypatch.setattr(patch_module, "_WARNED_UNTRAINED", set())
    free = {m.name: m.training_free for m in ctxpatch.methods()}
    assert [name for name, ok in free.items() if not ok] == ["alibi", "kerple_log", "kerple_power", "sandwich", "xpos"]
    model = tiny_model()
    with pytest.warns(UserWarning, match=r"alibi is not training-free: .*patch=alibi.*fine_tuned=True"):
        ctxpatch.apply(model, "alibi+window").remove()
    recwarn.clear()
    ctxpatch.apply(model, "alibi").remove()  # once per process and method
    ctxpatch.apply(model, "selfextend").remove()  # training-free: silent
    ctxpatch.apply(model, "sandwich", fine_tuned=True).remove()  # trained under it (ctxpatch.load passes this)
    assert not [w for w in recwarn if "training-free" in str(w.message)]
    with pytest.warns(UserWarning, match="sandwich is not training-free"):
        ctxpatch.apply(model, "sandwich").remove()


def test_methods_cli_shows_training_free(capsys):
    from ctxpatch.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "training-free" in out[0]
    rows = {line.split()[0]: line.split()[2] for line in out[1:]}
    assert rows["alibi"] == "no" and rows["dca"] == "yes" and rows["xpos"] == "no"
