"""`evaluate` and `compare`: lm-eval tasks on an in-memory model, one patch spec after another.

    board = ctxpatch.eval.compare(model, tokenizer, ["none", "dynamic", "logn+window"], lengths=[8192, 16384])
    print(board.markdown())

Every spec sees the same data: the tasks are loaded once (their data generated once, from the seed) and
evaluated with `lm_eval.evaluator.evaluate` under each spec in turn, through `CtxpatchLM`. The perplexity
task's native-context reference is evaluated once, on the model as given (unpatched, or with the patch it
carries), and shared by every spec. Cost per spec and length: one forward per perplexity window and one per
passkey/needle depth and sample; the reference adds one forward of min(n, train_len) tokens per window.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from tqdm.auto import tqdm

from .. import patch as patching
from .._compat import transformers as hf
from ..adapters.base import train_len as config_train_len
from . import ruler, sources
from .errors import EvalError
from .lm import CtxpatchLM
from .options import RULER_OFFLINE, Spec, parse_depths, parse_lengths, parse_spec, parse_tasks
from .report import Leaderboard, Record
from .tasks import TASKS_DIR

log = logging.getLogger(__name__)

PPL_FULL, PPL_NATIVE = "ctxpatch_ppl_full", "ctxpatch_ppl_native"


@dataclass
class EvalConfig:
    """What to measure: the same for every spec of a comparison."""

    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: ["ctxpatch_ppl", "ctxpatch_passkey"])
    depths: list[float] = field(default_factory=lambda: list(sources.DEFAULT_DEPTHS))
    samples: int = 1
    tail: int = sources.DEFAULT_TAIL
    seed: int = 0
    text_files: list[str] | None = None
    max_length: int | None = None  # default: the largest length + ruler.LENGTH_MARGIN
    backend: str = "blockwise"

    def __post_init__(self) -> None:
        self.lengths = parse_lengths(self.lengths)
        self.tasks = parse_tasks(self.tasks)
        self.depths = parse_depths(self.depths)
        if "ctxpatch_ppl" in self.tasks and not 0 < self.tail < min(self.lengths):
            raise EvalError(
                f"tail={self.tail}: the perplexity task scores the last `tail` tokens of each window, so it must be "
                f"between 1 and the shortest length ({min(self.lengths)}): pass a smaller --tail"
            )
        if self.samples < 1:
            raise EvalError(f"samples={self.samples}: ask for at least one sample per length")
        for path in self.text_files or []:
            if not Path(path).is_file():
                raise EvalError(f"text file {path!r} does not exist: pass text files to read (--text FILE ...)")

    @property
    def context_length(self) -> int:
        return self.max_length or max(self.lengths) + ruler.LENGTH_MARGIN

    def lm_eval_tasks(self) -> list[str]:
        """lm-eval task names; the perplexity group becomes its full-context task (the native one runs apart)."""
        return [PPL_FULL if t == "ctxpatch_ppl" else t for t in self.tasks]


def evaluate(model: Any, tokenizer: Any, spec: str | Spec = "none", *, params: dict[str, Any] | None = None,
             **kwargs: Any) -> Leaderboard:
    """Evaluate one spec ("none" = the model as given) with `params`; other keywords as for `compare`."""
    spec = spec if isinstance(spec, Spec) else parse_spec(spec, params)
    return compare(model, tokenizer, [spec], **kwargs)


def compare(model: Any, tokenizer: Any, specs: Sequence[str | Spec], *, out_dir: str | Path | None = None,
            name: str | None = None, **config: Any) -> Leaderboard:
    """Evaluate every spec on the same data; returns (and, with `out_dir`, writes) the leaderboard.

    Keyword arguments are `EvalConfig` fields (or `config=EvalConfig(...)`); `name` labels the model."""
    cfg = config.pop("config", None) or EvalConfig(**config)
    specs = [s if isinstance(s, Spec) else parse_spec(s) for s in specs]
    train_len = config_train_len(model.config)
    carried = patching.current_patch(model)
    check_specs(specs, carried)
    check_specs_apply(model, specs, cfg.backend)
    reference = f"{carried.spec} (carried)" if carried else "none"
    board = Leaderboard(model_name=name or model_name(model), train_len=train_len, config=describe(cfg), reference=reference)
    with tempfile.TemporaryDirectory(prefix="ctxpatch-eval-") as scratch:
        tasks = load_tasks(cfg, tokenizer, train_len, Path(scratch))
        lm = CtxpatchLM(model, tokenizer, max_length=cfg.context_length, state=reference)
        announce(cfg, specs, train_len, tasks)
        if PPL_NATIVE in tasks["native"]["tasks"]:
            board.records += run_tasks(lm, tasks["native"], "reference", cfg)
        for spec in tqdm(specs, desc="specs", disable=len(specs) < 2):
            started = time.perf_counter()
            label = reference if spec.is_none else spec.label
            with applied(model, spec, cfg.backend):
                lm.state = label
                board.records += run_tasks(lm, tasks["main"], spec.label, cfg)
            board.seconds[spec.label] = time.perf_counter() - started
    board.forwards = lm.forwards
    if out_dir is not None:
        board.write(Path(out_dir))
    return board


def check_specs(specs: list[Spec], carried: Any) -> None:
    if carried is not None and any(not s.is_none for s in specs):
        raise EvalError(
            f"this model already carries the patch {carried.spec!r} (loaded with it): evaluate it as loaded "
            "(no --patch, or --patch none), or load the base model to compare other patches"
        )


def check_specs_apply(model: Any, specs: list[Spec], backend: str) -> None:
    """Apply and remove every spec once before measuring anything: a bad parameter fails now, not hours in."""
    for spec in specs:
        with applied(model, spec, backend):
            pass


@contextlib.contextmanager
def applied(model: Any, spec: Spec, backend: str) -> Iterator[None]:
    """The spec applied to the model for the block ("none": nothing), removed after."""
    patch = None if spec.is_none else patching.apply(model, spec.spec, backend=backend, **spec.params)
    try:
        yield
    finally:
        if patch is not None:
            patch.remove()


def model_name(model: Any) -> str:
    return hf.model_source(model.config) or type(model).__name__


def describe(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "lengths": cfg.lengths, "tasks": cfg.tasks, "depths": cfg.depths, "samples": cfg.samples,
        "tail": cfg.tail, "seed": cfg.seed, "text_files": cfg.text_files, "max_length": cfg.context_length,
        "backend": cfg.backend,
    }


# ---- tasks ----------------------------------------------------------------------------------------------------


def task_metadata(cfg: EvalConfig, tokenizer: Any, train_len: int, scratch: Path) -> dict[str, Any]:
    metadata = {
        "ctxpatch_tokenizer": sources.register_tokenizer(tokenizer),
        "lengths": cfg.lengths, "depths": cfg.depths, "samples": cfg.samples, "seed": cfg.seed,
        "tail": cfg.tail, "train_len": train_len, "text_files": cfg.text_files or None,
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
    if "ctxpatch_ppl" in cfg.tasks and cfg.tail >= min(min(cfg.lengths), train_len):
        raise EvalError(
            f"tail={cfg.tail} tokens must be shorter than the shortest length ({min(cfg.lengths)}) and the trained "
            f"length ({train_len}): pass a smaller --tail"
        )
    folders = [TASKS_DIR] + ([ruler.TASKS_DIR] if any(t in RULER_OFFLINE for t in cfg.tasks) else [])
    metadata = task_metadata(cfg, tokenizer, train_len, scratch)
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False, metadata=metadata)
    with ruler.offline_nltk():
        main = manager.load(cfg.lm_eval_tasks())
        native = manager.load([PPL_NATIVE]) if "ctxpatch_ppl" in cfg.tasks else {"tasks": {}, "groups": {}}
    return {"main": main, "native": native}


def selected_samples(tasks: dict, cfg: EvalConfig) -> dict[str, list[int]] | None:
    """RULER builds 500 samples per length: keep `samples` of each length (lm-eval's limit takes the first length)."""
    chosen = {}
    for name, task in tasks["tasks"].items():
        if name in RULER_OFFLINE:
            chosen[name] = ruler.sample_indices(task.eval_docs, cfg.samples)
        else:
            chosen[name] = list(range(len(task.eval_docs)))
    return chosen


def announce(cfg: EvalConfig, specs: list[Spec], train_len: int, tasks: dict) -> None:
    """Say what will run: max_length against the trained length, and how many forwards per spec."""
    chosen = selected_samples(tasks["main"], cfg)
    per_spec = sum(len(v) for v in chosen.values())
    log.warning(
        "ctxpatch: max_length=%d, %s the model's trained length %d; %d spec(s) x %d forward(s)%s",
        cfg.context_length, "past" if cfg.context_length > train_len else "within", train_len,
        len(specs), per_spec,
        " + the native reference" if tasks["native"]["tasks"] else "",
    )


def run_tasks(lm: CtxpatchLM, tasks: dict, spec_label: str, cfg: EvalConfig) -> list[Record]:
    """lm-eval's evaluate on `tasks` with the model as it is now; one `Record` per scored sample."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    if not tasks["tasks"]:
        return []
    with quiet_lm_eval():  # its per-length metric warnings concern its own aggregates, which ctxpatch does not use
        results = lm_eval_evaluate(
            lm=lm, task_dict=tasks, samples=selected_samples(tasks, cfg), log_samples=True, bootstrap_iters=0,
            verbosity="ERROR",
        )
    records = []
    for task_name, samples in results["samples"].items():
        for sample in samples:
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
