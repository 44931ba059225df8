"""The report's chart: ECRs created per day, week or month, stacked by problem type, as a PNG.

The only module that imports matplotlib. It uses the object API with the Agg canvas and never
pyplot, so no global figure state and no GUI backend is ever chosen.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gateway.reports import Timeline


def draw(timeline: Timeline, path: Path, title: str) -> None:
    figure = Figure(figsize=(max(6.0, 0.35 * len(timeline.labels) + 2), 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = list(range(len(timeline.labels)))
    bottom = [0] * len(positions)
    for kind, counts in timeline.series.items():
        axes.bar(positions, counts, bottom=bottom, label=kind)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axes.set_xticks(positions, timeline.labels, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("ECRs created")
    axes.set_xlabel(timeline.step)
    axes.set_title(title)
    if timeline.series:
        axes.legend(title="problem type", fontsize=8)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 2.5 ECRs
    figure.tight_layout()
    figure.savefig(path, format="png")
