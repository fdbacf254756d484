"""Assign ground-truth boxes to priors, for a whole batch at once.

Ground truth arrives as one ``(n_i, 4)`` tensor per image. :func:`flatten_targets` concatenates it into
:class:`Targets`, flat rows tagged with their image, so :func:`match_priors` works on one ``(B, P)`` IoU
tensor of the B real boxes with no loop over images or boxes; :meth:`Targets.padded` gives the
``(N, M, 4)`` layout that :func:`match_priors_atss` reduces along.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from utils.boxes import cxcywh_to_xyxy, pairwise_iou

logger = logging.getLogger(__name__)

__all__ = ["MATCHING_RULES", "Matches", "TargetError", "Targets", "flatten_targets", "match_priors",
           "match_priors_atss"]

# "iou": SSD's fixed IoU threshold (match_priors); "atss": adaptive per-box thresholds (match_priors_atss).
MATCHING_RULES = ("iou", "atss")


class TargetError(ValueError):
    """Ground-truth boxes or labels with a wrong type, shape or length."""


class Targets(NamedTuple):
    """The ground truth of a batch as flat rows: the boxes of image 0, then those of image 1, and so on.

    Attributes:
        boxes: ``(B, 4)`` fractional xyxy boxes.
        labels: ``(B,)`` long.
        image: ``(B,)`` long, the image of each row.
        first_row: ``(N,)`` long, the row of each image's first box (where it would be, for an image
            without boxes).
        counts: boxes per image, ``N`` ints.
    """

    boxes: Tensor
    labels: Tensor
    image: Tensor
    first_row: Tensor
    counts: list[int]

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Targets:
        """The same targets on ``device``, boxes in ``dtype``."""
        return Targets(self.boxes.to(device, dtype), self.labels.to(device), self.image.to(device),
                       self.first_row.to(device), self.counts)

    def padded(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(boxes (N, M, 4), labels (N, M) long, valid (N, M) bool)`` with ``M = max(1, max n_i)``;
        padded entries are zero boxes with label 0 and ``valid`` False."""
        n_images, max_boxes = len(self.counts), max(1, max(self.counts))
        device = self.boxes.device
        boxes = self.boxes.new_zeros(n_images, max_boxes, 4)
        labels = torch.zeros(n_images, max_boxes, device=device, dtype=torch.long)
        valid = torch.zeros(n_images, max_boxes, device=device, dtype=torch.bool)
        slot = torch.arange(self.boxes.shape[0], device=device) - self.first_row[self.image]
        boxes[self.image, slot] = self.boxes
        labels[self.image, slot] = self.labels
        valid[self.image, slot] = True
        return boxes, labels, valid


class Matches(NamedTuple):
    """Result of :func:`match_priors` for a batch of ``N`` images and ``P`` priors.

    Attributes:
        labels: ``(N, P)`` long, the matched box's label for positive priors, 0 (background) elsewhere.
        gt_index: ``(N, P)`` long, the row of the matched box in :class:`Targets` for positives, 0
            elsewhere: the matched box of prior p in image n is ``targets.boxes[gt_index[n, p]]``.
        iou: ``(N, P)`` the prior's best IoU with any real box of its image (-1 when it has none).
        forced: ``(N, P)`` bool, the prior was claimed as a box's best prior.
        positive: ``(N, P)`` bool, ``forced | (iou >= threshold)``.
    """

    labels: Tensor
    gt_index: Tensor
    iou: Tensor
    forced: Tensor
    positive: Tensor


def flatten_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> Targets:
    """Concatenate per-image ground truth into :class:`Targets`.

    Args:
        boxes: ``N`` tensors of shape ``(n_i, 4)`` (fractional xyxy); ``n_i`` may be 0.
        labels: ``N`` tensors of shape ``(n_i,)`` (integers).

    Returns:
        :class:`Targets` on the device of the first box tensor, boxes in the dtype of the first.
    """
    if len(boxes) != len(labels):
        raise TargetError(
            f"got {len(boxes)} box tensors but {len(labels)} label tensors; need one of each per image"
        )
    if len(boxes) == 0:
        raise TargetError("flatten_targets needs at least one image")
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
    try:
        flat_boxes = torch.cat(list(boxes)).to(dtype)
        flat_labels = torch.cat(list(labels)).long()
    except RuntimeError as error:  # tensors on different devices
        raise TargetError(f"the boxes and labels of a batch must all be on one device: {error}") from error
    counts = [int(b.shape[0]) for b in boxes]
    counts_tensor = torch.tensor(counts, device=device)
    first_row = torch.cumsum(counts_tensor, 0) - counts_tensor
    image = torch.repeat_interleave(torch.arange(len(boxes), device=device), counts_tensor)
    return Targets(flat_boxes, flat_labels.to(device), image, first_row, counts)


