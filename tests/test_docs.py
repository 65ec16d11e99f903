"""The docs against the code and the raw results: the generated blocks of README.md, docs/ and benchmarks/README.md
are what `python -m ctxpatch.docs` makes from `ctxpatch.methods()` and the committed runs; the README keeps the
layout CI parses; names the docs cite exist."""

from __future__ import annotations

import importlib
import json
import math
import re
import subprocess
import warnings
from pathlib import Path

import pytest

import ctxpatch
from ctxpatch import docs, results
from ctxpatch.docs import END, START, table_in, with_table
from ctxpatch.eval.report import wilson_interval
from ctxpatch.registry import methods_table

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", docs.doc_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_generated_block_is_what_its_source_gives(path):
    text = path.read_text(encoding="utf-8")
    for name in docs.known_blocks(text):
        assert docs.block_in(text, name) == docs.BLOCKS[name](ROOT), (
            f"{path.relative_to(ROOT)}'s {name} block differs from what its source gives: "
            "run `python -m ctxpatch.docs --write`")


def test_the_generated_blocks_are_where_the_docs_promise():
    assert docs.known_blocks(README) == ["which"]
    assert table_in((ROOT / "docs" / "DESIGN.md").read_text()) is not None
    assert table_in((ROOT / "docs" / "methods.md").read_text()) is not None
    results_page = (ROOT / "docs" / "results.md").read_text()
    expected = {"which", "results-training-free", "results-ceiling", "results-fine-tuned"}
    assert expected <= set(docs.known_blocks(results_page))
    assert {"runs", "runs-detail"} <= set(docs.known_blocks((BENCHMARKS / "README.md").read_text()))


def test_the_table_has_one_row_per_method_with_its_defaults():
    rows = methods_table().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == [f"`{m.name}`" for m in ctxpatch.methods()]
    window = next(row for row in rows if row.startswith("| `window` "))
    assert window == "| `window` | mask | yes | visible iff 0 ≤ Δ < W | `window` (L) |"
    for name in ("alibi", "kerple_log", "kerple_power", "sandwich", "xpos"):  # `training_free = False` in their files
        assert next(row for row in rows if row.startswith(f"| `{name}` ")).split("|")[3].strip().startswith("no")
    sinks = next(row for row in rows if row.startswith("| `sinks` "))
    assert "`global_tokens` (4), `window` (L - S)" in sinks
    assert "combines with any other" in next(row for row in rows if row.startswith("| `xpos` "))
    assert all(row.count("|") == 6 for row in rows)  # no cell breaks the table


def test_with_table_replaces_only_between_the_markers():
    text = f"intro\n{START}\nold\n{END}\noutro\n"
    assert with_table(text, "new\n") == f"intro\n{START}\nnew\n{END}\noutro\n"
    assert table_in(with_table(text, "new\n")) == "new\n"
    with pytest.raises(ValueError):
        with_table("no markers", "new\n")
    other = "<!-- notes:start -->\nhand list\n<!-- notes:end -->\n"  # a block of no known name
    assert docs.generated(other, ROOT) == other


# ---- the raw results ---------------------------------------------------------------------------------------


def test_every_committed_run_is_indexed_and_every_indexed_path_exists():
    index = results.read_index(BENCHMARKS)
    indexed = {path for run in index.runs for path in run.paths}
    boards = {str(p.parent.relative_to(BENCHMARKS)) for p in BENCHMARKS.rglob("leaderboard.json")}
    assert boards <= indexed, f"not in benchmarks/runs.json: {sorted(boards - indexed)}"
    assert all((BENCHMARKS / path).exists() for path in indexed)
    assert all(run.date and run.command and run.showed for run in index.runs)


@pytest.mark.parametrize("path", sorted(BENCHMARKS.rglob("leaderboard.json")),
                         ids=lambda p: str(p.parent.relative_to(BENCHMARKS)))
def test_each_leaderboard_summary_is_what_its_records_give(path):
    data = json.loads(path.read_text())
    board = results.leaderboard_from_json(data)
    for spec, row in data["summary"].items():
        if spec == "native_perplexity":
            continue
        for length, ratio in row["ratio"].items():
            assert ratio == pytest.approx(board.ratio(spec, int(length)), rel=1e-9, abs=0) if ratio else True
        for task in board.retrieval_tasks:
            for length, accuracy in row.get(task, {}).items():
                if accuracy is not None:
                    found, n = board.found(spec, task, int(length))
                    assert accuracy == pytest.approx(found / n)


SCORED = sorted(p for p in BENCHMARKS.rglob("leaderboard.json") if (p.parent / "scores.jsonl").is_file())


