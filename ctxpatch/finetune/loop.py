"""The fine-tune loop: a patched model, peft LoRA, accelerate for devices, processes and state.

Order of work, so that bad input fails before anything is spent:
  1. hardware (a GPU-only setting on CPU), output_dir (exists without resume/overwrite), the
     patch spec (unknown method or parameter) and, for resumption, the recipe against the run's;
  2. tokenizer and data (the split by file, text too short for seq_len), the base model's trained
     length against target_len (pose / randomized / stretched);
  3. the model, the patch (values the engine refuses), peft, then training.

Processes: one by default; `torchrun --nproc_per_node N -m ctxpatch.finetune ...` or
`accelerate launch ...` for N, with gloo on CPU. `global_batch` is per optimizer step over all
processes, so the same recipe computes the same steps on 1 or N processes (accumulation makes up
the difference). Checkpoints go through `Accelerator.save_state` (optimizer, scheduler, RNG states)
with hooks that write the peft adapter instead of the full model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import loading
from .._compat import transformers as hf
from ..errors import CtxpatchError
from . import checkpoints as ckpt
from .data import PackedSamples, TextFiles, TokenSplit, load_split, split_files, validation_samples
from .metrics import append_metrics, plot_losses, progress_bar, read_metrics, truncate_metrics
from .recipe import RESUMABLE_CHANGES, Recipe, RecipeError, parse_yaml, patch_arguments
from .trainable import make_trainable, trainable_parameter_names

StepCallback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """What `train` leaves: the folder, and the trained model (unwrapped peft model, eval mode)."""

    output_dir: Path
    steps: int
    model: nn.Module
    tokenizer: Any
    metrics: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


# ---- checks that need no model -------------------------------------------------------------------


def resolve_device(recipe: Recipe) -> str:
    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device=cuda but no CUDA GPU is visible; use device=cpu (or auto)")
    if recipe.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return recipe.device


def resolve_precision(recipe: Recipe, device: str) -> str:
    """accelerate's mixed_precision: "no", "bf16" or "fp16"; refuses GPU-only settings on CPU."""
    if recipe.precision == "fp16" and device != "cuda":
        raise RecipeError(
            "precision=fp16 needs a CUDA GPU (fp16 mixed precision uses a gradient scaler on the GPU); "
            "on CPU use precision=fp32 or bf16"
        )
    if recipe.precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise RecipeError("precision=bf16 but this GPU has no bfloat16 support; use precision=fp16 or fp32")
    if recipe.precision == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision]


def check_launcher(device: str) -> None:
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true") and device != "cuda":
            raise RecipeError(
                f"the launcher asks for {name}, which needs CUDA GPUs; on CPU launch with torchrun instead"
            )


def check_resumable(recipe: Recipe, output_dir: Path) -> None:
    saved = output_dir / ckpt.RECIPE_FILE
    if not saved.is_file():
        return
    before = parse_yaml(saved.read_text(encoding="utf-8"), str(saved)) or {}
    changed = [k for k in recipe.differences(before) if k.split(".")[0] not in RESUMABLE_CHANGES and k != "output_dir"]
    if changed:
        raise RecipeError(
            f"resume=true, but the recipe differs from the run in {str(output_dir)!r} in: {', '.join(changed)}. "
            f"Resume with the same values (see {saved}), or start a new run (another output_dir, or overwrite=true)"
        )


def check_target_len(recipe: Recipe, train_len: int) -> None:
    scheme = recipe.positions.scheme
    if scheme in ("pose", "randomized", "stretched") and recipe.target_len <= train_len:
        raise RecipeError(
            f"target_len={recipe.target_len} must be larger than the model's trained length ({train_len}) for "
            f"positions.scheme={scheme}: skipped positions are for lengths the model has not seen. Raise target_len, "
            "or use positions.scheme=contiguous to train at the real length"
        )


def accumulation_steps(recipe: Recipe, processes: int) -> int:
    per_step = recipe.micro_batch * processes
    if recipe.global_batch % per_step:
        raise RecipeError(
            f"global_batch={recipe.global_batch} is not a multiple of micro_batch x processes = "
            f"{recipe.micro_batch} x {processes}; change global_batch or micro_batch"
        )
    return recipe.global_batch // per_step


