"""Assign ground-truth boxes to priors, for a whole batch at once.

Ground truth arrives as one ``(n_i, 4)`` tensor per image. :func:`flatten_targets` concatenates it into
:class:`Targets`, flat rows tagged with their image, so :func:`match_priors` works on one ``(B, P)`` IoU
tensor of the B real boxes with no loop over images or boxes; :meth:`Targets.padded` gives the
``(N, M, 4)`` layout that :func:`match_priors_atss` reduces along. :class:`PriorBoxes` holds what both
derive from the priors, so that a training loop computes it once.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from utils.boxes import cxcywh_to_xyxy, pairwise_iou

logger = logging.getLogger(__name__)

__all__ = ["MATCHING_RULES", "Matches", "PriorBoxes", "TargetError", "Targets", "flatten_targets", "match_priors",
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


class PriorBoxes:
    """Priors with what matching derives from them, computed once instead of on every batch.

    Priors laid out as a square grid of identical cells (those of :func:`model.priors.create_prior_boxes`:
    cell row-major, the same ``S`` shapes in every cell) overlap a box separably: a prior's x-interval
    depends only on its column and shape, its y-interval only on its row and shape. The intersections
    with a box are then the product of ``G x S`` x-overlaps and ``G x S`` y-overlaps, one multiplication
    per (box, prior) pair where the general formula takes nine passes over the ``(B, P)`` pairs. Other
    layouts fall back to :func:`utils.boxes.pairwise_iou`; both give the same values.

    Args:
        priors_cxcywh: ``(P, 4)`` fractional priors.
    """

    def __init__(self, priors_cxcywh: Tensor) -> None:
        self.cxcywh = priors_cxcywh
        self.xyxy = cxcywh_to_xyxy(priors_cxcywh)
        self.area = (self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])
        self.grid = _square_grid(priors_cxcywh, self.xyxy)  # (G, S, lo, hi) or None

    def __len__(self) -> int:
        return self.cxcywh.shape[0]

    def iou(self, boxes_xyxy: Tensor) -> Tensor:
        """``(B, P)`` IoU of every box of ``(B, 4)`` with every prior."""
        if self.grid is None:
            return pairwise_iou(boxes_xyxy, self.xyxy)
        grid_size, shapes, lo, hi = self.grid
        n_boxes = boxes_xyxy.shape[0]
        # (B, 2, G * S): overlap along x (row 0) and y (row 1) with each column's / row's intervals.
        overlap = torch.minimum(boxes_xyxy[:, 2:, None], hi).sub_(torch.maximum(boxes_xyxy[:, :2, None], lo))
        overlap.clamp_(min=0)
        inter = overlap[:, 1].view(n_boxes, grid_size, 1, shapes) * overlap[:, 0].view(n_boxes, 1, grid_size, shapes)
        inter = inter.view(n_boxes, len(self))  # (B, P): rows outer, then columns, then shapes, as the priors
        box_area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
        union = (box_area[:, None] + self.area).sub_(inter)
        return inter.div_(union)


def _square_grid(priors_cxcywh: Tensor, priors_xyxy: Tensor) -> tuple[int, int, Tensor, Tensor] | None:
    """``(G, S, lo, hi)`` when the priors form a G x G grid of cells with the same S shapes, else None.

    ``lo`` and ``hi`` are ``(2, G * S)``: row 0 the x-intervals of the columns' priors, row 1 the
    y-intervals of the rows' priors, in (cell, shape) order.
    """
    n_priors = priors_cxcywh.shape[0]
    same_centre = (priors_cxcywh[:, :2] == priors_cxcywh[0, :2]).all(dim=1)
    shapes = int(same_centre.int().cumprod(0).sum())  # the first cell's priors
    grid_size = math.isqrt(n_priors // shapes)
    if grid_size * grid_size * shapes != n_priors:
        return None
    corners = priors_xyxy.view(grid_size, grid_size, shapes, 4)
    x_intervals, y_intervals = corners[..., 0::2], corners[..., 1::2]  # (G rows, G columns, S, 2)
    if not (torch.equal(x_intervals, x_intervals[:1].expand_as(x_intervals))
            and torch.equal(y_intervals, y_intervals[:, :1].expand_as(y_intervals))):
        return None
    x_intervals, y_intervals = x_intervals[0], y_intervals[:, 0]  # (G, S, 2) each
    intervals = torch.stack([x_intervals, y_intervals]).view(2, grid_size * shapes, 2)
    return grid_size, shapes, intervals[..., 0].contiguous(), intervals[..., 1].contiguous()


class Matches(NamedTuple):
    """Result of :func:`match_priors` for a batch of ``N`` images and ``P`` priors.

    Attributes:
        labels: ``(N, P)`` long, the matched box's label for positive priors, 0 (background) elsewhere.
        iou: ``(N, P)`` the prior's best IoU with any real box of its image (-1 when it has none).
        forced: ``(N, P)`` bool, the prior was claimed as a box's best prior.
        positive: ``(N, P)`` bool, ``forced | (iou >= threshold)``.
        positive_index: ``(K,)`` long, the positives as indices into the flattened ``(N * P)`` priors,
            in increasing order (``positive.view(-1).nonzero()``).
        positive_row: ``(K,)`` long, the row in :class:`Targets` of each positive's matched box.
    """

    labels: Tensor
    iou: Tensor
    forced: Tensor
    positive: Tensor
    positive_index: Tensor
    positive_row: Tensor

    def gt_index(self) -> Tensor:
        """``(N, P)`` long: the matched box's row in :class:`Targets` for positives, 0 elsewhere."""
        dense = torch.zeros_like(self.labels)
        return dense.view(-1).index_put_((self.positive_index,), self.positive_row).view_as(dense)


