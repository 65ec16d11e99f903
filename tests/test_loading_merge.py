"""Saved runs and merged models that other tools read: a merge of one rope scaler transformers knows is written
as native `rope_parameters` (plain transformers computes the patch; `ctxpatch.load` does not apply it twice);
any other merge records the patch; a run folder loads with peft's own AutoPeftModelForCausalLM (without the
patch, as its README says)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_finetune_helpers import TRAIN_LEN, make_model_dir, reset_accelerate, tiny_overrides, write_text
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

import ctxpatch
from ctxpatch import loading


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def make_run(model_dir, folder, spec: str, **params):
    """A run folder as the fine-tune writes it (adapter, ctxpatch.json, tokenizer), with a LoRA that changes
    the model (random B), made without training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    model = loading.load_base_model(str(model_dir), "float32")
    patch = ctxpatch.apply(model, spec, **params)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    base = {"model": str(model_dir), "dtype": "float32", "tokenizer": None, "trust_remote_code": False,
            "fingerprint": loading.fingerprint(str(model_dir)), **loading.base_reference(str(model_dir))}
    loading.point_adapter_at_base(peft_model, base)
    peft_model.save_pretrained(str(folder))
    has = loading.save_patch_parameters(peft_model.state_dict(), folder)
    record = loading.make_record(patch, base, "adapter", train_len=TRAIN_LEN, has_patch_parameters=has)
    loading.write_json(folder / loading.CTXPATCH_JSON, record)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(folder))
    return folder


def full_forward(model, length: int = 3 * TRAIN_LEN) -> torch.Tensor:
    """Logits of one forward over `length` tokens (past the trained 32), positions 0..length-1."""
    ids = torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rope_inv_freq(rope: dict, rotary_dim: int) -> torch.Tensor:
    """What transformers' default / linear / ntk rope give, in float64, written from their formulas."""
    theta = rope["rope_theta"]
    inv = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    return inv / rope.get("factor", 1.0) if rope["rope_type"] == "linear" else inv


NATIVE = [
    ("yarn", {"factor": 4.0}, "yarn"),
    ("linear", {"factor": 2.0}, "linear"),
    ("ntk", {"factor": 4.0}, "default"),
    ("dynamic", {"factor": 2.0}, "dynamic"),
    ("llama3", {"factor": 8.0}, "llama3"),
    ("longrope", {"factor": 4.0}, "longrope"),
]


