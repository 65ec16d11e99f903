"""`evaluate` and `compare`: lm-eval tasks on an in-memory model, one patch spec after another.

    board = ctxpatch.eval.compare(model, tokenizer, ["none", "dynamic", "logn+window"], lengths=[8192, 16384])
    print(board.markdown())

Every spec sees the same data: the tasks are loaded once (their data generated once, from the seed) and
evaluated with `lm_eval.evaluator.evaluate` under each spec in turn, through `CtxpatchLM`. The perplexity
task's native-context reference is evaluated once, on the model as given (unpatched, or with the patch it
carries) or on `reference_model` (a fine-tune's unpatched base), and shared by every spec. Cost per spec and
length: one forward per perplexity window and one per passkey/needle depth and sample; the reference adds one
forward of min(n, train_len) tokens per window.

`target_len` is passed to `ctxpatch.apply`: every parameter a spec leaves out comes from its method's rule for
that length. `target_len="auto"` makes each measured length its own target: a spec is applied once per length
and measured at that length only, and a spec that refuses a target (`ValueError`, e.g. `string` past 2L - W)
gets a "refused" cell for that length instead of stopping the comparison.

`report=True` runs no forward: the leaderboard of the scores already in `out_dir`'s scores.jsonl (a run in
progress, or killed), with "–" where a forward is still to run and the count of those in `Leaderboard.unscored`.

Under torchrun / accelerate launch the requests are split over the processes (see `distributed`); every
process ends with the same leaderboard and only rank 0 writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import patch as patching
from .._compat import transformers as hf
from ..adapters.base import train_len as config_train_len
from ..jsonlog import JsonLog
from . import distributed, ruler, sources
from .errors import EvalError
from .lm import CtxpatchLM
from .options import RULER_OFFLINE, Spec, eval_spec, parse_depths, parse_length, parse_lengths, parse_tasks
from .report import Leaderboard, Record
from .tasks import TASKS_DIR

log = logging.getLogger(__name__)

PPL_FULL, PPL_NATIVE = "ctxpatch_ppl_full", "ctxpatch_ppl_native"
SCORES, RUN = "scores.jsonl", "run.json"  # in out_dir: every score as computed; the model setup they belong to
TEXT_TASKS = ("ctxpatch_ppl", "ctxpatch_niah", "ctxpatch_niah_gen")  # the tasks that read --text
LOGGED_TASKS = ("ctxpatch_ppl", "ctxpatch_passkey", "ctxpatch_niah")  # scored by log-likelihood: in scores.jsonl
AUTO = "auto"


@dataclass
class EvalConfig:
    """What to measure: the same for every spec of a comparison."""

    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: ["ctxpatch_ppl", "ctxpatch_passkey"])
    depths: list[float] = field(default_factory=lambda: list(sources.DEFAULT_DEPTHS))
    samples: int = 1
    tail: int | None = None  # default: min(2048, shortest length // 2), and below the trained length
    seed: int = 0
    text_files: list[str] | None = None  # files, or the words "held-out" / "train" / "all" (Shakespeare's plays)
    max_length: int | None = None  # default: the largest length + ruler.LENGTH_MARGIN
    backend: str = "blockwise"
    target_len: int | str | None = None  # passed to ctxpatch.apply; "auto": each length is its own target

    def __post_init__(self) -> None:
        self.lengths = parse_lengths(self.lengths)
        self.tasks = parse_tasks(self.tasks)
        self.depths = parse_depths(self.depths)
        self.target_len = parse_target_len(self.target_len)
        if self.tail is not None and "ctxpatch_ppl" in self.tasks and not 0 < self.tail < min(self.lengths):
            fix = "a positive --tail" if self.tail <= 0 else "a smaller --tail"
            raise EvalError(
                f"tail={self.tail}: the perplexity task scores the last `tail` tokens of each window, so it must be "
                f"between 1 and the shortest length ({min(self.lengths)}) minus 1: pass {fix}"
            )
        if self.samples < 1:
            raise EvalError(f"samples={self.samples}: ask for at least one sample per length")
        self.text_files = sources.resolve_text_files(self.text_files)
        for path in self.text_files or []:
            if not Path(path).is_file():
                raise EvalError(f"text file {path!r} does not exist: pass text files to read (--text FILE ...), "
                                "or held-out / train for Shakespeare's plays")

    def with_defaults(self, train_len: int) -> EvalConfig:
        """This config with the defaults that depend on the model filled in (the perplexity tail)."""
        if self.tail is not None:
            return self
        return dataclasses.replace(self, tail=sources.default_tail(self.lengths, train_len))

    def targets(self, spec: Spec) -> list[tuple[int | None, list[int]]]:
        """(target_len passed to apply, lengths measured under it) for a spec; "none" has no target."""
        if spec.is_none or self.target_len is None:
            return [(None if spec.is_none else self.target_len, self.lengths)]
        if self.target_len == AUTO:
            return [(n, [n]) for n in self.lengths]
        return [(self.target_len, self.lengths)]

    def text_files_used(self) -> list[str] | None:
        """The text files the tasks read (None: no task reads text)."""
        if not any(t in TEXT_TASKS for t in self.tasks):
            return None
        from ..loading.assets import play_files, portable_name

        return [portable_name(p) for p in self.text_files or play_files()]

    @property
    def context_length(self) -> int:
        return self.max_length or max(self.lengths) + ruler.LENGTH_MARGIN

    def lm_eval_tasks(self) -> list[str]:
        """lm-eval task names; the perplexity group becomes its full-context task (the native one runs apart)."""
        return [PPL_FULL if t == "ctxpatch_ppl" else t for t in self.tasks]


def parse_target_len(value: int | str | None) -> int | str | None:
    """None, "auto", or a length ("32k", 32768) as tokens."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None if value is None else AUTO
    try:
        return parse_length(value)
    except EvalError:
        raise EvalError(f"target length {value!r} is not a number of tokens (e.g. 32k) or 'auto'") from None