def flatten_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> Targets:
    """Concatenate per-image ground truth into :class:`Targets`.

    Args:
        boxes: ``N`` tensors of shape ``(n_i, 4)`` (fractional xyxy); ``n_i`` may be 0.
        labels: ``N`` tensors of shape ``(n_i,)`` (integers).

    Returns:
        :class:`Targets` on the device of the first box tensor, boxes in their common floating dtype (float32
        for integer boxes).
    """
    if len(boxes) != len(labels):
        raise TargetError(
            f"got {len(boxes)} box tensors but {len(labels)} label tensors; need one of each per image"
        )
    if len(boxes) == 0:
        raise TargetError("flatten_targets needs at least one image")
    # Checked on the concatenation, a handful of host-side tests per batch; a batch that fails them is
    # searched image by image for the entry to name.
    try:
        counts = [int(b.shape[0]) for b in boxes]
        flat_boxes = torch.cat(list(boxes))
        flat_labels = torch.cat(list(labels))
        # torch.cat skips 1-D empty tensors, so the boxes' dimensions are checked one by one.
        well_formed = (
            flat_boxes.dim() == 2 and flat_boxes.shape[1] == 4 and flat_labels.dim() == 1
            and all(b.dim() == 2 for b in boxes) and [int(lab.shape[0]) for lab in labels] == counts
            and not (flat_labels.dtype.is_floating_point or flat_labels.dtype == torch.bool)
        )  # fmt: skip
    except (AttributeError, IndexError, RuntimeError, TypeError):
        well_formed = False
    if not well_formed:
        _raise_target_error(boxes, labels)

    # The images' common dtype (torch.cat promotes), not the first's: integer boxes first would truncate the rest.
    device = boxes[0].device
    dtype = flat_boxes.dtype if flat_boxes.dtype.is_floating_point else torch.float32
    # The sizes are known on the host: no cumsum, and repeat_interleave needs no sync for its output size.
    count_and_first_row = torch.tensor([counts, [0, *itertools.accumulate(counts[:-1])]], device=device)
    count, first_row = count_and_first_row
    image = torch.repeat_interleave(count, output_size=flat_boxes.shape[0])
    return Targets(flat_boxes.to(dtype), flat_labels.to(device, torch.long), image, first_row, counts)


