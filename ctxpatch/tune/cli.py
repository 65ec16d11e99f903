"""`ctxpatch tune`: pick the best training-free spec for a model, a target length and your text.

    ctxpatch tune --model default --target-len 32k --budget 3h --out runs/tune
    ctxpatch tune --model meta-llama/Llama-3.1-8B --target-len 128k --text my_docs/*.txt --out runs/tune-llama
    torchrun --nproc_per_node 2 -m ctxpatch.tune --model default --target-len 16k --budget 2h --out runs/tune
    ctxpatch tune --model default --target-len 32k --schedule runs/tune/schedule.json --out runs/tune-again

A budget in seconds buys a schedule planned from this machine's measured speed; every run saves it
(schedule.json) and --schedule replays it, so the same seed picks the same winner on any machine.

Everything that can be wrong with the input is checked before the model loads: the target length against the
trained length, the budget against the baseline's cost (estimated from the config), the text's token count,
the candidate names, a replayed schedule against them, every option, the --out folder. Only the tokenizer and
the config are read for that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="measure the training-free specs on your model, length and text; pick the best")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M), a folder, a .gguf file, a hub name or chatglm:PATH")
    p.add_argument("--target-len", required=True, help="the context length to reach, e.g. 32k (k = 1024)")
    p.add_argument("--budget", default="1h",
                   help="time for the measurements, e.g. 3h, 45m, 2700 (seconds); the schedule it buys is planned "
                        "from this machine's measured speed, so it depends on the machine and its load: replay a "
                        "run's schedule anywhere with --schedule")
    p.add_argument("--schedule", default=None, metavar="FILE",
                   help="replay the schedule.json an earlier run wrote (same candidates, target and tasks): the same "
                        "seed then picks the same winner on any machine; --budget is not used")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="your text (default: Shakespeare's plays outside the held-out split)")
    p.add_argument("--candidates", default="default",
                   help='"default" (the registry\'s training-free set), or specs: "dca,selfextend[group=16],yarn"; '
                        '"default,logn+window" widens it')
    p.add_argument("--tasks", default="ppl,passkey,niah", help="ppl (required), passkey, niah")
    p.add_argument("--tail", type=int, default=None, help="ppl: tokens scored per window (default min(2048, L/4))")
    p.add_argument("--seed", type=int, default=0, help="seed of every window and prompt")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of candidates kept after each round")
    p.add_argument("--max-steps", type=int, default=16, help="most windows (and depths) per length and candidate")
    p.add_argument("--backend", default="blockwise", help="ctxpatch attention backend (blockwise, dense, flex)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available, per rank)")
    p.add_argument("--out", default="runs/tune", help="folder for tuned.json, tune.md/.json, plots, the log")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (finished measurements kept)")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out")
    p.set_defaults(func=run)


def check_options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option that needs neither the model nor its config, checked: the parsed values."""
    from ..backends import check_backend
    from ..eval.distributed import launch_from_env, resolve_device
    from .api import check_search, check_tasks, parse_target, prepare_out, read_schedule
    from .candidates import parse_candidates
    from .errors import TuneError
    from .schedule import parse_budget

    target, budget, tasks = parse_target(args.target_len), parse_budget(args.budget), check_tasks(args.tasks)
    parse_candidates(args.candidates)
    check_search(args.keep, args.max_steps)
    check_backend(args.backend)
    device = resolve_device(args.device, launch_from_env())
    for path in args.text or []:
        if not Path(path).is_file():
            raise TuneError(f"text file {path!r} does not exist: pass text files to read (--text FILE ...)")
    prepare_out(Path(args.out), args.resume, args.overwrite)
    saved = read_schedule(args.schedule) if args.schedule else None
    if saved is not None and args.resume:
        raise TuneError("--resume continues the run's own schedule: drop --schedule")
    return {"target": target, "budget": budget, "tasks": tasks, "device": device, "schedule": saved}


