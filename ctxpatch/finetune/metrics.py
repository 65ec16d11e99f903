"""What a run reports: metrics as JSON lines, a loss-curve PNG, and a progress bar.

`metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, `lr`, `grad_norm`,
`tokens`, `tokens_per_s`, `elapsed_s`, and `val_loss` / `val_loss_contiguous` on evaluation
steps). On resume, lines past the checkpoint's step are dropped, so the file always describes the
run that produced the adapter.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def truncate_metrics(output_dir: Path, last_step: int) -> None:
    """Keep only lines up to `last_step` (where a resumed run continues from)."""
    rows = [row for row in read_metrics(output_dir) if row.get("step", 0) <= last_step]
    path = output_dir / METRICS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def append_metrics(output_dir: Path, row: dict[str, Any]) -> None:
    with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def plot_losses(output_dir: Path, title: str = "") -> Path | None:
    """loss.png: training loss per step, validation losses where measured. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no loss.png: pip install matplotlib", stacklevel=2)
        return None
    rows = read_metrics(output_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    for key, style in (("val_loss", "o-"), ("val_loss_contiguous", "s--")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output_dir / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps; its ETA counts only steps run in this process's lifetime."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=1.0)
