"""What a tune run leaves in --out: tuned.json (the winner, as `Patch.to_dict()` + metadata), tune.json and
tune.md (every candidate, every measurement, the round each was eliminated in), and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .candidates import CandidateSet
from .result import TuneResult
from .schedule import Schedule, depth, format_seconds
from .search import SHORT_LIMIT, SearchResult


def candidate_table(cands: CandidateSet, found: SearchResult, schedule: Schedule) -> list[dict[str, Any]]:
    """One row per candidate, best first: where it got to, its last score, the resolved spec, its measurements;
    then the skipped ones with the reason."""
    last: dict[str, tuple[int, dict]] = {}
    place: dict[str, int] = {}  # rank in the last round a candidate was scored in
    for rnd in found.rounds:
        for n, s in enumerate(rnd["scores"]):
            last[s["candidate"]] = (rnd["round"], s)
            place[s["candidate"]] = n
    rows = []
    for candidate in cands.candidates:
        label = candidate.label
        reached, s = last.get(label, (-1, {}))
        status = "winner" if label == found.winner.label else (
            f"eliminated in round {found.eliminated[label]}" if label in found.eliminated else "finalist")
        measurements = sorted(
            ({k: row[k] for k in ("kind", "length", "index", "value", "seconds", "round")}
             for key, row in found.results.items() if key[0] == label),
            key=lambda m: (m["kind"], m["length"], m["index"]))
        rows.append({"candidate": label, "status": status, "rounds": reached + 1,
                     "eliminated_in": found.eliminated.get(label), "retrieval": s.get("retrieval"),
                     "ratio": s.get("ratio"), "short_ratio": s.get("short_ratio"), "penalised": s.get("penalised"),
                     "cost": cands.cost[label], "resolved": cands.resolved[label], "note": cands.notes.get(label),
                     "measurements": measurements})
    rows.sort(key=lambda r: (-r["rounds"], place.get(r["candidate"], math.inf)))
    for skipped in cands.skipped:
        rows.append({"candidate": skipped.label, "status": "skipped", "reason": skipped.reason, "rounds": 0})
    return rows


def baseline_rows(found: SearchResult) -> list[dict[str, Any]]:
    return sorted(({k: row[k] for k in ("kind", "length", "index", "value", "seconds")}
                   for key, row in found.results.items() if key[0] == "none"),
                  key=lambda m: (m["kind"], m["length"], m["index"]))


def write_report(result: TuneResult, folder: Path) -> list[Path]:
    from ..loading import write_json

    folder.mkdir(parents=True, exist_ok=True)
    found = result.search
    write_json(folder / "tuned.json", result.tuned)
    write_json(folder / "tune.json", {
        "tuned": result.tuned, "schedule": result.schedule.to_dict(), "rounds": found.rounds,
        "baseline": baseline_rows(found), "candidates": result.table,
    })
    (folder / "tune.md").write_text(markdown(result), encoding="utf-8")
    written = [folder / "tuned.json", folder / "tune.json", folder / "tune.md"]
    try:
        written += write_plots(result, folder)
    except ImportError:  # matplotlib is in the eval extra; without it the numbers are all there
        pass
    return written


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _schedule_line(origin: str | None) -> str:
    if origin == "replayed":
        return "The schedule was replayed from a saved schedule.json: it does not depend on this machine's speed."
    return ("The schedule was planned from this machine's measured speed (a budget in seconds depends on the "
            "machine and its load); `schedule.json` beside this file replays it anywhere: `ctxpatch tune ... "
            "--schedule schedule.json`.")


def markdown(result: TuneResult) -> str:
    tuned, schedule, found = result.tuned, result.schedule, result.search
    budget = tuned["budget"]
    lines = [
        f"# ctxpatch tune: {tuned['model']['name']} to {schedule.target_len} tokens",
        "",
        f"**Winner: `{tuned['candidate']}`** — resolved: "
        + " + ".join(f"`{m['name']}({', '.join(f'{k}={v}' for k, v in m['params'].items())})`" for m in tuned["methods"]),
        "",
        f"Trained length {schedule.train_len}; tasks {', '.join(schedule.tasks)}; seed {tuned['seed']}. Budget "
        f"{format_seconds(budget['budget_s'])}: schedule estimated {format_seconds(budget['estimated_s'])}, "
        f"measured {format_seconds(budget['measured_s'])} ({100 * budget['used']:.0f}% of the budget).",
        "",
        _schedule_line(budget.get("schedule")),
        "",
        f"Objective: {tuned['objective']}.",
        "",
        "Evidence, not a verdict: each round ranks on few windows and depths; read the numbers.",
        "",
        "## Rounds",
        "",
        "| round | candidates | length | new measurements each | measurements ranked on | kept |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for spec, rnd in zip(schedule.rounds, found.rounds):
        lines.append(f"| {spec.index} | {spec.size} | {spec.length} | {len(spec.items)} | {rnd['measured']} | {spec.keep} |")
    lines += ["", *[f"* {n}" for n in schedule.notes], "", "## Candidates", "",
              "| candidate | status | retrieval | ratio | short ratio | cost | measurements |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in result.table:
        if row["status"] == "skipped":
            continue
        short = _num(row["short_ratio"]) + (" (penalised)" if row["penalised"] else "")
        lines.append(f"| `{row['candidate']}` | {row['status']} | {_num(row['retrieval'], 2)} | {_num(row['ratio'])} | "
                     f"{short} | {row['cost']:.2f} | {len(row['measurements'])} |")
    skipped = [r for r in result.table if r["status"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"* `{r['candidate']}`: {r['reason']}" for r in skipped]
    notes = [r for r in result.table if r.get("note")]
    if notes:
        lines += ["", "## Warnings", ""] + [f"* `{r['candidate']}`: {r['note']}" for r in notes]
    base = baseline_rows(found)
    lines += ["", "## Unpatched baseline (trained length: the ceiling)", "",
              "| kind | length | index | depth | value |", "|---|---:|---:|---:|---:|"]
    for m in base:
        d = "" if m["kind"] == "native" else f"{depth(m['index']):.3f}"
        lines.append(f"| {m['kind']} | {m['length']} | {m['index']} | {d} | {_num(m['value'])} |")
    lines += ["", f"Short-context limit: ratio ≤ {SHORT_LIMIT} inside the trained length. Every measurement: "
              "`tune.json` (and `measurements.jsonl`, as measured).", ""]
    return "\n".join(lines)


def write_plots(result: TuneResult, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.table if r["status"] != "skipped"]
    labels = [r["candidate"] for r in rows]
    rounds = [r["rounds"] for r in rows]
    colours = plt.cm.viridis([x / max(rounds) for x in rounds])
    written = []
    fig, (ratio_ax, found_ax) = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(rows)), 8), sharex=True)
    ratios = [r["ratio"] if r["ratio"] is not None and math.isfinite(r["ratio"]) else float("nan") for r in rows]
    ratio_ax.bar(range(len(rows)), ratios, color=colours)
    ratio_ax.axhline(1.0, color="grey", lw=0.8)
    ratio_ax.set_ylabel("ppl ratio (full / native)")
    ratio_ax.set_yscale("log")
    found_ax.bar(range(len(rows)), [r["retrieval"] or 0.0 for r in rows], color=colours)
    found_ax.set_ylabel("retrieval accuracy")
    found_ax.set_ylim(0, 1.05)
    found_ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ratio_ax.set_title("each candidate at the last round it reached (colour: rounds reached)")
    fig.tight_layout()
    fig.savefig(folder / "candidates.png", dpi=110)
    plt.close(fig)
    written.append(folder / "candidates.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(result.search.rounds)), max(4, 0.2 * len(rows))))
    index = {label: n for n, label in enumerate(labels)}
    for rnd in result.search.rounds:
        kept = set(rnd["kept"])
        for s in rnd["scores"]:
            ax.scatter(rnd["round"], index[s["candidate"]], marker="o" if s["candidate"] in kept else "x",
                       color="tab:green" if s["candidate"] in kept else "tab:red")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("round (o kept, x eliminated)")
    ax.set_xticks([r["round"] for r in result.search.rounds])
    fig.tight_layout()
    fig.savefig(folder / "rounds.png", dpi=110)
    plt.close(fig)
    written.append(folder / "rounds.png")
    return written
