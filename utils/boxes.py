"""Box format conversions and prior-relative box coding.

All boxes here are fractional (divided by image width / height). ``xyxy`` is (x_min, y_min, x_max, y_max),
``cxcywh`` is (centre x, centre y, width, height).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

logger = logging.getLogger(__name__)

__all__ = [
    "aligned_iou", "box_iou", "cxcywh_to_xyxy", "decode_boxes", "encode_boxes", "pairwise_iou", "xyxy_to_cxcywh",
]

# Like torchvision's BoxCoder: a size offset above log(1000 / 16) would grow a prior more than 62x,
# which no real box needs; clamping before exp keeps an untrained head from overflowing to inf.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def xyxy_to_cxcywh(boxes_xyxy: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` cxcywh."""
    xy_min, xy_max = boxes_xyxy[..., :2], boxes_xyxy[..., 2:]
    return torch.cat([(xy_min + xy_max) / 2, xy_max - xy_min], dim=-1)


def cxcywh_to_xyxy(boxes_cxcywh: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy."""
    centre, size = boxes_cxcywh[..., :2], boxes_cxcywh[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def pairwise_iou(boxes_a_xyxy: Tensor, boxes_b_xyxy: Tensor) -> Tensor:
    """IoU of every box of ``(A, 4)`` with every box of ``(B, 4)``: ``(A, B)``, same values as
    ``torchvision.ops.box_iou``.
    """
    return aligned_iou(boxes_a_xyxy[:, None, :], boxes_b_xyxy[None, :, :])


def aligned_iou(boxes_a_xyxy: Tensor, boxes_b_xyxy: Tensor) -> Tensor:
    """IoU of corresponding boxes: ``(..., 4)`` and ``(..., 4)`` broadcast against each other to ``(...)``.

    ``(A, 1, 4)`` against ``(1, B, 4)`` pairs every box with every box (:func:`pairwise_iou`); ``(K, 1, 4)``
    against ``(K, P, 4)`` compares each of K boxes with its own P boxes.

    Matching calls this on every batch. It works on whole coordinate planes: torchvision's ``box_iou``
    broadcasts over a trailing dimension of size 2, and reading the coordinates as strided views of the
    ``(..., 4)`` tensors, which both run several times slower on CPU.
    """
    ax1, ay1, ax2, ay2 = boxes_a_xyxy.movedim(-1, 0).contiguous()
    bx1, by1, bx2, by2 = boxes_b_xyxy.movedim(-1, 0).contiguous()
    inter_w = torch.minimum(ax2, bx2).sub_(torch.maximum(ax1, bx1)).clamp_(min=0)
    inter_h = torch.minimum(ay2, by2).sub_(torch.maximum(ay1, by1)).clamp_(min=0)
    inter = inter_w.mul_(inter_h)
    union = ((ax2 - ax1) * (ay2 - ay1)) + ((bx2 - bx1) * (by2 - by1))
    return inter.div_(union.sub_(inter))


def encode_boxes(boxes_xyxy: Tensor, priors_cxcywh: Tensor,
                 variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Encode boxes as offsets from the priors they are matched to.

    ``g_c = (c_box - c_prior) / (v0 * wh_prior)`` and ``g_wh = log(wh_box / wh_prior) / v1``.

    Args:
        boxes_xyxy: ``(..., P, 4)`` boxes, one per prior (broadcast against the priors). Boxes must have
            positive width and height, else the size offsets are -inf.
        priors_cxcywh: ``(P, 4)``.
        variances: (centre variance, size variance).

    Returns:
        ``(..., P, 4)`` offsets (g_cx, g_cy, g_w, g_h).
    """
    # The box's centre and size as in xyxy_to_cxcywh, without building its (..., 4) tensor.
    xy_min, xy_max = boxes_xyxy[..., :2], boxes_xyxy[..., 2:]
    prior_centre, prior_size = priors_cxcywh[..., :2], priors_cxcywh[..., 2:]
    centre = ((xy_min + xy_max) / 2 - prior_centre) / (variances[0] * prior_size)
    size = torch.log((xy_max - xy_min) / prior_size) / variances[1]
    return torch.cat([centre, size], dim=-1)


def decode_boxes(offsets: Tensor, priors_cxcywh: Tensor,
                 variances: Sequence[float] = (0.1, 0.2)) -> Tensor:
    """Inverse of :func:`encode_boxes`.

    Args:
        offsets: ``(N, P, 4)`` (or any ``(..., P, 4)``) predicted offsets.
        priors_cxcywh: ``(P, 4)``.
        variances: (centre variance, size variance).

    Returns:
        ``(..., P, 4)`` xyxy boxes. Size offsets are clamped to ``log(1000/16)`` before ``exp`` so the
        result is always finite; the boxes are not clipped to the image.
    """
    centre = priors_cxcywh[..., :2] + offsets[..., :2] * variances[0] * priors_cxcywh[..., 2:]
    log_scale = (offsets[..., 2:] * variances[1]).clamp(max=_MAX_LOG_SCALE)
    size = priors_cxcywh[..., 2:] * torch.exp(log_scale)
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)
