"""Prior (default) boxes of the single-shot head.

One set of priors per cell of the final feature map, in fractional (cx, cy, w, h). The order is the
contract shared with the prediction head: cell row-major (row = y outer, column = x inner), then scale,
then aspect ratio. The head's NHWC reshape produces exactly this order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["PriorConfigError", "boxes_per_cell", "create_prior_boxes", "grid_size_for"]

# The VGG16 conv base halves the resolution five times (pool1..pool5).
VGG16_STRIDE = 32


class PriorConfigError(ValueError):
    """Invalid prior configuration (grid size, scales, aspect ratios or image size)."""


def _check_positive(name: str, values: Sequence[float]) -> None:
    if len(values) == 0:
        raise PriorConfigError(f"{name} must not be empty")
    for value in values:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise PriorConfigError(
                f"{name} must hold positive finite numbers, got {value!r} in {list(values)}"
            )


def boxes_per_cell(scales: Sequence[float] = (0.2, 0.4, 0.6),
                   aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5)) -> int:
    """Number of priors per feature-map cell: one per (scale, aspect ratio) pair."""
    _check_positive("scales", scales)
    _check_positive("aspect_ratios", aspect_ratios)
    return len(scales) * len(aspect_ratios)


def grid_size_for(image_size: int, stride: int = VGG16_STRIDE) -> int:
    """Side of the final feature map for a square input of ``image_size`` pixels.

    Max pooling floors at every stage, and five floored halvings equal one floored division by 32.
    """
    if not isinstance(image_size, int) or image_size < stride:
        raise PriorConfigError(f"image_size must be an integer >= {stride}, got {image_size!r}")
    return image_size // stride


def create_prior_boxes(grid_size: int = 7, scales: Sequence[float] = (0.2, 0.4, 0.6),
                       aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5)) -> Tensor:
    """Create the priors of a ``grid_size`` x ``grid_size`` feature map.

    Each prior is centred on its cell, with width ``s * sqrt(r)`` and height ``s / sqrt(r)`` for scale
    ``s`` and aspect ratio ``r`` (width / height), every coordinate clamped to [0, 1].

    Returns:
        ``(P, 4)`` float32 tensor of fractional (cx, cy, w, h), ``P = grid_size**2 * len(scales) *
        len(aspect_ratios)``, ordered cell row-major (row outer), then scale, then aspect ratio.
    """
    if not isinstance(grid_size, int) or grid_size < 1:
        raise PriorConfigError(f"grid_size must be a positive integer, got {grid_size!r}")
    k = boxes_per_cell(scales, aspect_ratios)

    centres = (torch.arange(grid_size, dtype=torch.float64) + 0.5) / grid_size
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # row = y outer, column = x inner
    scale = torch.tensor(scales, dtype=torch.float64)[:, None]
    sqrt_ratio = torch.tensor(aspect_ratios, dtype=torch.float64).sqrt()[None, :]
    # (S, R) -> flattened scale-major so the slot order inside a cell is scale, then ratio.
    w = (scale * sqrt_ratio).reshape(-1)
    h = (scale / sqrt_ratio).reshape(-1)

    n_cells = grid_size * grid_size
    priors = torch.stack(
        [
            cx.reshape(n_cells, 1).expand(n_cells, k),
            cy.reshape(n_cells, 1).expand(n_cells, k),
            w.expand(n_cells, k),
            h.expand(n_cells, k),
        ],
        dim=-1,
    ).reshape(-1, 4)
    return priors.clamp_(0.0, 1.0).to(torch.float32)