@pytest.mark.parametrize("spec, params, rope_type", NATIVE, ids=[n for n, _, _ in NATIVE])
def test_a_known_rope_scaler_merges_as_native_rope_parameters(model_dir, tmp_path, spec, params, rope_type):
    run, merged = make_run(model_dir, tmp_path / "run", spec, **params), tmp_path / "merged"
    ctxpatch.merge(run, merged)
    config = json.loads((merged / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == rope_type
    assert "plain transformers" in (merged / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ours, _ = ctxpatch.load(merged)
    adapter, _ = ctxpatch.load(run)
    expected = full_forward(adapter)
    scale = float(expected.abs().max())
    assert_close(full_forward(plain), full_forward(ours), rtol=1e-5, atol=1e-5 * scale)
    assert_close(full_forward(ours), expected, rtol=1e-5, atol=1e-5 * scale)
    # loaded once: the base's own rope under ctxpatch's patch, not the scaled rope patched again
    assert ctxpatch.current_patch(ours).spec == spec
    assert ours.config.rope_parameters["rope_type"] == "default"
    assert ours.config.rope_parameters["rope_theta"] == 10000.0
    # the base without the patch really is different past the trained length
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert not torch.allclose(full_forward(base), full_forward(plain), atol=1e-3)


def test_native_ntk_and_linear_are_the_formula(model_dir, tmp_path):
    for spec, factor in (("ntk", 4.0), ("linear", 2.0)):
        merged = tmp_path / spec
        ctxpatch.merge(make_run(model_dir, tmp_path / f"run-{spec}", spec, factor=factor), merged)
        rope = json.loads((merged / "config.json").read_text())["rope_parameters"]
        plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
        d = 2 * plain.model.rotary_emb.inv_freq.numel()  # 8: head_dim of the tiny Llama
        expected_theta = 10000.0 * factor ** (d / (d - 2)) if spec == "ntk" else 10000.0
        assert math.isclose(rope["rope_theta"], expected_theta, rel_tol=1e-12)
        expected = rope_inv_freq({"rope_theta": expected_theta, "rope_type": rope["rope_type"], "factor": factor}, d)
        assert_close(plain.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)


def test_dynamic_keeps_the_trained_length_as_max_position_embeddings(model_dir, tmp_path):
    ctxpatch.merge(make_run(model_dir, tmp_path / "run", "dynamic", factor=2.0), tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["max_position_embeddings"] == TRAIN_LEN
    assert config["ctxpatch"]["replaced_config"]["rope_parameters"]["rope_type"] == "default"


@pytest.mark.parametrize("spec, params", [("logn+window", {"window": 8}), ("yarn", {"factor": 4.0, "layers": [0, 1]})])
def test_any_other_patch_is_only_recorded_and_ctxpatch_load_restores_it(model_dir, tmp_path, spec, params):
    run, merged = make_run(model_dir, tmp_path / "run", spec, **params), tmp_path / "merged"
    ctxpatch.merge(run, merged)
    config = json.loads((merged / "config.json").read_text())
    assert config["ctxpatch"]["patch"]["spec"] == spec and "replaced_config" not in config["ctxpatch"]
    assert config["rope_parameters"]["rope_type"] == "default"
    assert "load this model without it" in (merged / "README.md").read_text()
    ours, _ = ctxpatch.load(merged)
    adapter, _ = ctxpatch.load(run)
    expected = full_forward(adapter)
    assert_close(full_forward(ours), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert not torch.allclose(full_forward(plain), expected, atol=1e-3)  # transformers alone: no patch
    with pytest.warns(UserWarning, match="use ctxpatch.load"):
        ctxpatch.load_model(str(merged))


def test_a_native_merge_loaded_plainly_gives_no_warning(model_dir, tmp_path, recwarn):
    ctxpatch.merge(make_run(model_dir, tmp_path / "run", "yarn", factor=4.0), tmp_path / "merged")
    ctxpatch.load_model(str(tmp_path / "merged"))
    assert not [w for w in recwarn if "ctxpatch.load" in str(w.message)]


# ---- run folders through peft's own auto class ---------------------------------------------------------


def test_autopeft_loads_a_fine_tune_run_from_anywhere_without_the_patch(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from ctxpatch.finetune import load_recipe, train

    monkeypatch.chdir(tmp_path)
    make_model_dir(tmp_path / "model")
    text = write_text(tmp_path / "t.txt", 3000)
    reset_accelerate()
    overrides = tiny_overrides("model", text, "run", patch="yarn", max_steps=1, **{"patch_params.yarn.factor": 4})
    train(load_recipe(None, overrides))
    reset_accelerate()
    adapter_config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "model")
    record = json.loads((tmp_path / "run" / "ctxpatch.json").read_text())
    assert record["base_model"]["name_or_path"] == str(tmp_path / "model")
    assert record["base_model"]["gguf_file"] is None
    notes = (tmp_path / "run" / "README.md").read_text()
    assert notes.startswith("---\n") and "ctxpatch.load('run')" in notes
    assert "peft alone loads the adapter without the patch" in notes

    monkeypatch.chdir(tmp_path.parent)  # from elsewhere: the base is found by its absolute path
    by_peft = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run")).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")), str(tmp_path / "run")
    ).eval()
    assert_close(full_forward(by_peft), full_forward(reference), rtol=0, atol=0)
    patched, _ = ctxpatch.load(tmp_path / "run")
    assert not torch.allclose(full_forward(by_peft), full_forward(patched), atol=1e-3)


def test_a_gguf_base_is_named_by_folder_and_file(tmp_path):
    gguf = tmp_path / "base.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    reference = loading.base_reference(str(gguf))
    record = {"patch": {"spec": "yarn"}, "train_len": 8192, "base_model": reference}
    line = loading.run.peft_load_line("runs/r", record)
    assert line == "AutoPeftModelForCausalLM.from_pretrained('runs/r', gguf_file='base.Q4_1.gguf')"
    assert reference["name_or_path"] == str(tmp_path)
    notes = loading.run.run_notes(Path("runs/r"), record)
    assert line in notes and "ctxpatch.load('runs/r')" in notes


def test_eval_takes_a_run_folder_that_load_model_refuses(model_dir, tmp_path):
    run = make_run(model_dir, tmp_path / "run", "window", window=8)
    with pytest.raises(loading.NotAModelFolderError, match="is a ctxpatch fine-tune run"):
        loading.check_model(str(run))
    loading.check_loadable(str(run))
    model, _ = loading.load_for_eval(str(run))
    assert ctxpatch.current_patch(model).spec == "window"
