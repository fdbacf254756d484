"""Turn the head's raw outputs into per-image detections (score filter, decode, per-class NMS, top-k)."""

from __future__ import annotations

import logging
import numbers
import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from utils.boxes import aligned_iou, decode_boxes

logger = logging.getLogger(__name__)

__all__ = ["Detections", "PostprocessError", "detect_objects", "vote_boxes"]


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
                   activation: str = "softmax", candidates_per_image: int | None = None,
                   box_voting_iou: float | None = None) -> list[Detections]:
    """Detections of a batch from the head's raw outputs.

    Every (prior, object class) pair whose score is above ``min_score`` is a candidate; candidates go
    through class-wise NMS (IoU > ``max_overlap`` suppresses the lower score) and the ``top_k`` best of
    each image are kept. The whole batch goes through one ``torchvision.ops.batched_nms`` call (plus a
    rerun for the rare images described below), grouped by ``image * C + class`` so images and classes
    never suppress each other.

    NMS only runs on each image's ``candidates_per_image`` best candidates. This never changes the result:
    a candidate is suppressed only by higher-scored ones, so the kept status of the best candidates does
    not depend on the rest, and once ``top_k`` of them survive, no lower-scored candidate can enter the
    top ``top_k``. An image where fewer survive goes through NMS again on 4x more candidates.

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
        candidates_per_image: speed setting only (default ``2 * top_k``): an untrained model puts nearly
            all ``P * (C - 1)`` pairs above ``min_score``, and NMS cost grows with the candidate count.
        box_voting_iou: ``None`` (off) or an IoU: each kept detection's box becomes the mean of the boxes
            of every candidate of its image and class (score above ``min_score``, suppressed or not)
            that overlaps it by at least this much, itself included. Scores, labels and order do not
            change. See :func:`vote_boxes`.

    Returns:
        ``N`` :class:`Detections`; an image with no candidate gets empty tensors.
    """
    if locs.dim() != 3 or locs.shape[2] != 4 or scores.dim() != 3 or scores.shape[:2] != locs.shape[:2]:
        raise PostprocessError(
            f"need locs (N, P, 4) and scores (N, P, C), got {tuple(locs.shape)} and {tuple(scores.shape)}"
        )
    if priors_cxcywh.shape != (locs.shape[1], 4):
        raise PostprocessError(
            f"priors_cxcywh must be ({locs.shape[1]}, 4) to match locs, got {tuple(priors_cxcywh.shape)}"
        )
    if scores.shape[2] < 2:
        raise PostprocessError(f"scores need >= 2 columns (background + classes), got {scores.shape[2]}")
    if activation not in ("softmax", "sigmoid"):
        raise PostprocessError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    # `not lo <= x <= hi` rather than `x < lo or x > hi`: NaN must fail too (a NaN max_overlap turns NMS off).
    for name, value in (("min_score", min_score), ("max_overlap", max_overlap)):
        if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
            raise PostprocessError(f"{name} must be a number in [0, 1], got {value!r}")
    top_k = _count("top_k", top_k)
    candidates_per_image = 2 * top_k if candidates_per_image is None else _count("candidates_per_image",
                                                                                 candidates_per_image)
    if candidates_per_image < top_k:
        raise PostprocessError(f"candidates_per_image must be >= top_k={top_k}, got {candidates_per_image!r}")
    if box_voting_iou is not None and not (isinstance(box_voting_iou, numbers.Real) and 0.0 < box_voting_iou <= 1.0):
        raise PostprocessError(f"box_voting_iou must be None or in (0, 1], got {box_voting_iou!r}")

    # NaN would pass the clamp as a box and drop out of every score comparison: say so instead.
    finite = torch.isfinite(locs).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=(1, 2))
    if not bool(finite.all()):
        broken = (~finite).nonzero().flatten().tolist()
        raise PostprocessError(
            f"the model's outputs hold NaN or infinite values for images {broken[:10]} of the batch "
            f"({len(broken)} of {len(finite)}): its weights or inputs are broken"
        )

    n_images, _, n_classes = scores.shape
    scores = scores.float()
    class_scores = scores.softmax(dim=-1)[..., 1:] if activation == "softmax" else scores[..., 1:].sigmoid()
    boxes = decode_boxes(locs.float(), priors_cxcywh.float(), variances).clamp_(0.0, 1.0)  # (N, P, 4)
    # A box that lies off the image is a line or a point once clipped: it can match no object, and its IoU
    # with its copies is 0 / 0, so NMS would keep every one of them. Such priors are no candidates.
    has_area = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # (N, P)
    class_scores = class_scores * has_area[..., None]
    # (N, P * (C - 1)), pair index = prior * (C-1) + class; sizes given, as N may be 0
    pair_scores = class_scores.reshape(n_images, class_scores.shape[1] * class_scores.shape[2])

    n_candidates = (pair_scores > min_score).sum(dim=1)
    limit = min(candidates_per_image, pair_scores.shape[1])
    image_idx, pair_idx, keep, kept_per_image = _batched_class_nms(pair_scores, boxes, limit, min_score,
                                                                   max_overlap, n_classes)
    redo = (kept_per_image < top_k) & (n_candidates > limit)
    if bool(redo.any()):
        # Too many of the best candidates were suppressed in some images: rerun those on 4x more
        # candidates until each has top_k survivors or ran on all its candidates (a few passes at most).
        settled = keep[~redo[image_idx[keep]]]
        final_image, final_pair = [image_idx[settled]], [pair_idx[settled]]
        while bool(redo.any()):
            limit = min(4 * limit, pair_scores.shape[1])
            images = redo.nonzero().squeeze(1)
            r_image, r_pair, r_keep, r_kept = _batched_class_nms(pair_scores[images], boxes[images], limit,
                                                                 min_score, max_overlap, n_classes)
            again = (r_kept < top_k) & (n_candidates[images] > limit)
            done = ~again[r_image[r_keep]]
            final_image.append(images[r_image[r_keep][done]])
            final_pair.append(r_pair[r_keep][done])
            redo = torch.zeros_like(redo).index_fill_(0, images[again], True)
        image_idx, pair_idx = torch.cat(final_image), torch.cat(final_pair)
        keep = pair_scores[image_idx, pair_idx].argsort(descending=True, stable=True)
    pair_score = pair_scores[image_idx, pair_idx]

    # keep is ordered by decreasing score; a stable sort by image keeps that order within each image, so
    # a detection's rank in its image is its position minus the image's start.
    keep = keep[torch.sort(image_idx[keep], stable=True).indices]
    kept_images = image_idx[keep]
    counts = torch.bincount(kept_images, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - starts[kept_images]
    keep = keep[rank < top_k]
    counts = counts.clamp(max=top_k).tolist()

    image_idx, pair_idx = image_idx[keep], pair_idx[keep]
    prior_idx, class_idx = pair_idx // (n_classes - 1), pair_idx % (n_classes - 1)
    if box_voting_iou is None:
        kept_boxes = boxes[image_idx, prior_idx]
    else:
        kept_boxes = vote_boxes(boxes, class_scores, image_idx, prior_idx, class_idx, min_score, box_voting_iou)
    split = zip(kept_boxes.split(counts), (class_idx + 1).split(counts), pair_score[keep].split(counts), strict=True)
    return [Detections(boxes=b, labels=lab, scores=s) for b, lab, s in split]


def _count(name: str, value: object) -> int:
    """``value`` as an int >= 1, or a PostprocessError naming the parameter."""
    try:
        count = operator.index(value)  # ints, numpy ints; not floats or bools' look-alikes such as 2.0
    except TypeError:
        count = None
    if count is None or isinstance(value, bool) or count < 1:
        raise PostprocessError(f"{name} must be an integer >= 1, got {value!r}")
    return count


def vote_boxes(boxes: Tensor, class_scores: Tensor, image_idx: Tensor, prior_idx: Tensor, class_idx: Tensor,
               min_score: float, vote_iou: float, max_pairs: int = 1 << 22) -> Tensor:
    """Box voting: each detection's box becomes the mean of its class's candidate boxes around it.

    NMS keeps one box per object and throws away the others, although they are predictions of the same
    object from neighbouring priors. Averaging them reduces the error of any single prior's regression.
    On the demo, voting at IoU 0.5 raises both VOC mAPs for every seed but costs a little COCO AP: the
    looser neighbours pull tight boxes off. Voting at 0.7-0.75 raises COCO AP most (docs/BENCHMARKS.md).
    Every candidate counts the same: weighting the boxes by their scores gave less.

    Args:
        boxes: ``(N, P, 4)`` decoded boxes of every prior.
        class_scores: ``(N, P, C - 1)`` object-class scores.
        image_idx, prior_idx, class_idx: ``(K,)`` each, the detections (class_idx is 0-based over objects).
        min_score: candidates need a score strictly above this.
        vote_iou: candidates overlapping the detection by at least this much vote.
        max_pairs: detection x prior pairs handled at once, which bounds the memory.

    Returns:
        ``(K, 4)`` voted boxes.
    """
    n_priors = boxes.shape[1]
    voted = torch.empty(image_idx.shape[0], 4, dtype=boxes.dtype, device=boxes.device)
    step = max(1, max_pairs // n_priors)
    for start in range(0, image_idx.shape[0], step):  # chunks of detections, not one at a time
        images, priors, classes = (t[start:start + step] for t in (image_idx, prior_idx, class_idx))
        rows = torch.arange(images.shape[0], device=images.device)
        members = boxes[images]  # (k, P, 4)
        overlap = aligned_iou(members[rows, priors][:, None, :], members)  # (k, P)
        votes = (class_scores[images, :, classes] > min_score) & (overlap >= vote_iou)
        # The detection always votes for itself: a box clipped to zero area has an IoU of 0 / 0 = nan.
        votes[rows, priors] = True
        weights = votes.to(boxes.dtype)
        voted[start:start + step] = torch.bmm(weights[:, None, :], members)[:, 0] / weights.sum(1, keepdim=True)
    return voted


def _batched_class_nms(pair_scores: Tensor, boxes: Tensor, limit: int, min_score: float, max_overlap: float,
                       n_classes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Class-wise NMS of each image's ``limit`` best (prior, class) pairs above ``min_score``.

    Args:
        pair_scores: ``(N, P * (C - 1))``.
        boxes: ``(N, P, 4)`` decoded boxes.

    Returns:
        ``(image_idx (K,), pair_idx (K,), keep (k,), kept_per_image (N,))``: the candidates, the indices of
        the survivors among them by decreasing score, and the number of survivors of each image.
    """
    top_scores, top_pairs = pair_scores.topk(limit, dim=1)  # (N, limit), sorted
    image_idx, rank = (top_scores > min_score).nonzero(as_tuple=True)
    pair_idx = top_pairs[image_idx, rank]
    cand_boxes = boxes[image_idx, pair_idx // (n_classes - 1)]
    groups = image_idx * n_classes + pair_idx % (n_classes - 1)
    # In float64: batched_nms keeps groups apart by shifting each group's boxes by group * (1 + max coordinate),
    # hundreds here, where float32 resolves only about 1e-4 of a box in [0, 1] and IoUs near max_overlap
    # would come out on either side of it depending on the image's place in the batch.
    keep = batched_nms(cand_boxes.double(), top_scores[image_idx, rank].double(), groups, max_overlap)
    kept_per_image = torch.bincount(image_idx[keep], minlength=pair_scores.shape[0])
    return image_idx, pair_idx, keep, kept_per_image