def evaluate(model: Any, tokenizer: Any, spec: str | Spec = "none", *, params: dict[str, Any] | None = None,
             **kwargs: Any) -> Leaderboard:
    """Evaluate one spec ("none" = the model as given) with `params`; other keywords as for `compare`."""
    spec = spec if isinstance(spec, Spec) else eval_spec(spec, params)
    return compare(model, tokenizer, [spec], **kwargs)


def compare(model: Any, tokenizer: Any, specs: Sequence[str | Spec], *, out_dir: str | Path | None = None,
            name: str | None = None, launch: distributed.Launch | None = None, resume: bool = False,
            overwrite: bool = False, reference_model: Any = None, reference_name: str | None = None,
            report: bool = False, **config: Any) -> Leaderboard:
    """Evaluate every spec on the same data; returns (and, with `out_dir`, writes) the leaderboard.

    Keyword arguments are `EvalConfig` fields (or `config=EvalConfig(...)`); `name` labels the model. Under a
    launcher (`launch`, default: from the environment) the work is split over the processes; each returns the
    whole leaderboard, and rank 0 alone writes it. With `out_dir` every score is written to `scores.jsonl` as it
    is computed; `resume=True` reuses the scores there (same model, dtype and backend), `overwrite=True` drops
    them; a folder holding scores with neither is refused. `reference_model` (same tokenizer) scores the
    perplexity's native-context reference instead of `model` as given: e.g. the unpatched base of a fine-tune,
    labelled `reference_name` (default: the folder it was loaded from).
    `report=True` computes nothing: the leaderboard of the scores `out_dir` holds so far."""
    cfg = config.pop("config", None) or EvalConfig(**config)
    if report:
        check_report(cfg, out_dir, overwrite)
    launch = launch or distributed.launch_from_env()
    specs = [s if isinstance(s, Spec) else eval_spec(s) for s in specs]
    train_len = config_train_len(model.config)
    cfg = cfg.with_defaults(train_len)
    carried = patching.current_patch(model)
    check_specs(specs, carried, cfg)
    refused = check_specs_apply(model, specs, cfg)
    as_given = f"{carried.spec} (carried)" if carried else "none"  # the model's state with no spec applied
    reference = as_given
    if reference_model is not None:
        reference = f"{reference_name or model_name(reference_model)} (unpatched base)"
    placed = {"device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype)}
    board = Leaderboard(model_name=name or model_name(model), train_len=train_len,
                        config={**describe(cfg), **placed}, reference=reference)
    setup = {"model": board.model_name, "dtype": placed["dtype"], "backend": cfg.backend, "reference": reference}
    scores = score_log(out_dir, setup, resume or report, overwrite, launch)
    for (label, length), reason in refused.items():
        board.refused.setdefault(label, {})[length] = reason
    with tempfile.TemporaryDirectory(prefix="ctxpatch-eval-") as scratch:
        tasks = load_tasks(cfg, tokenizer, train_len, Path(scratch))
        lm = CtxpatchLM(model, tokenizer, max_length=cfg.context_length, state=as_given, launch=launch,
                        score_log=scores, scored_only=report)
        if launch.is_main:
            announce(cfg, specs, train_len, tasks)
        native_lm = lm if reference_model is None else CtxpatchLM(
            reference_model, tokenizer, max_length=cfg.context_length, state=reference, launch=launch, score_log=scores,
            scored_only=report)
        if PPL_NATIVE in tasks["native"]["tasks"]:
            board.records += run_tasks(native_lm, tasks["native"], "reference", cfg)
        for spec in tqdm(specs, desc="specs", disable=len(specs) < 2 or not launch.is_main):
            row = as_given if spec.is_none else spec.label  # a loaded run's row names the patch it carries
            started = time.perf_counter()
            for target, lengths in cfg.targets(spec):
                if (spec.label, lengths[0]) in refused:
                    continue
                with applied(model, spec, cfg.backend, target) as patch:
                    lm.state = as_given if spec.is_none else state_label(spec, target)
                    if patch is not None:
                        board.patches.setdefault(spec.label, {})[str(target)] = patch.to_dict()
                    measured = None if lengths == cfg.lengths else lengths
                    board.records += run_tasks(lm, tasks["main"], row, cfg, measured)
            board.seconds[row] = time.perf_counter() - started
    board.forwards = lm.forwards + (native_lm.forwards if native_lm is not lm else 0)
    board.unscored = lm.unscored + (native_lm.unscored if native_lm is not lm else 0)
    if out_dir is not None and launch.is_main:
        board.write(Path(out_dir))
    return board


SETUP_OPTIONS = {"model": "--model", "dtype": "--dtype", "backend": "--backend", "reference": "--reference"}


def score_log(out_dir: str | Path | None, identity: dict[str, Any], resume: bool, overwrite: bool,
              launch: distributed.Launch) -> JsonLog | None:
    """The scores of `out_dir` (None: none kept), checked against what this run measures with."""
    if out_dir is None:
        return None
    folder = Path(out_dir)
    starting_again = overwrite and not resume
    log, run_file = JsonLog(folder / SCORES, read=not starting_again), folder / RUN
    check_out(folder, resume, overwrite)
    earlier = json.loads(run_file.read_text(encoding="utf-8")) if resume and log and run_file.is_file() else None
    if earlier is not None and earlier != identity:
        keys = [k for k, v in identity.items() if earlier.get(k) != v]
        changed = ", ".join(f"{k} {earlier.get(k)!r} -> {identity[k]!r}" for k in keys)
        options = " and ".join(SETUP_OPTIONS.get(k, k) for k in keys)
        raise EvalError(f"{folder} was measured with another model setup ({changed}): resume with the same "
                        f"{options} as that run, or pass a new --out")
    if starting_again and launch.is_main and log:
        log.path.unlink()
    if launch.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=1), encoding="utf-8")
    return log


