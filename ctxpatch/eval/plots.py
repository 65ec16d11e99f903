"""PNG plots of a leaderboard: perplexity ratio vs length (one line per spec) and retrieval heatmaps (depth x length)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Board(Protocol):
    """What the plots read of a leaderboard (`report.Leaderboard`), named here so that plots need not import it."""

    records: list[Any]
    retrieval_tasks: list[str]
    specs: list[str]
    lengths: list[int]
    train_len: int
    config: dict[str, Any]
    model_name: str

    def depths(self, task: str) -> list[float]: ...
    def ratio(self, spec: str, length: int) -> float | None: ...
    def perplexity(self, spec: str, length: int) -> float | None: ...
    def native_perplexity(self, length: int) -> float | None: ...
    def accuracy(self, spec: str, task: str, length: int, depth: float) -> float: ...
    def refusal(self, spec: str, length: int) -> str | None: ...


def write_plots(board: Board, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    if any(r.task == "ppl" for r in board.records):
        written.append(perplexity_plot(board, folder / "perplexity.png"))
    for task in board.retrieval_tasks:
        if board.depths(task):
            written.append(heatmap(board, task, folder / f"{task}.png"))
    return written


def perplexity_plot(board: Board, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (ratio_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = board.lengths
    for spec in board.specs:
        points = [(n, board.ratio(spec, n), board.perplexity(spec, n)) for n in lengths]
        ratio_ax.plot([n for n, r, _ in points if r], [r for _, r, _ in points if r], marker="o", label=spec)
        ppl_ax.plot([n for n, _, p in points if p], [p for _, _, p in points if p], marker="o", label=spec)
    native = [(n, board.native_perplexity(n)) for n in lengths]
    ppl_ax.plot([n for n, p in native if p], [p for _, p in native if p], "k--x", label="native reference")
    ratio_ax.axhline(1.0, color="grey", lw=0.8)
    for ax in (ratio_ax, ppl_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axvline(board.train_len, color="grey", ls=":", lw=0.8)
        ax.set_xlabel("length (tokens); dotted: trained length")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    ratio_ax.set_ylabel("perplexity ratio, full / native context")
    ppl_ax.set_ylabel(f"perplexity of the last {board.config.get('tail')} tokens")
    ppl_ax.legend(fontsize=7)
    fig.suptitle(board.model_name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(board: Board, task: str, path: Path) -> Path:
    """One panel per spec: accuracy by depth (rows) and length (columns)."""
    import matplotlib.pyplot as plt
    import numpy as np

    specs, lengths, depths = board.specs, board.lengths, board.depths(task)
    fig, axes = plt.subplots(1, len(specs), figsize=(2.2 + 1.1 * len(lengths) * len(specs), 0.5 * len(depths) + 2),
                             squeeze=False)
    for ax, spec in zip(axes[0], specs):
        grid = np.array([[board.accuracy(spec, task, n, d) for n in lengths] for d in depths], dtype=float)  # (D, L)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for (row, column), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(column, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
            elif board.refusal(spec, lengths[column]):
                ax.text(column, row, "refused", ha="center", va="center", fontsize=6, color="grey")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_title(spec, fontsize=8)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("depth")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(f"{task}: accuracy, % ({board.model_name})", fontsize=9, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