@pytest.mark.parametrize("path", SCORED, ids=lambda p: str(p.parent.relative_to(BENCHMARKS)))
def test_each_leaderboard_holds_what_its_score_log_scored(path):
    """Every perplexity record is exp(−logprob / tail) of a scored forward; the other forwards are the retrieval
    prompts, one per retrieval record, found (greedy) exactly as often as the records say."""
    data = json.loads(path.read_text())
    tail = data["config"]["tail"]
    scored = [json.loads(line) for line in (path.parent / "scores.jsonl").read_text().splitlines() if line.strip()]
    ppl = [r["value"] for r in data["records"] if r["task"] == "ppl"]

    def is_ppl(line):
        return any(math.isclose(math.exp(-line["logprob"] / tail), v, rel_tol=1e-6) for v in ppl)

    assert all(any(math.isclose(math.exp(-line["logprob"] / tail), v, rel_tol=1e-6) for line in scored) for v in ppl)
    retrieval = [r for r in data["records"] if r["task"] != "ppl"]
    prompts = [line for line in scored if not is_ppl(line)]
    assert len(prompts) == len(retrieval)
    assert sum(line["greedy"] for line in prompts) == sum(r["value"] == 1.0 for r in retrieval)


def copy_of_the_results(tmp_path: Path) -> Path:
    """The repository's runs.json and leaderboard.json files under tmp_path/benchmarks."""
    for file in [BENCHMARKS / "runs.json", *BENCHMARKS.rglob("leaderboard.json")]:
        target = tmp_path / "benchmarks" / file.relative_to(BENCHMARKS)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
    return tmp_path


def test_a_changed_raw_result_makes_the_readme_stale(tmp_path):
    root = copy_of_the_results(tmp_path)
    assert docs.generated(README, root) == README
    board_file = root / "benchmarks" / "retrieval" / "32k-dca-niah-2" / "leaderboard.json"
    data = json.loads(board_file.read_text())
    record = next(r for r in data["records"] if r["spec"] == "dca" and r["task"] == "niah")
    record["value"] = 1.0 - record["value"]  # one needle prompt scored the other way
    board_file.write_text(json.dumps(data))
    assert docs.generated(README, root) != README


def test_a_result_measured_twice_is_refused(tmp_path):
    root = copy_of_the_results(tmp_path)
    index = json.loads((root / "benchmarks" / "runs.json").read_text())
    mv32k = next(run for run in index["runs"] if run["paths"][0] == "multiview-2026-11-30/mv32k-dca")
    mv32k["kind"] = "training-free"  # dca at 32k is the 32k grid's too
    (root / "benchmarks" / "runs.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="two runs measure the perplexity of dca at 32768"):
        results.cells(results.read_index(root / "benchmarks"), "training-free")


def dca_at_32k(root: Path) -> results.Cell:
    free = results.cells(results.read_index(root / "benchmarks"), "training-free")
    return next(c for c in free if c.label == "dca" and c.length == 32768)


def test_a_run_that_reran_an_older_ones_prompts_with_more_stands_in_its_place(tmp_path):
    root = copy_of_the_results(tmp_path)
    runs_file = root / "benchmarks" / "runs.json"
    index = json.loads(runs_file.read_text())
    rerun = next(run for run in index["runs"] if run["paths"] == ["retrieval/32k-dca-passkey"])
    assert rerun["supersedes"] == ["grid/32k-ppl"]
    board = json.loads((root / "benchmarks" / "retrieval" / "32k-dca-passkey" / "leaderboard.json").read_text())
    found = sum(r["value"] for r in board["records"] if r["task"] == "passkey")
    cell = dca_at_32k(root)
    assert cell.found["passkey"] == (found, 15) and cell.ratio is not None  # the grid keeps its perplexity
    assert cell.sources[0] == "grid/32k-ppl" and "retrieval/32k-dca-passkey" in cell.sources
    rerun["supersedes"] = []
    runs_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="two runs measure passkey of dca at 32768.*'supersedes'"):
        dca_at_32k(root)
    rerun["supersedes"] = ["grid/no-such-run"]
    runs_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="supersedes 'grid/no-such-run', which no run indexes"):
        dca_at_32k(root)


def cell(label: str, ratio: float, found: int, n: int) -> results.Cell:
    return results.Cell(label, 16384, ratio=ratio, perplexity=10 * ratio, found={"passkey": (found, n)}, sources=["x"])


def test_pick_names_both_and_says_when_the_intervals_overlap():
    text = results.pick([cell("a", 0.9, 1, 5), cell("b", 1.1, 3, 5)])
    assert text.startswith("for perplexity `a`: ratio 0.900; passkey 1/5 [4–62%]<br>for retrieval `b`")
    assert "overlap `a`'s, 1/5: not told apart" in text
    apart = results.pick([cell("a", 0.9, 0, 40), cell("b", 1.1, 40, 40)])
    assert "overlap" not in apart and "for retrieval `b`: ratio 1.100; passkey 40/40 [91–100%]" in apart
    alone = "<br>(the only spec measured at this length: nothing to beat)"
    assert results.pick([cell("a", 0.9, 3, 5)]) == "for perplexity and retrieval `a`: ratio 0.900; passkey 3/5 [23–88%]" + alone
    assert results.pick([]) == "not measured"
    unrated = results.Cell("r", 131072, ratio=None, perplexity=None, found={"passkey": (3, 3)}, sources=["x"])
    assert results.pick([unrated]) == "for retrieval `r`: ratio –; passkey 3/3 [44–100%]" + alone  # no ppl claimed
    no_retrieval = results.Cell("p", 131072, ratio=1.02, perplexity=10.2, found={}, sources=["x"])
    assert results.pick([no_retrieval]) == "for perplexity `p`: ratio 1.020" + alone
    assert alone not in results.pick([unrated, no_retrieval])
    assert results.overlap((1, 5), (3, 5)) and not results.overlap((0, 40), (40, 40))
    assert wilson_interval(0, 40)[1] < wilson_interval(40, 40)[0]