def check_report(cfg: EvalConfig, out_dir: str | Path | None, overwrite: bool) -> None:
    """A report reads the scores of a run: its folder must hold some, and every task must be one they record."""
    generated = [t for t in cfg.tasks if t not in LOGGED_TASKS]
    if generated:
        raise EvalError(f"--report reads scores.jsonl, which keeps log-likelihood scores only, not the answers of "
                        f"{', '.join(generated)}: drop {'it' if len(generated) == 1 else 'them'} from --tasks")
    if overwrite:
        raise EvalError("--report reads the scores --overwrite would drop: pass one of them")
    if out_dir is None or not JsonLog(Path(out_dir) / SCORES):
        raise EvalError(f"--report reads the scores of a run, and {out_dir or 'no --out'} holds none: name the run's "
                        "folder with --out (the same options as the run), or run it first")


def check_out(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    if JsonLog(Path(out_dir) / SCORES) and not (resume or overwrite):
        raise EvalError(f"{out_dir} holds the scores of an earlier run: pass --resume to continue it (finished "
                        "forwards are kept), --overwrite to start again, or a new --out")


def state_label(spec: Spec, target: int | None) -> str:
    """What the model is under a spec and target: the key of CtxpatchLM's score cache."""
    return spec.label if target is None else f"{spec.label}@{target}"


def check_specs(specs: list[Spec], carried: Any, cfg: EvalConfig | None = None) -> None:
    if carried is not None and any(not s.is_none for s in specs):
        raise EvalError(
            f"this model already carries the patch {carried.spec!r} (loaded with it): evaluate it as loaded "
            "(no --patch, or --patch none), or load the base model to compare other patches"
        )
    if carried is not None and cfg is not None and cfg.target_len is not None:
        raise EvalError(
            f"this model carries the patch {carried.spec!r}, applied when it was loaded: a target length cannot "
            "change it; drop --target-len"
        )


def check_specs_apply(model: Any, specs: list[Spec], cfg: EvalConfig) -> dict[tuple[str, int], str]:
    """Apply and remove every spec at every target before measuring anything: a bad parameter fails now, not
    hours in. Returns {(spec label, length): reason} for the lengths at which a spec refuses its own target
    (`target_len="auto"` only: an explicit target that a spec refuses is an error)."""
    refused = {}
    for spec in specs:
        if spec.is_none:
            continue
        with applied(model, spec, cfg.backend, None):  # the spec itself: wrong parameters fail here, always
            pass
        for target, lengths in cfg.targets(spec):
            try:
                with applied(model, spec, cfg.backend, target):
                    pass
            except ValueError as error:
                if cfg.target_len != AUTO:
                    raise
                refused[(spec.label, lengths[0])] = str(error)
    return refused


@contextlib.contextmanager
def applied(model: Any, spec: Spec, backend: str, target_len: int | None = None) -> Iterator[Any]:
    """The spec applied to the model (at `target_len`) for the block ("none": nothing), removed after; yields
    the `Patch` (None for "none")."""
    patch = None
    if not spec.is_none:
        patch = patching.apply(model, spec.spec, backend=backend, target_len=target_len, **spec.params)
    try:
        yield patch
    finally:
        if patch is not None:
            patch.remove()


def model_name(model: Any) -> str:
    return hf.model_source(model.config) or type(model).__name__


def describe(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "lengths": cfg.lengths, "tasks": cfg.tasks, "depths": cfg.depths, "samples": cfg.samples,
        "tail": cfg.tail, "seed": cfg.seed, "text_files": cfg.text_files_used(), "max_length": cfg.context_length,
        "backend": cfg.backend, "target_len": cfg.target_len,
    }


# ---- tasks ----------------------------------------------------------------------------------------------------


def task_metadata(cfg: EvalConfig, tokenizer: Any, train_len: int, scratch: Path) -> dict[str, Any]:
    metadata = {
        "ctxpatch_tokenizer": sources.register_tokenizer(tokenizer),
        "lengths": cfg.lengths, "depths": cfg.depths, "samples": cfg.samples, "seed": cfg.seed,
        "tail": cfg.tail if cfg.tail is not None else sources.default_tail(cfg.lengths, train_len),
        "train_len": train_len, "text_files": cfg.text_files or None,
    }
    if any(t in RULER_OFFLINE for t in cfg.tasks):
        metadata["tokenizer"] = ruler.save_tokenizer(tokenizer, scratch / "tokenizer")
        metadata["max_seq_lengths"] = cfg.lengths
    return metadata


def load_tasks(cfg: EvalConfig, tokenizer: Any, train_len: int, scratch: Path) -> dict[str, dict]:
    """{"main": lm-eval task dict of every requested task, "native": the perplexity reference's}; data built once."""
    from lm_eval.tasks import TaskManager

    if any(t in RULER_OFFLINE for t in cfg.tasks):
        ruler.import_offline(cfg.tasks)
    tail = cfg.tail if cfg.tail is not None else sources.default_tail(cfg.lengths, train_len)
    if "ctxpatch_ppl" in cfg.tasks and tail >= min(min(cfg.lengths), train_len):
        raise EvalError(
            f"tail={tail} tokens must be shorter than the shortest length ({min(cfg.lengths)}) and the trained "
            f"length ({train_len}): pass a smaller --tail"
        )
    folders = [TASKS_DIR] + ([ruler.TASKS_DIR] if any(t in RULER_OFFLINE for t in cfg.tasks) else [])
    metadata = task_metadata(cfg, tokenizer, train_len, scratch)
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False, metadata=metadata)
    with ruler.offline_nltk():
        main = manager.load(cfg.lm_eval_tasks())
        native = manager.load([PPL_NATIVE]) if "ctxpatch_ppl" in cfg.tasks else {"tasks": {}, "groups": {}}
    return {"main": main, "native": native}


