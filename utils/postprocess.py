"""Turn the head's raw outputs into per-image detections (score filter, decode, per-class NMS, top-k)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from utils.boxes import decode_boxes

logger = logging.getLogger(__name__)

__all__ = ["Detections", "PostprocessError", "detect_objects"]


class PostprocessError(ValueError):
    """Bad post-processing inputs or parameters."""


class Detections(NamedTuple):
    """Detections of one image, sorted by score descending.

    Attributes:
        boxes: ``(k, 4)`` fractional xyxy, clipped to [0, 1].
        labels: ``(k,)`` long, in 1..C-1.
        scores: ``(k,)`` float.
    """

    boxes: Tensor
    labels: Tensor
    scores: Tensor


def detect_objects(locs: Tensor, scores: Tensor, priors_cxcywh: Tensor, *, min_score: float = 0.01,
                   max_overlap: float = 0.45, top_k: int = 200, variances: Sequence[float] = (0.1, 0.2),
                   activation: str = "softmax") -> list[Detections]:
    """Detections of a batch from the head's raw outputs.

    Every (prior, object class) pair whose score is above ``min_score`` is a candidate; candidates go
    through class-wise NMS (IoU > ``max_overlap`` suppresses the lower score) and the ``top_k`` best of
    each image are kept. The whole batch goes through a single ``torchvision.ops.batched_nms`` call,
    grouped by ``image * C + class`` so images and classes never suppress each other.

    Args:
        locs: ``(N, P, 4)`` predicted offsets.
        scores: ``(N, P, C)`` raw logits, column 0 = background.
        priors_cxcywh: ``(P, 4)``.
        min_score: candidates need a score strictly above this.
        max_overlap: NMS IoU threshold.
        top_k: detections kept per image.
        variances: box coding variances.
        activation: ``"softmax"`` over all C columns, or ``"sigmoid"`` on columns 1..C-1 (for a model
            trained with sigmoid focal loss, see :func:`model.loss.score_activation_for`).

    Returns:
        ``N`` :class:`Detections`; an image with no candidate gets empty tensors.
    """
    if locs.dim() != 3 or locs.shape[2] != 4 or scores.dim() != 3 or scores.shape[:2] != locs.shape[:2]:
        raise PostprocessError(f"need locs (N, P, 4) and scores (N, P, C), got {tuple(locs.shape)} and {tuple(scores.shape)}")
    if priors_cxcywh.shape != (locs.shape[1], 4):
        raise PostprocessError(f"priors_cxcywh must be ({locs.shape[1]}, 4) to match locs, got {tuple(priors_cxcywh.shape)}")
    if scores.shape[2] < 2:
        raise PostprocessError(f"scores need >= 2 columns (background + classes), got {scores.shape[2]}")
    if activation not in ("softmax", "sigmoid"):
        raise PostprocessError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if top_k < 1:
        raise PostprocessError(f"top_k must be >= 1, got {top_k!r}")

    n_images, _, n_classes = scores.shape
    scores = scores.float()
    class_scores = scores.softmax(dim=-1)[..., 1:] if activation == "softmax" else scores[..., 1:].sigmoid()
    boxes = decode_boxes(locs.float(), priors_cxcywh.float(), variances).clamp_(0.0, 1.0)  # (N, P, 4)

    # All candidates of the batch as flat (image, prior, class) triples.
    image_idx, prior_idx, class_idx = (class_scores > min_score).nonzero(as_tuple=True)
    cand_scores = class_scores[image_idx, prior_idx, class_idx]
    cand_boxes = boxes[image_idx, prior_idx]
    keep = batched_nms(cand_boxes, cand_scores, image_idx * n_classes + class_idx, max_overlap)

    # batched_nms returns indices by decreasing score; a stable sort by image keeps that order within
    # each image, so a detection's rank in its image is its position minus the image's start.
    keep = keep[torch.sort(image_idx[keep], stable=True).indices]
    kept_images = image_idx[keep]
    counts = torch.bincount(kept_images, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - starts[kept_images]
    keep = keep[rank < top_k]
    counts = counts.clamp(max=top_k).tolist()

    split = zip(
        cand_boxes[keep].split(counts),
        (class_idx[keep] + 1).split(counts),
        cand_scores[keep].split(counts),
        strict=True,
    )
    return [Detections(boxes=b, labels=lab, scores=s) for b, lab, s in split]