def match_priors(targets: Targets, priors_cxcywh: Tensor, threshold: float = 0.5) -> Matches:
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
        targets: the batch's ground truth (see :func:`flatten_targets`), labels in 1..C-1.
        priors_cxcywh: ``(P, 4)``.
        threshold: IoU from which a prior is positive.

    Returns:
        :class:`Matches`.
    """
    n_images, n_priors = len(targets.counts), priors_cxcywh.shape[0]
    n_boxes = targets.boxes.shape[0]
    device = targets.boxes.device
    if n_boxes == 0:
        background = torch.zeros(n_images, n_priors, device=device, dtype=torch.long)
        no_match = background.bool()
        return Matches(background, background, torch.full_like(background, -1.0, dtype=torch.float32),
                       no_match, no_match)

    # One (B, P) row per real box; the per-image reductions are scatter_reduce calls over the rows'
    # images, so the cost follows the real box count, not the most crowded image.
    iou = pairwise_iou(targets.boxes, cxcywh_to_xyxy(priors_cxcywh))  # (B, P)
    # Best IoU of each prior over its image's boxes (-1 in images without boxes).
    prior_iou = iou.new_full((n_images, n_priors), -1.0)
    prior_iou = prior_iou.scatter_reduce_(0, targets.image[:, None].expand_as(iou), iou, reduce="amax")

    # Claims: every box claims its best prior (first index on ties). Per claimed prior the highest claim
    # IoU wins, then the first row (the first box of the image) among the claimants reaching it. Rows
    # travel as floats (exact below 2**24) because float scatter_reduce is ~20x faster on CPU.
    claim_iou, claim_prior = iou.max(dim=1)  # (B,)
    flat_prior = targets.image * n_priors + claim_prior
    best_claim = iou.new_full((n_images * n_priors,), -1.0).scatter_reduce_(0, flat_prior, claim_iou, "amax")
    row = torch.arange(n_boxes, device=device, dtype=iou.dtype)
    row_if_winner = torch.where(claim_iou == best_claim[flat_prior], row, float(n_boxes))
    winner = iou.new_full((n_images * n_priors,), float(n_boxes))
    winner = winner.scatter_reduce_(0, flat_prior, row_if_winner, reduce="amin").view(n_images, n_priors)
    forced = winner < n_boxes
    positive = forced | (prior_iou >= threshold)

    # Which box a prior above the threshold takes: the first of its image's boxes reaching its best IoU.
    # Only those priors (a few percent) need it, so the search runs over their (prior, box) pairs instead
    # of all B x P.
    image_idx, prior_idx = (positive & ~forced).nonzero(as_tuple=True)
    slots = torch.arange(max(targets.counts), device=device)
    pair_row = (targets.first_row[image_idx, None] + slots).clamp_(max=n_boxes - 1)  # (K, max n_i)
    counts = targets.first_row.new_tensor(targets.counts)
    pair_iou = iou[pair_row, prior_idx[:, None]].masked_fill_(slots >= counts[image_idx, None], -1.0)
    gt_index = torch.where(forced, winner.long(), 0)
    gt_index[image_idx, prior_idx] = targets.first_row[image_idx] + pair_iou.argmax(dim=1)  # first on ties

    labels = torch.where(positive, targets.labels[gt_index], 0)
    return Matches(labels=labels, gt_index=gt_index, iou=prior_iou, forced=forced, positive=positive)


def match_priors_atss(targets: Targets, priors_cxcywh: Tensor, n_candidates: int = 36) -> Matches:
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
        targets: the batch's ground truth (see :func:`flatten_targets`), labels in 1..C-1.
        priors_cxcywh: ``(P, 4)``.
        n_candidates: candidates per box (at most P).

    Returns:
        :class:`Matches`; ``iou`` is each prior's best IoU with any real box and ``forced`` marks the boxes'
        best priors, as for :func:`match_priors`.
    """
    n_priors = priors_cxcywh.shape[0]
    if not 2 <= n_candidates <= n_priors:
        raise ValueError(f"n_candidates must be in [2, {n_priors}], got {n_candidates}")
    # A padded (N, M, P) layout: the per-box statistics (nearest candidates, mean and std of their IoUs)
    # are reductions along P, and M stays small in detection batches.
    gt_boxes_xyxy, gt_labels, valid = targets.padded()
    n_images, max_boxes, _ = gt_boxes_xyxy.shape
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
        gt_index=torch.where(positive, targets.first_row[:, None] + gt_index, 0),  # slot -> row
        iou=iou.max(dim=1).values,
        forced=forced_claims.any(dim=1),
        positive=positive,
    )