def selected_samples(tasks: dict, cfg: EvalConfig, lengths: list[int] | None = None) -> dict[str, list[int]]:
    """Doc indices to evaluate per task, at `lengths` only (None: all). RULER builds 500 samples per length: keep
    `samples` of each length (lm-eval's limit takes the first length)."""
    chosen = {}
    for name, task in tasks["tasks"].items():
        docs = task.eval_docs
        indices = ruler.sample_indices(docs, cfg.samples) if name in RULER_OFFLINE else list(range(len(docs)))
        if lengths is not None:
            indices = [i for i in indices if doc_length(docs[i]) in lengths]
        chosen[name] = indices
    return chosen


def doc_length(doc: dict) -> int:
    """The length a doc measures: ctxpatch's docs name it `length`, RULER's `max_length`."""
    return int(doc["length"] if "length" in doc else doc["max_length"])


def announce(cfg: EvalConfig, specs: list[Spec], train_len: int, tasks: dict) -> None:
    """Say what will run: the longest length against the trained length, and how many forwards per spec
    (max_length has a margin for the generated answer, so it is not what is compared)."""
    chosen = selected_samples(tasks["main"], cfg)
    per_spec = sum(len(v) for v in chosen.values())
    longest = max(cfg.lengths)
    log.warning(
        "ctxpatch: longest length %d (max_length %d), %s the model's trained length %d; %d spec(s) x %d forward(s)%s",
        longest, cfg.context_length, "past" if longest > train_len else "within", train_len,
        len(specs), per_spec,
        " + the native reference" if tasks["native"]["tasks"] else "",
    )


