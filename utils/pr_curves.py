"""Precision-recall curves of a VOC evaluation, one subplot per class, saved as a PNG.

Uses matplotlib's object API with the Agg canvas directly, so no pyplot state or global backend is
touched (safe in headless runs and inside other programs).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.atomic_file import atomic_file
from utils.voc_eval import VOCResult

logger = logging.getLogger(__name__)

SUBPLOT_SIZE_IN = (3.0, 2.6)  # width, height of one class's panel in inches
DPI = 100


def plot_pr_curves(
    result: VOCResult, path: str | Path, *, columns: int = 5, title: str | None = None
) -> Path:
    """Save the per-class precision-recall curves of `result` as a PNG at `path` (written atomically).

    One panel per class in a grid of `columns` columns (fewer when there are fewer classes), each titled
    with the class's VOC2010+ and VOC2007 APs; classes without positives say so instead of a curve.
    The image is exactly (cols * 300) x (rows * 260) pixels. Returns `path`.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    path = Path(path)
    names = result.class_names
    cols = min(columns, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    figure = Figure(figsize=(SUBPLOT_SIZE_IN[0] * cols, SUBPLOT_SIZE_IN[1] * rows), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_axis_off()
            continue
        name = names[k]
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
        if math.isnan(result.ap12[name]):
            ax.set_title(f"{name}: no ground truth", fontsize=9)
            continue
        recall, precision = result.recall[name], result.precision[name]
        if recall.size:
            # Precision is defined after each detection: a step that holds until the next one.
            ax.step(recall, precision, where="post", linewidth=1.2)
        ax.set_title(f"{name}: AP {result.ap12[name]:.3f} (07: {result.ap07[name]:.3f})", fontsize=9)
        if k % cols == 0:
            ax.set_ylabel("precision", fontsize=8)
        if k >= (rows - 1) * cols:
            ax.set_xlabel("recall", fontsize=8)
    heading = title or f"mAP {result.voc12_map:.4f} (VOC2007 11-point {result.voc07_map:.4f})"
    figure.suptitle(heading, fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.97))

    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=DPI)
    logger.info("saved precision-recall curves of %d classes to %s", len(names), path)
    return path