# ---- model, optimizer, evaluation ----------------------------------------------------------------


def load_patched_model(recipe: Recipe, methods: list, apply_kwargs: dict[str, Any]):
    """(base model with the patch applied, the patch)."""
    from ..patch import apply

    model = loading.load_base_model(recipe.model, recipe.model_dtype)
    try:  # target_len: parameters not given come from each method's rule for that length
        patch = apply(model, methods, backend=recipe.backend, target_len=recipe.target_len, fine_tuned=True,
                      **apply_kwargs)
    except (ValueError, TypeError, CtxpatchError) as error:
        raise RecipeError(
            f"the patch {recipe.patch!r} (patch_params {recipe.patch_params}) was refused: {error}"
        ) from None
    if recipe.gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.config.use_cache = False
    return model, patch


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers' activation (gradient) checkpointing, non-reentrant (frozen inputs need no grad)."""
    hf.enable_activation_checkpointing(model, {"use_reentrant": False})


def use_peft_wrap_policy_under_fsdp(accelerator, model: nn.Module) -> None:
    """FSDP without `use_orig_params` needs trainable and frozen tensors in separate units: peft's
    wrap policy (as in peft's FSDP example) gives each LoRA layer its own."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if not plugin.use_orig_params:
        from peft.utils.other import fsdp_auto_wrap_policy

        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def prepare_for_training(accelerator, model: nn.Module, loader, recipe: Recipe) -> tuple:
    """accelerate's prepare for model, optimizer, loader and scheduler. FSDP1 wraps the model into flat
    parameters first, so there the optimizer is built after the model is prepared."""
    from accelerate.utils import DistributedType

    fsdp1 = accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False)
    if fsdp1:
        use_peft_wrap_policy_under_fsdp(accelerator, model)
        model = accelerator.prepare(model)
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe)
    if fsdp1:
        optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
        return model, optimizer, loader, scheduler
    return accelerator.prepare(model, optimizer, loader, scheduler)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=recipe.optim.lr, betas=tuple(recipe.optim.betas), weight_decay=recipe.optim.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe):
    from transformers import get_scheduler

    return get_scheduler(
        recipe.optim.schedule,
        optimizer,
        num_warmup_steps=recipe.optim.warmup_steps,
        num_training_steps=recipe.max_steps,
    )


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy of a packed batch at its position ids."""
    out = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"], use_cache=False
    )
    return out.loss


def evaluate(model: nn.Module, samples: list[dict[str, torch.Tensor]], accelerator) -> float:
    """Mean validation loss (every process computes all of it; the samples are few)."""
    model.eval()
    losses = []
    with torch.no_grad(), accelerator.autocast():
        for sample in samples:
            batch = {k: v.to(accelerator.device) for k, v in sample.items()}
            losses.append(lm_loss(model, batch).float())
    model.train()
    return float(torch.stack(losses).mean())


# ---- the run folder --------------------------------------------------------------------------------


class RunWriter:
    """Writes the adapter, the patch's tensors and ctxpatch.json into a folder (a checkpoint or the
    run itself), from a full state dict so that FSDP / DeepSpeed gathers work the same way."""

    def __init__(self, accelerator, record_base: dict[str, Any], train_len: int, patch, texts: TextFiles):
        self.accelerator, self.base, self.train_len, self.patch = accelerator, record_base, train_len, patch
        self.texts = texts

    def write(self, model: nn.Module, folder: Path, training: dict[str, Any]) -> None:
        state = self.accelerator.get_state_dict(model)  # collective under FSDP: every process calls it
        if not self.accelerator.is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        unwrapped = self.accelerator.unwrap_model(model)
        loading.point_adapter_at_base(unwrapped, self.base)
        # embeddings train through modules_to_save (saved regardless); False skips peft's vocabulary probe of the base
        unwrapped.save_pretrained(str(folder), state_dict=state, safe_serialization=True, save_embedding_layers=False)
        has_params = loading.save_patch_parameters(state, folder)
        record = loading.make_record(
            self.patch,
            self.base,
            "adapter",
            train_len=self.train_len,
            has_patch_parameters=has_params,
            training=training,
        )
        # the text the run trained on, and the text it never read (`ctxpatch eval --model RUN` uses it)
        record["train_text"] = [loading.portable_name(p.resolve()) for p in self.texts.train]
        record["eval_text"] = [loading.portable_name(p.resolve()) for p in self.texts.held_out]
        loading.write_json(folder / loading.CTXPATCH_JSON, record)
        loading.write_run_notes(folder, record)


