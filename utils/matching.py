"""Assign ground-truth boxes to priors, for a whole batch at once.

Ground truth arrives as one ``(n_i, 4)`` tensor per image; :func:`pad_targets` packs it into ``(N, M, 4)``
with a validity mask so :func:`match_priors` can work on one ``(N, M, P)`` IoU tensor with no loop over
images or boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from utils.boxes import cxcywh_to_xyxy, pairwise_iou

logger = logging.getLogger(__name__)

__all__ = ["MATCHING_RULES", "Matches", "TargetError", "match_priors", "match_priors_atss", "pad_targets"]

# "iou": SSD's fixed IoU threshold (match_priors); "atss": adaptive per-box thresholds (match_priors_atss).
MATCHING_RULES = ("iou", "atss")


class TargetError(ValueError):
    """Ground-truth boxes or labels with a wrong type, shape or length."""


class Matches(NamedTuple):
    """Result of :func:`match_priors` for a batch of ``N`` images and ``P`` priors.

    Attributes:
        labels: ``(N, P)`` long, the matched box's label for positive priors, 0 (background) elsewhere.
        gt_index: ``(N, P)`` long, index of the matched box in the padded ground truth for positives (the
            matched box of prior p in image n is ``gt_boxes_xyxy[n, gt_index[n, p]]``), 0 elsewhere.
        iou: ``(N, P)`` the prior's best IoU with any real box of its image (-1 when it has none).
        forced: ``(N, P)`` bool, the prior was claimed as a box's best prior.
        positive: ``(N, P)`` bool, ``forced | (iou >= threshold)``.
    """

    labels: Tensor
    gt_index: Tensor
    iou: Tensor
    forced: Tensor
    positive: Tensor


def pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Pack per-image ground truth into padded batch tensors.

    Args:
        boxes: ``N`` tensors of shape ``(n_i, 4)`` (fractional xyxy); ``n_i`` may be 0.
        labels: ``N`` tensors of shape ``(n_i,)`` (long).

    Returns:
        ``(boxes (N, M, 4), labels (N, M) long, valid (N, M) bool)`` with ``M = max(1, max n_i)`` so the
        box dimension is never empty; padded entries are zero boxes with label 0 and ``valid`` False.
        Tensors live on the device and dtype of the first box tensor.
    """
    if len(boxes) != len(labels):
        raise TargetError(
            f"got {len(boxes)} box tensors but {len(labels)} label tensors; need one of each per image"
        )
    if len(boxes) == 0:
        raise TargetError("pad_targets needs at least one image")
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise TargetError(f"boxes[{i}] must be a (n, 4) tensor, got {shape}")
        if not isinstance(lab, Tensor) or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            shape = tuple(lab.shape) if isinstance(lab, Tensor) else type(lab).__name__
            raise TargetError(
                f"labels[{i}] must be a ({b.shape[0]},) tensor to match boxes[{i}], got {shape}"
            )
        if lab.dtype.is_floating_point or lab.dtype == torch.bool:
            raise TargetError(f"labels[{i}] must hold integers, got dtype {lab.dtype}")

    device, dtype = boxes[0].device, boxes[0].dtype
    counts_list = [int(b.shape[0]) for b in boxes]
    n_images, max_boxes = len(boxes), max(1, max(counts_list))
    padded_boxes = torch.zeros(n_images, max_boxes, 4, device=device, dtype=dtype)
    padded_labels = torch.zeros(n_images, max_boxes, device=device, dtype=torch.long)
    valid = torch.zeros(n_images, max_boxes, device=device, dtype=torch.bool)
    if sum(counts_list) == 0:
        return padded_boxes, padded_labels, valid

    # One scatter for the whole batch: row = image index, column = position of the box in its image.
    counts = torch.tensor(counts_list, device=device)
    image_index = torch.repeat_interleave(torch.arange(n_images, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(image_index.numel(), device=device) - starts[image_index]
    padded_boxes[image_index, slot] = torch.cat([b.to(device, dtype) for b in boxes])
    padded_labels[image_index, slot] = torch.cat([lab.to(device) for lab in labels]).long()
    valid[image_index, slot] = True
    return padded_boxes, padded_labels, valid


def match_priors(gt_boxes_xyxy: Tensor, gt_labels: Tensor, valid: Tensor, priors_cxcywh: Tensor,
                 threshold: float = 0.5) -> Matches:
    """Match every prior of every image to a ground-truth box or to background.

    Rules, applied to the whole batch at once:

    1. Every real box claims the prior it overlaps most (its best prior), which becomes positive even
       when that IoU is below ``threshold``: no box is left without a prior because of its shape.
    2. When several boxes claim the same prior, the box with the highest IoU with that prior wins, and
       on equal IoU the box that comes first in the image's list. The other claimants keep no forced
       prior (they can still win priors in step 3).
    3. Every other prior takes the box it overlaps most if that IoU is ``>= threshold``, else it is
       background (label 0). Equal IoUs go to the box that comes first.

    Args:
        gt_boxes_xyxy: ``(N, M, 4)`` padded fractional boxes (see :func:`pad_targets`).
        gt_labels: ``(N, M)`` long labels in 1..C-1.
        valid: ``(N, M)`` bool, False for padding.
        priors_cxcywh: ``(P, 4)``.
        threshold: IoU from which a prior is positive.

    Returns:
        :class:`Matches`.
    """
    n_images, max_boxes, _ = gt_boxes_xyxy.shape
    n_priors = priors_cxcywh.shape[0]

    # Work on the real boxes only, as flat (B, P) rows tagged with their image and slot, with per-image
    # reductions as scatter_reduce calls: no (N, M, P) tensor, so the cost follows the real box count
    # rather than the padding (a few crowded images would otherwise inflate M for the whole batch).
    box_image, box_slot = valid.nonzero(as_tuple=True)  # (B,), row-major: same order as [valid]
    iou = pairwise_iou(gt_boxes_xyxy[valid], cxcywh_to_xyxy(priors_cxcywh))  # (B, P)
    rows = box_image[:, None].expand_as(iou)

    # Best IoU of each prior over its image's boxes (-1 in images without boxes).
    prior_iou = iou.new_full((n_images, n_priors), -1.0).scatter_reduce_(0, rows, iou, reduce="amax")

    # Claims: every box claims its best prior (first index on ties). Per claimed prior the highest claim
    # IoU wins, then the lowest slot among the claimants reaching it.
    claim_iou, claim_prior = iou.max(dim=1)  # (B,)
    slot = box_slot.to(iou.dtype)  # floats (exact below 2**24): float scatter_reduce is ~20x faster on CPU
    flat_prior = box_image * n_priors + claim_prior
    best_claim = iou.new_full((n_images * n_priors,), -1.0).scatter_reduce_(0, flat_prior, claim_iou, "amax")
    slot_if_winner = torch.where(claim_iou == best_claim[flat_prior], slot, float(max_boxes))
    winner = iou.new_full((n_images * n_priors,), float(max_boxes))
    winner = winner.scatter_reduce_(0, flat_prior, slot_if_winner, reduce="amin").view(n_images, n_priors)
    forced = winner < max_boxes
    positive = forced | (prior_iou >= threshold)

    # Which box a prior above the threshold takes: the first slot reaching its best IoU. Only those priors
    # (a few percent) need it, so the search runs over their (prior, slot) pairs instead of all B x P.
    image_idx, prior_idx = (positive & ~forced).nonzero(as_tuple=True)
    boxes_per_image = valid.sum(dim=1)
    first_row = torch.cumsum(boxes_per_image, 0) - boxes_per_image  # flat row of each image's slot 0
    slots = torch.arange(max_boxes, device=iou.device)
    pair_row = (first_row[image_idx, None] + slots).clamp_(max=iou.shape[0] - 1)  # (K, M)
    pair_iou = iou[pair_row, prior_idx[:, None]].masked_fill_(~valid[image_idx], -1.0)
    gt_index = torch.where(forced, winner.long(), 0)
    gt_index[image_idx, prior_idx] = pair_iou.argmax(dim=1)  # first slot on equal IoU

    labels = torch.where(positive, gt_labels.gather(1, gt_index), torch.zeros_like(gt_index))
    return Matches(labels=labels, gt_index=gt_index, iou=prior_iou, forced=forced, positive=positive)


def match_priors_atss(gt_boxes_xyxy: Tensor, gt_labels: Tensor, valid: Tensor, priors_cxcywh: Tensor,
                      n_candidates: int = 36) -> Matches:
    """Match priors to boxes with ATSS's adaptive IoU threshold (Zhang et al., CVPR 2020), for a whole batch.

    A fixed IoU threshold suits boxes of the priors' shapes and leaves the others with their single best
    prior: a box with sides of 12 % of the image overlaps no 0.2 prior by 0.5, so it trains one prior while a
    large box trains a dozen. ATSS sets the threshold per box from the overlaps it could have:

    1. The box's candidates are the ``n_candidates`` priors whose centres lie nearest the box's centre
       (36: the 4 nearest cells of 9 priors).
    2. Its threshold is the mean plus the standard deviation (unbiased) of the candidates' IoUs: low for a
       small or elongated box, whose candidates all overlap it a little, high for a box that some prior fits.
    3. A candidate is positive for the box if its IoU reaches the threshold and its centre lies strictly
       inside the box. Each box's best prior (the first on equal IoU) is positive as well, as in
       :func:`match_priors`, so no box is left without one.
    4. A prior positive for several boxes takes the one it overlaps most (the first on equal IoU); every
       other prior is background.

    Args:
        gt_boxes_xyxy: ``(N, M, 4)`` padded fractional boxes (see :func:`pad_targets`).
        gt_labels: ``(N, M)`` long labels in 1..C-1.
        valid: ``(N, M)`` bool, False for padding.
        priors_cxcywh: ``(P, 4)``.
        n_candidates: candidates per box (at most P).

    Returns:
        :class:`Matches`; ``iou`` is each prior's best IoU with any real box and ``forced`` marks the boxes'
        best priors, as for :func:`match_priors`.
    """
    n_images, max_boxes, _ = gt_boxes_xyxy.shape
    n_priors = priors_cxcywh.shape[0]
    if not 2 <= n_candidates <= n_priors:
        raise ValueError(f"n_candidates must be in [2, {n_priors}], got {n_candidates}")
    # A padded (N, M, P) layout: the per-box statistics (nearest candidates, mean and std of their IoUs)
    # are reductions along P, and M stays small in detection batches.
    iou = pairwise_iou(gt_boxes_xyxy.reshape(-1, 4), cxcywh_to_xyxy(priors_cxcywh))
    iou = iou.view(n_images, max_boxes, n_priors)
    iou = iou.masked_fill(~valid[..., None], -1.0)

    box_centre = (gt_boxes_xyxy[..., :2] + gt_boxes_xyxy[..., 2:]) / 2
    x, y = priors_cxcywh[:, 0], priors_cxcywh[:, 1]  # prior centres
    # Squared distances from the x and y planes: a reduction over a trailing dimension of 2 is slow on CPU.
    dx = box_centre[..., 0:1] - x
    dy = box_centre[..., 1:2] - y
    distance = dx * dx + dy * dy  # (N, M, P)
    candidates = distance.topk(n_candidates, dim=-1, largest=False).indices  # (N, M, K)
    candidate_iou = iou.gather(-1, candidates)
    box_threshold = candidate_iou.mean(dim=-1) + candidate_iou.std(dim=-1)  # (N, M)
    is_candidate = torch.zeros_like(iou, dtype=torch.bool).scatter_(-1, candidates, True)

    centre_inside = (
        (x > gt_boxes_xyxy[..., 0:1]) & (x < gt_boxes_xyxy[..., 2:3])
        & (y > gt_boxes_xyxy[..., 1:2]) & (y < gt_boxes_xyxy[..., 3:4])
    )  # fmt: skip
    claims = is_candidate & centre_inside & (iou >= box_threshold[..., None]) & valid[..., None]
    best_prior = iou.argmax(dim=-1, keepdim=True)  # (N, M, 1), first on ties
    forced_claims = torch.zeros_like(claims).scatter_(-1, best_prior, True) & valid[..., None]
    claims |= forced_claims

    # Per prior, the claiming box with the highest IoU; max returns the first index on ties.
    claim_iou = iou.masked_fill(~claims, -2.0)
    best_claim_iou, gt_index = claim_iou.max(dim=1)  # (N, P)
    positive = best_claim_iou > -2.0
    labels = torch.where(positive, gt_labels.gather(1, gt_index), torch.zeros_like(gt_index))
    return Matches(
        labels=labels,
        gt_index=gt_index,
        iou=iou.max(dim=1).values,
        forced=forced_claims.any(dim=1),
        positive=positive,
    )