def test_the_retrieval_pick_is_the_share_its_prompts_support():
    few, many = cell("few", 1.2, 3, 3), cell("many", 1.3, 12, 16)
    assert wilson_interval(3, 3)[0] < wilson_interval(12, 16)[0]  # 44% against 51%, though 3/3 > 12/16
    assert "for retrieval `many`" in results.pick([few, many]) and "overlap `few`'s, 3/3" in results.pick([many, few])
    tied = results.pick([cell("a", 1.0, 4, 5), cell("b", 1.1, 4, 5)])
    assert tied.startswith("for perplexity and retrieval `a`")  # equal counts: the lower ratio


# ---- the README ----------------------------------------------------------------------------------------------


def test_readme_fits_on_a_few_screens():
    assert len(README.encode("utf-8")) <= 10 * 1024


def readme_bash_block() -> list[str]:
    return README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()


def test_readme_commands_are_short_lines_and_ci_runs_the_second():
    assert all(len(line) <= 120 for line in readme_bash_block())
    commands, line = [], ""
    for raw in readme_bash_block():  # bash's own reading: comments dropped, `\` continuations joined
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        line += raw
        if line.endswith("\\"):
            line = line[:-1]
            continue
        commands.append(line)
        line = ""
    assert len(commands) == 2 and "ctxpatch compare" in commands[0] and "pytest" in commands[1]
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == commands[1].strip()
    for command in commands:
        assert subprocess.run(["bash", "-n", "-c", command], check=False).returncode == 0


def test_readme_lists_every_cli_verb_and_leads_with_training_free_methods():
    from ctxpatch.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    listed = re.findall(r"^\* `ctxpatch ([a-z-]+)` — ", README, flags=re.MULTILINE)
    assert sorted(listed) == sorted(verbs)
    quickstart = README.split("```python\n", 1)[1].split("```", 1)[0]
    specs = re.findall(r'ctxpatch\.apply\(model, "([^"]+)"', quickstart)
    assert specs and all(m.training_free for spec in specs for m in ctxpatch.parse_spec(spec).methods)
    assert "Q4_1 GGUF dequantized to fp32" in README


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"


def cited_names() -> set[str]:
    """Every dotted `ctxpatch.x.y` the README, docs and recipes cite (file names like ctxpatch.json excluded)."""
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "recipes").rglob("*.*")]
    names = set()
    for file in files:
        for name in re.findall(r"\bctxpatch(?:\.[A-Za-z_]\w*)+", file.read_text(encoding="utf-8")):
            if not name.endswith((".json", ".yaml", ".md", ".py")):
                names.add(name)
    return names


@pytest.mark.parametrize("name", sorted(cited_names()))
def test_every_name_the_docs_cite_exists(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            assert hasattr(target, attribute), f"the docs cite {name}, which does not exist"
            target = getattr(target, attribute)
        return


def test_changelog_sections_each_appear_once_per_release():
    release, seen = None, set()
    for line in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            release, seen = line, set()
        elif line.startswith("### "):
            assert line not in seen, f"CHANGELOG.md: {release} has two '{line}' sections; merge them"
            seen.add(line)


# the default model's shape
SMOLLM2 = {"num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "rotary_dim": 64}


def _label_cases():
    index = results.read_index(BENCHMARKS)
    for run in (r for r in index.runs if r.kind == "training-free"):
        for path, board in index.boards(run):
            for spec, by_target in board.patches.items():
                for saved in by_target.values():
                    yield pytest.param(run.labels.get(spec, spec), board.train_len, saved, id=f"{path}:{spec}")


@pytest.mark.parametrize("label,train_len,saved", list(_label_cases()))
def test_each_table_label_resolves_today_to_the_parameters_its_run_used(label, train_len, saved):
    """A default changed after a run must not leave that run's rows under a name that now means other values:
    runs.json's `labels` rename them (to the values they ran with)."""
    from ctxpatch.registry import ModelInfo
    from ctxpatch.spec import parse_spec

    info = ModelInfo(train_len, **SMOLLM2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        now = [m.resolve(info, saved["target_len"]) for m in parse_spec(label).methods]
    recorded = [(m["name"], m["params"]) for m in saved["methods"]]
    # a parameter added after the run is not in its record: compare the ones it recorded
    assert [(m.name, {k: m.values.get(k) for k in params}) for m, (_, params) in zip(now, recorded)] == recorded