def run(args: argparse.Namespace) -> int:
    from ..loading import load_base_tokenizer, model_ref
    from ..preflight import info_from_config
    from .api import check_budget, check_target, check_text_windows, default_tail, replay, tune
    from .candidates import build_candidates
    from .errors import BudgetError, TuneError
    from .schedule import cost_from_config, matmul_rate, plan

    options = check_options(args)
    target, budget, tasks, device = options["target"], options["budget"], options["tasks"], options["device"]
    out = Path(args.out)
    ref = model_ref(args.model).unpatched("tune")
    config = ref.config()
    train_len = ref.train_len()
    check_target(target, train_len)
    tail = args.tail or default_tail(train_len)
    if not 0 < tail < train_len:
        raise TuneError(f"tail={tail} must be between 1 and the trained length {train_len}")

    saved = options["schedule"]
    cost = cost_from_config(config, matmul_rate(device))
    if saved is None:
        check_budget(budget, train_len, target, tasks, cost)
    tokenizer = load_base_tokenizer(ref)
    windows = text_windows(tokenizer, args.text, args.seed, args.max_steps)
    tokens, count = windows(target)
    check_text_windows(count, tokens, target)
    cands = None if args.resume else build_candidates(args.candidates, info_from_config(config, train_len), target)
    if saved is not None:
        replay(saved, {"target_len": target, "train_len": train_len, "tasks": tasks,
                       "candidates": [c.label for c in cands.candidates]}, lambda n: windows(n)[1])
    elif cands is not None:
        try:
            plan(len(cands.candidates), train_len, target, tasks, cost, budget, keep=args.keep,
                 max_steps=args.max_steps, windows=lambda n: windows(n)[1])
        except BudgetError as error:
            raise TuneError(f"{error} (estimated from the config, before loading the model)") from None

    rank = start_processes(device)
    started = time.perf_counter()
    model = load(ref, args.dtype, device)
    if rank == 0:
        print(f"loaded {args.model} in {time.perf_counter() - started:.0f}s on {device}", file=sys.stderr)
    result = tune(model, tokenizer, target_len=target, text_files=args.text or None, budget_s=budget,
                  candidates=args.candidates, tasks=tasks, tail=tail, seed=args.seed, keep=args.keep,
                  max_steps=args.max_steps, backend=args.backend, out_dir=out, resume=args.resume,
                  overwrite=args.overwrite, model_name=args.model, fingerprint=safe_fingerprint(args.model, model),
                  progress=True, schedule=saved)
    if rank == 0:
        budget_used = result.tuned["budget"]
        print(f"winner: {result.winner}  ({json.dumps(result.tuned['score'])})")
        print(f"measured {budget_used['measured_s']:.0f}s of a {budget_used['budget_s']:.0f}s budget; wrote "
              f"{out / 'tuned.json'}, {out / 'schedule.json'} (replay: --schedule), tune.md, tune.json and the plots",
              file=sys.stderr)
        print(f"use it: ctxpatch eval --patch {out / 'tuned.json'} ...  or  ctxpatch.apply(model, "
              f"'{out / 'tuned.json'}')", file=sys.stderr)
    return 0


def text_windows(tokenizer: Any, files: list[str] | None, seed: int, most: int):
    """windows(n) -> (tokens counted, perplexity windows of n tokens the text holds)."""
    from ..eval import data
    from .api import read_text

    text, name = read_text(None, files)
    corpus = data.Corpus(data.Encoder(tokenizer), text, name)
    cache: dict[int, tuple[int, int]] = {}

    def windows(n: int) -> tuple[int, int]:
        if n not in cache:
            count = data.windows_apart(corpus, seed, n, most)
            cache[n] = (len(corpus._ids), count)
        return cache[n]

    return windows


def start_processes(device: str) -> int:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group; this process's rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank()


def load(name: Any, dtype: str, device: str):
    from ..loading import load_base_model

    return load_base_model(name, dtype).to(device).eval()


def safe_fingerprint(name: str, model: Any) -> dict[str, Any] | None:
    from ..loading import fingerprint

    try:
        return fingerprint(name, model)
    except (OSError, ValueError):
        return None