def run_tasks(lm: CtxpatchLM, tasks: dict, spec_label: str, cfg: EvalConfig,
              lengths: list[int] | None = None) -> list[Record]:
    """lm-eval's evaluate on `tasks` (their docs at `lengths`; None: all) with the model as it is now; one
    `Record` per scored sample."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    chosen = {name: indices for name, indices in selected_samples(tasks, cfg, lengths).items() if indices}
    if not chosen:  # (an empty selection would make lm-eval evaluate every doc)
        return []
    tasks = {**tasks, "tasks": {name: task for name, task in tasks["tasks"].items() if name in chosen}}
    with quiet_lm_eval():  # its per-length metric warnings concern its own aggregates, which ctxpatch does not use
        results = lm_eval_evaluate(
            lm=lm, task_dict=tasks, samples=chosen, log_samples=True, bootstrap_iters=0, verbosity="ERROR",
        )
    records = []
    for task_name, samples in results["samples"].items():
        for sample in samples:
            if unscored(sample):
                continue
            record = to_record(task_name, sample, spec_label)
            if record is not None:
                records.append(record)
    return records


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def unscored(sample: dict) -> bool:
    """Whether a logged lm-eval sample holds a score `report` did not find (a NaN log-likelihood)."""
    return any(isinstance(resp, tuple) and isinstance(resp[0], float) and math.isnan(resp[0])
               for resps in sample.get("resps", []) for resp in resps)


def to_record(task_name: str, sample: dict, spec_label: str) -> Record | None:
    doc = sample["doc"]
    if task_name in RULER_OFFLINE:
        scored = ruler.sample_score(sample)
        if scored is None:
            return None
        return Record(spec=spec_label, task=task_name, length=scored[0], value=scored[1], sample=int(doc["index"]))
    short = "ppl" if task_name in (PPL_FULL, PPL_NATIVE) else task_name.removeprefix("ctxpatch_")
    return Record(
        spec=spec_label, task=short, length=int(doc["length"]), value=float(sample[str(doc["length"])]),
        sample=int(doc["sample"]), depth=doc.get("depth"),
    )
