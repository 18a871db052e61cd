"""Evaluation results for people: a Markdown table of systems by metric, and the bar chart of the headline.

Rows are ``{system: {metric: value}}`` with values in percent (:meth:`training.metrics.StaticMetrics.to_dict`, BFCL
accuracy); a missing or None value is shown as ``–`` (no step of that kind was scored), never as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["METRIC_LABELS", "bar_chart", "markdown_table"]

METRIC_LABELS = {
    "plan_acc": "Plan ACC",
    "act_em": "Act. EM",
    "arg_f1": "Arg. F1",
    "hallu": "Hallu.",
    "rouge_l": "R-L",
    "bfcl_accuracy": "BFCL acc.",
}
"""The paper's column names (DESIGN §4), plus the executable BFCL multi-turn accuracy."""

Rows = Mapping[str, Mapping[str, float | None]]


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown_table(rows: Rows, metrics: Sequence[str] = tuple(METRIC_LABELS)) -> str:
    """One row per system, one column per metric present in at least one row."""
    shown = [m for m in metrics if any(m in row for row in rows.values())]
    lines = [
        "| system | " + " | ".join(METRIC_LABELS.get(m, m) for m in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    lines += [f"| {name} | " + " | ".join(_cell(row.get(m)) for m in shown) + " |" for name, row in rows.items()]
    return "\n".join(lines) + "\n"


def bar_chart(rows: Rows, path: Path, *, title: str, metrics: Sequence[str] = tuple(METRIC_LABELS)) -> Path:
    """Grouped bars: one group per metric, one bar per system, values in percent (matplotlib, the bench extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(m in row for row in rows.values())]
    width = 0.8 / max(1, len(rows))
    figure, axes = plt.subplots(figsize=(1.6 * len(shown) + 2, 4.2))
    for i, (name, row) in enumerate(rows.items()):
        positions = [j + i * width for j in range(len(shown))]
        values = [row.get(m) or 0.0 for m in shown]
        bars = axes.bar(positions, values, width, label=name)
        axes.bar_label(bars, labels=[_cell(row.get(m)) for m in shown], fontsize=7, padding=1)
    axes.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(shown))])
    axes.set_xticklabels([METRIC_LABELS.get(m, m) for m in shown])
    axes.set_ylabel("percent")
    axes.set_ylim(0, 105)
    axes.set_title(title)
    axes.legend(fontsize=8, ncols=min(4, len(rows)))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
