"""`ctxpatch eval`, `ctxpatch compare` and `ctxpatch tasks`.

    ctxpatch eval --model default --patch "logn+window" --lengths 8k,16k --tasks ppl,passkey
    ctxpatch compare --patches "none,dynamic,yarn[factor=4],logn+window" --lengths 8k,16k --out runs/compare

Everything the user typed is checked before the model is loaded (loading SmolLM2 takes ~20 s on 2 cores).
Data parallel: `torchrun --nproc_per_node N -m ctxpatch compare ...` (or `accelerate launch -m ctxpatch ...`)
splits the requests over N processes and writes the same leaderboard, once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

from ..errors import ModelPathError
from .errors import EvalError
from .options import CTXPATCH_TASKS, RULER_OFFLINE, Spec, eval_spec, eval_specs, parse_params

BACKENDS = ("blockwise", "dense", "flex")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate one patch on long-context tasks (lm-eval)")
    p.add_argument("--patch", default="none",
                   help="a spec, e.g. 'logn+window', 'yarn[factor=4]', 'hybrid[window=64]+rerope[window=32]' or a "
                   ".json spec file; 'none' = unpatched")
    add_common(p)
    p.set_defaults(func=run_eval)
    p = sub.add_parser("compare", help="evaluate several patches on the same data: leaderboard + plots")
    p.add_argument("--patches", default="none,dynamic,logn+window",
                   help="comma-separated specs, each method optionally with its own [k=v,...]; 'none' = unpatched")
    add_common(p)
    p.set_defaults(func=run_compare)
    p = sub.add_parser("tasks", help="list ctxpatch's lm-eval tasks and the folder to pass to lm_eval --include_path")
    p.set_defaults(func=list_tasks)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M), a folder (a ctxpatch run folder too), a .gguf file or a hub name")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a patch parameter for every method taking it (repeatable)")
    p.add_argument("--lengths", default="8k,16k", help="comma-separated token lengths, e.g. 8k,16k,32k (k = 1024)")
    p.add_argument("--tasks", default="ppl,passkey",
                   help=f"comma-separated: {', '.join(CTXPATCH_TASKS)}, or RULER's {', '.join(RULER_OFFLINE)}")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="text file(s) for ppl and niah, or held-out / train: those of Shakespeare's plays "
                   "(default: all the plays)")
    p.add_argument("--depths", default="5", help="needle depths: fractions '0,0.5,1' or a count (default 5)")
    p.add_argument("--samples", type=int, default=1, help="windows (ppl) or prompts per depth (passkey, niah) per length")
    p.add_argument("--tail", type=int, default=None,
                   help="ppl: score the last this many tokens of each window (default: min(2048, shortest length / 2))")
    p.add_argument("--seed", type=int, default=0, help="seed of every generated prompt and window")
    p.add_argument("--max-length", type=int, default=None, help="lm-eval max_length (default: longest length + 256)")
    p.add_argument("--backend", default="blockwise", choices=BACKENDS, help="ctxpatch attention backend")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto: the checkpoint's own (default: float32 on the CPU, auto on a GPU; "
                   "a run folder: the dtype it was trained in)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu; under torchrun each "
                   "process takes cuda:LOCAL_RANK)")
    p.add_argument("--device-map", default=None, choices=["auto"],
                   help="auto: spread a model larger than one GPU over all of them (accelerate); one process")
    p.add_argument("--target-len", default=None, metavar="N|auto",
                   help="tokens the patch should reach, passed to ctxpatch.apply: parameters not given follow each "
                   "method's rule for it (e.g. 32k); auto: each measured length is its own target")
    p.add_argument("--out", default=None,
                   help="folder for leaderboard.md/.json, the plots and scores.jsonl (every score as computed) "
                   "(default: a new runs/VERB-YYYYmmdd-HHMMSS)")
    p.add_argument("--reference", default="model", choices=["model", "base"],
                   help="what scores the perplexity's native-context reference: the model as evaluated, or base: "
                   "the unpatched base of a ctxpatch run folder (a fine-tune's yardstick)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out: scores already in its scores.jsonl are not computed again")
    again.add_argument("--overwrite", action="store_true", help="start again in an --out that holds scores")
    p.add_argument("--report", action="store_true",
                   help="run no forward: the leaderboard of the scores --out holds so far (a run in progress or "
                   "killed; same options as the run), '–' where a forward is still to run")


def run_eval(args: argparse.Namespace) -> int:
    shared = parse_params(args.param)
    spec = eval_spec(args.patch, shared)
    if shared and spec.is_none:
        raise EvalError(f"--param {', '.join(shared)} is given without a patch: add --patch SPEC (or drop --param)")
    return run(args, [spec])


def run_compare(args: argparse.Namespace) -> int:
    return run(args, eval_specs(args.patches, parse_params(args.param)))


def check_before_loading(args: argparse.Namespace, specs: list[Spec], config):
    """Everything the config alone settles: the model path, the plan of every spec on this model's layers,
    the lengths against max_length, the perplexity tail against the trained length."""
    from ..loading import model_ref
    from ..preflight import check_plan, info_from_config, warn_if_not_longer
    from .runner import check_out, check_report

    ref = model_ref(args.model)
    if args.report:
        check_report(config, args.out, args.overwrite)
    if args.out:
        check_out(args.out, args.resume or args.report, args.overwrite)
    if args.reference == "base" and not ref.carries_patch:
        raise EvalError(f"--reference base needs a ctxpatch run folder as --model ({args.model!r} is not one): the "
                        "base of a plain model is the model itself, its reference by default")
    if ref.carries_patch:
        if any(not s.is_none for s in specs):
            raise EvalError(
                f"{args.model!r} carries its own patch (a ctxpatch run folder); it is evaluated as loaded: "
                "drop --patch/--patches (or pass 'none')"
            )
        if config.target_len is not None:
            raise EvalError(f"{args.model!r} carries its own patch, applied as it loads: a target length cannot "
                            "change it; drop --target-len")
        return
    if config.max_length is not None and config.max_length < max(config.lengths):
        raise EvalError(
            f"--max-length {config.max_length} is shorter than the longest length ({max(config.lengths)}): "
            "raise it, or leave it out (default: longest length + 256)"
        )
    info = info_from_config(ref.config())
    if info is not None and "ctxpatch_ppl" in config.tasks and config.tail is not None and config.tail >= info.train_len:
        raise EvalError(
            f"--tail {config.tail} must be shorter than the model's trained length ({info.train_len}): the native "
            "reference scores the same tail within it; pass a smaller --tail"
        )
    target = config.target_len if isinstance(config.target_len, int) else None  # "auto": each length its own
    if info is not None and any(not s.is_none for s in specs):
        warn_if_not_longer(target, info.train_len)
    for spec in specs:
        if not spec.is_none:
            check_plan(spec.parsed.methods, spec.params, info)  # the spec itself, then at its target
            if target is not None:
                check_plan(spec.parsed.methods, spec.params, info, target)


def run(args: argparse.Namespace, specs: list[Spec]) -> int:
    from ..loading import base_name, display_name, held_apart_text, load_base_for_eval, load_for_eval
    from ..loading.reference import WHAT_TO_GIVE
    from . import distributed
    from .runner import EvalConfig, compare

    if args.max_length is not None and args.max_length <= 0:
        raise EvalError(f"--max-length {args.max_length} must be a positive number of tokens")
    if args.resume and not args.out:
        raise EvalError("--resume continues a run: name its folder with --out FOLDER")

    text_files = args.text or held_apart_text(args.model)  # a run folder: the text its fine-tune never read
    config = EvalConfig(
        lengths=args.lengths, tasks=args.tasks, depths=args.depths, samples=args.samples, tail=args.tail,
        seed=args.seed, text_files=text_files, max_length=args.max_length, backend=args.backend,
        target_len=args.target_len,
    )
    launch = distributed.launch_from_env()
    device = distributed.resolve_device(args.device, launch, args.device_map)
    check_before_loading(args, specs, config)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        model, tokenizer = load_for_eval(args.model, dtype=args.dtype, device=device, device_map=args.device_map)
        base = None
        if args.reference == "base":
            base, _ = load_base_for_eval(args.model, dtype=args.dtype, device=device, device_map=args.device_map)
    except OSError as error:  # transformers' word for a model it cannot find or read
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelPathError(f"cannot load model {args.model!r} ({first}): {WHAT_TO_GIVE}") from None
    say = print if launch.is_main else (lambda *a, **k: None)
    say(f"loaded {args.model} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    out = Path(args.out) if args.out else fresh_run_folder(args.verb)
    try:
        board = compare(model, tokenizer, specs, config=config, out_dir=out, name=display_name(args.model),
                        launch=launch, resume=args.resume, overwrite=args.overwrite, reference_model=base,
                        reference_name=base_name(args.model) if base is not None else None, report=args.report)
    finally:
        distributed.finish(launch)
    say(board.markdown())
    seconds = ", ".join(f"{k} {v:.0f}s" for k, v in board.seconds.items())
    processes = f" on {launch.world_size} processes" if launch.distributed else ""
    say(f"{board.forwards} forward passes{processes} in {time.perf_counter() - started:.0f}s ({seconds})"
        + (f"; {board.unscored} not scored yet" if board.unscored else ""), file=sys.stderr)
    say(f"wrote {out / 'leaderboard.md'}, leaderboard.json and the plots", file=sys.stderr)
    return 0


def fresh_run_folder(verb: str, root: Path = Path("runs")) -> Path:
    """runs/VERB-YYYYmmdd-HHMMSS, with -2, -3, ... when that folder exists already."""
    base = root / f"{verb}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def list_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS_DIR

    print(f"lm-eval include path: {TASKS_DIR}")
    for short, name in CTXPATCH_TASKS.items():
        print(f"  {name:<22} (ctxpatch eval --tasks {short})")
    print(f"RULER tasks that run offline through ctxpatch: {', '.join(RULER_OFFLINE)}")
    print(f"example: lm_eval --include_path {TASKS_DIR} --tasks ctxpatch_passkey --model hf "
          "--device cpu --model_args pretrained=FOLDER,max_length=16640 --metadata '{\"lengths\": [8192, 16384]}'")
    print(f"patched: python -m ctxpatch.eval.harness --include_path {TASKS_DIR} --tasks ctxpatch_passkey "
          "--model ctxpatch --model_args pretrained=FOLDER,patch=selfextend,target_len=16384")
    return 0