def write_recipe(recipe: Recipe, output_dir: Path) -> None:
    from .._version import __version__

    header = (
        f"# recipe as run by ctxpatch {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        f"# command: {' '.join(sys.argv)}\n"
    )
    (output_dir / ckpt.RECIPE_FILE).write_text(recipe.to_yaml(header), encoding="utf-8")


# ---- the loop --------------------------------------------------------------------------------------


@dataclass
class Preflight:
    """What the checks that need no model settle: where, on what, under which patch."""

    device: str
    precision: str
    output_dir: Path
    methods: list
    apply_kwargs: dict[str, Any]


def preflight(recipe: Recipe) -> Preflight:
    """Every check that needs neither data nor model (errors are `RecipeError`s saying what to do)."""
    device = resolve_device(recipe)
    precision = resolve_precision(recipe, device)
    check_launcher(device)
    output_dir = Path(recipe.output_dir)
    ckpt.check_output_dir(output_dir, recipe.resume, recipe.overwrite)
    if recipe.resume:
        check_resumable(recipe, output_dir)
    methods, apply_kwargs = patch_arguments(recipe)
    return Preflight(device, precision, output_dir, methods, apply_kwargs)


class FineTune:
    """One run of a recipe: set up (data, model, peft, accelerate), resume, step, checkpoint, finish."""

    def __init__(self, recipe: Recipe, checked: Preflight):
        from accelerate import Accelerator

        self.recipe, self.checked, self.output_dir = recipe, checked, checked.output_dir
        self.accelerator = Accelerator(
            cpu=checked.device == "cpu", mixed_precision=checked.precision, step_scheduler_with_optimizer=False
        )
        self.accum = accumulation_steps(recipe, self.accelerator.num_processes)
        self.accelerator.gradient_accumulation_steps = self.accum
        self.main = self.accelerator.is_main_process
        self.tokens_per_step = recipe.global_batch * recipe.seq_len
        self.step, self.elapsed_before = 0, 0.0

    # ---- set up ---------------------------------------------------------------------------------

    def load_data(self) -> None:
        """Tokenizer, packed windows and the target_len check: all before the model loads."""
        r = self.recipe
        self.texts = split_files(r.data.files, r.data.eval_files, r.data.holdout)
        self.tokenizer = loading.load_base_tokenizer(r.model, r.tokenizer, r.trust_remote_code)
        train_files = [] if self.texts.default else [str(p) for p in self.texts.train]
        self.split: TokenSplit = load_split(self.tokenizer, train_files, r.seq_len, r.data.val_sequences)
        self.train_len = loading.base_train_len(r.model)
        check_target_len(r, self.train_len)
        p = r.positions
        self.val_samples = validation_samples(self.split, p.scheme, r.target_len, r.seed, p.chunks, p.distribution)
        self.val_contiguous = (
            validation_samples(self.split, "contiguous", r.target_len, r.seed, 1)
            if r.positions.scheme != "contiguous"
            else None
        )

    def build(self) -> None:
        """Model + patch + peft, the run folder, and accelerate's prepared objects."""
        from accelerate.utils import set_seed

        r = self.recipe
        set_seed(r.seed)
        model, self.patch = load_patched_model(r, self.checked.methods, self.checked.apply_kwargs)
        base = {
            "model": r.model,
            "dtype": r.model_dtype,
            "tokenizer": r.tokenizer,
            "trust_remote_code": r.trust_remote_code,
            "fingerprint": loading.fingerprint(r.model, model) if self.main else None,
            **loading.base_reference(r.model),  # name_or_path, gguf_file: what peft and other tools load
        }
        model = make_trainable(model, self.patch, r)
        self.trainable = trainable_parameter_names(model)
        self.resume_from = ckpt.latest_checkpoint(self.output_dir) if r.resume else None
        self.create_output_dir()
        p = r.positions
        dataset = PackedSamples(
            self.split.train, r.max_steps * r.global_batch, p.scheme, r.target_len, r.seed, p.chunks, p.distribution
        )
        # its own generator: creating the loader's iterator must not draw from the global RNG (dropout)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=r.micro_batch, shuffle=False, generator=torch.Generator().manual_seed(r.seed)
        )
        self.model, self.optimizer, self.loader, self.scheduler = prepare_for_training(
            self.accelerator, model, loader, r
        )
        self.writer = RunWriter(self.accelerator, base, self.train_len, self.patch, self.texts)
        self.accelerator.register_save_state_pre_hook(self._save_model_hook)
        self.accelerator.register_load_state_pre_hook(self._load_model_hook)

    def create_output_dir(self) -> None:
        self.accelerator.wait_for_everyone()  # every process has checked output_dir before it changes
        if self.main:
            if self.output_dir.exists() and self.recipe.overwrite:
                ckpt.clear_output_dir(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_recipe(self.recipe, self.output_dir)
        self.accelerator.wait_for_everyone()

    def training_info(self, **extra: Any) -> dict[str, Any]:
        r = self.recipe
        return {
            "steps": self.step,
            "seq_len": r.seq_len,
            "target_len": r.target_len,
            "position_scheme": r.positions.scheme,
            **({"position_distribution": r.positions.distribution} if r.positions.scheme == "stretched" else {}),
            "global_batch": r.global_batch,
            "processes": self.accelerator.num_processes,
            "train_tokens_available": int(self.split.train.numel()),
            **extra,
        }

    def describe(self) -> str:
        r, a = self.recipe, self.accelerator
        values = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return (
            f"ctxpatch finetune: {r.model} under {self.patch.spec!r} -> {self.output_dir}\n"
            f"  {len(self.trainable)} trainable tensors ({values:,} values); {a.num_processes} process(es) on "
            f"{self.checked.device}, {a.distributed_type.value}, precision {self.checked.precision}; global batch "
            f"{r.global_batch} = {r.micro_batch} x {a.num_processes} x {self.accum} accumulation; "
            f"{self.tokens_per_step} tokens/step; positions {r.positions.scheme} in [0, {r.target_len}); "
            f"{self.split.train.shape[0]} training windows of {r.seq_len} tokens from {len(self.texts.train)} file(s), "
            f"{self.split.validation.shape[0]} held apart for validation; {len(self.texts.held_out)} file(s) held "
            "apart for evaluation"
        )

    # ---- checkpoints (accelerate's save_state / load_state, with the adapter instead of the model) -------

    def _save_model_hook(self, models: list, weights: list, folder: str) -> None:
        if weights:
            weights.pop()  # the adapter is written instead; accelerate need not save the whole model
        self.writer.write(models[0], Path(folder), self.training_info())

    def _load_model_hook(self, models: list, folder: str) -> None:
        if not models:  # FSDP: accelerate restored the model itself
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(models.pop())
        set_peft_model_state_dict(unwrapped, load_file(str(Path(folder) / "adapter_model.safetensors")))
        loading.load_patch_parameters(unwrapped, Path(folder))

    def save_checkpoint(self, elapsed: float) -> None:
        """checkpoint-N.tmp, written by every process, then renamed to checkpoint-N."""
        a = self.accelerator
        tmp, final = ckpt.temporary_path(self.output_dir, self.step), ckpt.final_path(self.output_dir, self.step)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        a.wait_for_everyone()
        a.save_state(str(tmp))
        if self.main:
            loading.write_json(tmp / ckpt.STATE_FILE, {"step": self.step, "elapsed_s": elapsed})
        a.wait_for_everyone()
        if self.main:
            ckpt.publish(tmp, final)
            ckpt.prune(self.output_dir, self.recipe.keep_checkpoints)
        a.wait_for_everyone()

    def resume(self) -> None:
        if self.resume_from is not None:
            self.accelerator.load_state(str(self.resume_from))
            state = json.loads((self.resume_from / ckpt.STATE_FILE).read_text(encoding="utf-8"))
            self.step, self.elapsed_before = int(state["step"]), float(state["elapsed_s"])
            self.accelerator.print(f"resuming from {self.resume_from} (step {self.step})")
        if self.main:
            truncate_metrics(self.output_dir, self.step)

    # ---- steps ----------------------------------------------------------------------------------

    def micro_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one micro-batch; the optimizer steps when accumulation is complete."""
        a = self.accelerator
        with a.accumulate(self.model):
            loss = lm_loss(self.model, batch)
            a.backward(loss)
            if a.sync_gradients:
                self.grad_norm = a.clip_grad_norm_(self.model.parameters(), self.recipe.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    def step_metrics(self, micro_losses: list[torch.Tensor], started: float, first_step: int) -> dict[str, Any]:
        r, now = self.recipe, time.perf_counter()
        row = {
            "step": self.step,
            "loss": float(self.accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean")),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s": (self.step - first_step) * self.tokens_per_step / max(now - started, 1e-9),
            "elapsed_s": self.elapsed_before + now - started,
        }
        if self.step % r.eval_every == 0 or self.step == r.max_steps:
            row["val_loss"] = evaluate(self.model, self.val_samples, self.accelerator)
            if self.val_contiguous is not None:
                row["val_loss_contiguous"] = evaluate(self.model, self.val_contiguous, self.accelerator)
        return row

    def run_steps(self, on_step: StepCallback | None) -> float:
        """Train from self.step to max_steps; returns the wall time of the whole run (all launches)."""
        r = self.recipe
        self.model.train()
        self.grad_norm = None
        started, first_step = time.perf_counter(), self.step
        bar = progress_bar(r.max_steps, self.step, r.progress and self.accelerator.is_local_main_process)
        loader = self.accelerator.skip_first_batches(self.loader, self.step * self.accum) if self.step else self.loader
        micro_losses: list[torch.Tensor] = []
        for batch in loader if self.step < r.max_steps else []:
            micro_losses.append(self.micro_step(batch))
            if not self.accelerator.sync_gradients:
                continue
            self.scheduler.step()
            self.step += 1
            row = self.step_metrics(micro_losses, started, first_step)
            micro_losses.clear()
            if self.main and (self.step % r.log_every == 0 or "val_loss" in row or self.step == r.max_steps):
                append_metrics(self.output_dir, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            if self.step % r.checkpoint_every == 0 or self.step == r.max_steps:
                self.save_checkpoint(row["elapsed_s"])
            if on_step is not None:
                on_step(self.step, row)
        bar.close()
        return self.elapsed_before + time.perf_counter() - started

    # ---- finish ---------------------------------------------------------------------------------

    def finish(self, wall: float) -> TrainResult:
        """Adapter, patch tensors, ctxpatch.json, tokenizer and loss.png in output_dir."""
        a, r = self.accelerator, self.recipe
        a.wait_for_everyone()
        metrics = read_metrics(self.output_dir) if self.main else []
        evaluated = [row for row in metrics if "val_loss" in row]
        final_val = {
            k: evaluated[-1][k] for k in ("val_loss", "val_loss_contiguous") if evaluated and k in evaluated[-1]
        }
        self.writer.write(self.model, self.output_dir, self.training_info(wall_time_s=round(wall, 1), **final_val))
        if self.main:
            self.tokenizer.save_pretrained(str(self.output_dir))
            plot_losses(self.output_dir, f"{r.model} | {self.patch.spec} | {r.positions.scheme} to {r.target_len}")
            a.print(
                f"done: {self.step} steps in {wall:.0f}s; adapter, ctxpatch.json, metrics.jsonl and loss.png in "
                f"{self.output_dir}"
            )
        a.wait_for_everyone()
        model = a.unwrap_model(self.model).eval()
        return TrainResult(self.output_dir, self.step, model, self.tokenizer, metrics, wall)


def train(recipe: Recipe, on_step: StepCallback | None = None) -> TrainResult:
    """Run a validated recipe; returns the trained model and where its files are.

    `on_step(step, metrics)` is called after each optimizer step (and its checkpoint, if any).
    """
    run = FineTune(recipe, preflight(recipe))
    run.load_data()
    run.build()
    run.resume()
    run.accelerator.print(run.describe())
    return run.finish(run.run_steps(on_step))