def _raise_target_error(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> None:
    """Name the first image whose boxes or labels are malformed (``flatten_targets``'s slow path)."""
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
    try:  # every entry is well formed: the tensors must be on several devices
        torch.cat(list(boxes))
        torch.cat(list(labels))
    except RuntimeError as error:
        raise TargetError(f"the boxes and labels of a batch must all be on one device: {error}") from error
    raise TargetError("the boxes and labels of this batch cannot be concatenated")


def match_priors(targets: Targets, priors: PriorBoxes | Tensor, threshold: float = 0.5) -> Matches:
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
        priors: :class:`PriorBoxes`, or the ``(P, 4)`` cxcywh priors to build them from.
        threshold: IoU from which a prior is positive.

    Returns:
        :class:`Matches`.
    """
    if isinstance(priors, Tensor):
        priors = PriorBoxes(priors)
    n_images, n_priors = len(targets.counts), len(priors)
    n_boxes = targets.boxes.shape[0]
    device = targets.boxes.device
    if n_boxes == 0:
        return _no_matches(n_images, n_priors, device)

    # One (B, P) row per real box; the per-image reductions are scatter_reduce calls over the rows'
    # images, so the cost follows the real box count, not the most crowded image.
    iou = priors.iou(targets.boxes)  # (B, P)
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
    winner = winner.scatter_reduce_(0, flat_prior, row_if_winner, reduce="amin")  # (N * P,)
    forced = (winner < n_boxes).view(n_images, n_priors)
    positive = forced | (prior_iou >= threshold)

    # Which box each positive takes: a forced prior its winning claimant; any other the first of its
    # image's boxes reaching its best IoU. The search runs over the positives' (prior, box) pairs, a few
    # percent of the B x P.
    positive_index = positive.view(-1).nonzero().squeeze(1)  # (K,)
    image_idx = positive_index.div(n_priors, rounding_mode="floor")
    first_row = targets.first_row[image_idx]
    # The image's rows are first_row + slot; the first slot reaching the prior's best IoU is a row of
    # that image, since the best IoU is one of its own. Slots past the image run into later rows (or
    # repeat the last one), which can only tie after that.
    slots = torch.arange(max(targets.counts), device=device)
    pair_row = (first_row[:, None] + slots).clamp_(max=n_boxes - 1)  # (K, max n_i)
    pair_index = pair_row.mul_(n_priors).add_((positive_index - image_idx * n_priors)[:, None])
    pair_iou = iou.view(-1).index_select(0, pair_index.view(-1)).view(pair_index.shape)
    reaches_best = pair_iou == prior_iou.view(-1)[positive_index, None]
    positive_winner = winner[positive_index]
    positive_row = torch.where(positive_winner < n_boxes, positive_winner.long(),
                               first_row + reaches_best.byte().argmax(dim=1))  # argmax: the first True

    labels = torch.zeros(n_images * n_priors, device=device, dtype=torch.long)
    labels.index_put_((positive_index,), targets.labels[positive_row])
    return Matches(labels=labels.view(n_images, n_priors), iou=prior_iou, forced=forced, positive=positive,
                   positive_index=positive_index, positive_row=positive_row)


def _no_matches(n_images: int, n_priors: int, device: torch.device) -> Matches:
    """Matches of a batch without boxes: every prior is background."""
    background = torch.zeros(n_images, n_priors, device=device, dtype=torch.long)
    no_match = background.bool()
    nothing = background.new_zeros(0)
    return Matches(background, torch.full_like(background, -1.0, dtype=torch.float32), no_match, no_match,
                   nothing, nothing)


def match_priors_atss(targets: Targets, priors: PriorBoxes | Tensor, n_candidates: int = 36) -> Matches:
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
        priors: :class:`PriorBoxes`, or the ``(P, 4)`` cxcywh priors to build them from.
        n_candidates: candidates per box (at most P).

    Returns:
        :class:`Matches`; ``iou`` is each prior's best IoU with any real box and ``forced`` marks the boxes'
        best priors, as for :func:`match_priors`.
    """
    if isinstance(priors, Tensor):
        priors = PriorBoxes(priors)
    n_priors = len(priors)
    if not 2 <= n_candidates <= n_priors:
        raise ValueError(f"n_candidates must be in [2, {n_priors}], got {n_candidates}")
    # A padded (N, M, P) layout: the per-box statistics (nearest candidates, mean and std of their IoUs)
    # are reductions along P, and M stays small in detection batches.
    gt_boxes_xyxy, gt_labels, valid = targets.padded()
    n_images, max_boxes, _ = gt_boxes_xyxy.shape
    iou = priors.iou(gt_boxes_xyxy.reshape(-1, 4)).view(n_images, max_boxes, n_priors)
    iou = iou.masked_fill(~valid[..., None], -1.0)

    box_centre = (gt_boxes_xyxy[..., :2] + gt_boxes_xyxy[..., 2:]) / 2
    x, y = priors.cxcywh[:, 0], priors.cxcywh[:, 1]  # prior centres
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
    positive_index = positive.view(-1).nonzero().squeeze(1)
    positive_row = (targets.first_row[:, None] + gt_index).view(-1)[positive_index]  # slot -> row
    return Matches(
        labels=labels,
        iou=iou.max(dim=1).values,
        forced=forced_claims.any(dim=1),
        positive=positive,
        positive_index=positive_index,
        positive_row=positive_row,
    )
