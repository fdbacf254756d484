"""MultiBox loss: Smooth L1 localization plus a classification loss over the matched priors.

Classification is either softmax cross-entropy with hard-negative mining (the SSD recipe) or a focal
loss (RetinaNet), sigmoid or softmax. Everything is vectorized over the batch, with no Python loop over
images, boxes or priors; host syncs are limited to the target check and the data-dependent sizes (positives,
mined negatives).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from utils.boxes import encode_boxes
from utils.matching import (
    MATCHING_RULES,
    Matches,
    PriorBoxes,
    TargetError,
    Targets,
    flatten_targets,
    match_priors,
    match_priors_atss,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFICATION_LOSSES",
    "LossInputError",
    "LossOutput",
    "MultiBoxLoss",
    "hard_negative_mask",
    "score_activation_for",
]

CLASSIFICATION_LOSSES = ("hard_negative", "focal_sigmoid", "focal_softmax")
# Box coordinates accepted by the loss: fractional, with up to one image size beyond each side (a box may
# reach out of the image; one further out has pixel coordinates or is not a box of this image).
_COORDINATE_RANGE = (-1.0, 2.0)


class LossInputError(ValueError):
    """Bad loss configuration or inputs (shapes, label range, degenerate boxes)."""


class LossOutput(NamedTuple):
    """Loss parts of one batch; ``total = confidence + alpha * localization``."""

    total: Tensor
    localization: Tensor
    confidence: Tensor
    n_positives: int


def score_activation_for(classification: str) -> str:
    """Activation that turns the head's logits into class scores for a model trained with this loss.

    ``"sigmoid"`` for ``focal_sigmoid`` (the background column is unused there), ``"softmax"`` otherwise;
    pass it as ``activation`` to :func:`utils.postprocess.detect_objects`.
    """
    if classification not in CLASSIFICATION_LOSSES:
        raise LossInputError(f"classification must be one of {CLASSIFICATION_LOSSES}, got {classification!r}")
    return "sigmoid" if classification == "focal_sigmoid" else "softmax"


def hard_negative_mask(neg_loss: Tensor, positive: Tensor, neg_pos_ratio: float,
                       ignored: Tensor | None = None) -> Tensor:
    """Select, per image, the ``neg_pos_ratio * n_pos`` negatives with the highest loss.

    Negatives are the priors that are neither positive nor ``ignored``; the count is capped by the
    image's number of negatives. The counts differ between images, while one ``topk`` call takes a single
    ``k``: each image's row is extended with ``k_max - n_neg_i`` placeholders that outrank every prior, so
    one unsorted top-``k_max`` over the batch returns the placeholders plus exactly that image's
    ``n_neg_i`` hardest negatives. Unsorted, ``topk`` is a linear-time selection; the classic
    alternatives (a sorted top-k, or sorting the losses and then the sort indices to get every prior's
    rank) sort, which cost several times more here.

    Args:
        neg_loss: ``(N, P)`` per-prior classification loss (no gradient needed).
        positive: ``(N, P)`` bool.
        neg_pos_ratio: negatives kept per positive.
        ignored: optional ``(N, P)`` bool, priors that may not be chosen (e.g. near misses of a box).

    Returns:
        ``(N, P)`` bool mask of the selected negatives (never a positive or an ignored prior).
    """
    n_images, n_priors = positive.shape
    n_pos = positive.sum(dim=1, keepdim=True)
    if ignored is None:
        excluded, n_available = positive, n_priors - n_pos
    else:
        excluded = positive | ignored
        n_available = n_priors - excluded.sum(dim=1, keepdim=True)
    # No image has more negatives than priors: a larger ratio selects the same, and would overflow int64.
    neg_pos_ratio = min(float(neg_pos_ratio), float(n_priors))
    if neg_pos_ratio.is_integer():
        wanted = n_pos * int(neg_pos_ratio)
    else:
        wanted = (n_pos * neg_pos_ratio).floor_().long()
    n_neg = torch.minimum(wanted, n_available)  # (N, 1)
    k_max = int(n_neg.max()) if n_neg.numel() else 0
    if k_max == 0:
        return torch.zeros_like(positive)
    # Excluded priors rank last, below every negative, so they are never among an image's top n_neg_i.
    placeholders = torch.arange(k_max, device=positive.device) < (k_max - n_neg)  # (N, k_max)
    padding = torch.where(placeholders, math.inf, -math.inf).to(neg_loss.dtype)
    extended = torch.cat([neg_loss.detach(), padding], dim=1)
    extended[:, :n_priors].masked_fill_(excluded, -math.inf)
    chosen = extended.topk(k_max, dim=1, sorted=False).indices  # (N, k_max), indices >= P are placeholders
    mask = torch.zeros(n_images, n_priors + k_max, dtype=torch.bool, device=positive.device)
    return mask.scatter_(1, chosen, True)[:, :n_priors]


class _SelectedCrossEntropySum(torch.autograd.Function):
    """Sum of the cross-entropies of the selected priors, from log-probabilities computed beforehand.

    Hard-negative mining needs the log-softmax of every prior, but only the selected ones (about 4 x n_pos
    of N x P) carry a gradient. Reusing that log-softmax saves a second pass over the selected rows in the
    forward, and the backward computes ``softmax - one_hot`` for those rows only, where autograd through
    the full log-softmax would touch every prior.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, log_probs: Tensor, cross_entropy: Tensor, target: Tensor,
                selected: Tensor) -> Tensor:
        """``scores`` (N, P, C) only carries the gradient; ``log_probs`` is its log-softmax and
        ``cross_entropy`` (N, P) the per-prior loss for ``target``; ``selected`` (N, P) bool."""
        ctx.save_for_backward(log_probs, target, selected)
        return cross_entropy.mul(selected).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        log_probs, target, selected = ctx.saved_tensors
        n_classes = log_probs.shape[-1]
        rows = selected.view(-1).nonzero().squeeze(1)  # flat (image, prior) indices
        rows_grad = log_probs.reshape(-1, n_classes).index_select(0, rows).exp_()  # their softmax
        # Rows of an identity matrix are the one-hot targets: one gather instead of indexing every row's
        # target element, a few times cheaper for the thousands of selected rows.
        identity = torch.eye(n_classes, dtype=rows_grad.dtype, device=rows_grad.device)
        rows_grad.sub_(identity.index_select(0, target.view(-1).index_select(0, rows)))
        grad_scores = log_probs.new_zeros(log_probs.shape)  # contiguous, whatever the layout of the logits
        grad_scores.view(-1, n_classes).index_copy_(0, rows, rows_grad.mul_(grad_output))
        return grad_scores, None, None, None, None


def _position(targets: Targets, row: int) -> str:
    """``"[image][box]"`` of a row of the flat targets, as the caller's per-image lists index it."""
    image = int(targets.image[row])
    return f"[{image}][{row - int(targets.first_row[image])}]"


class MultiBoxLoss(nn.Module):
    """Loss of the single-shot detector.

    Args:
        priors_cxcywh: ``(P, 4)`` priors, same order as the head's outputs.
        threshold: IoU from which a prior is matched to a box (see :func:`utils.matching.match_priors`).
        neg_pos_ratio: hard negatives kept per positive, per image (``hard_negative`` only).
        alpha: weight of the localization loss in the total.
        variances: box coding variances (centre, size).
        classification: ``"hard_negative"``, ``"focal_sigmoid"`` or ``"focal_softmax"``.
        focal_gamma: focusing parameter of the focal losses.
        focal_alpha: weight of foreground targets in the focal losses (background gets ``1 - alpha``).
        ignore_threshold: priors that are not positive but whose best IoU is ``>= ignore_threshold``
            are near misses, left out of the classification loss instead of being trained as
            background. Default: ``min(0.4, threshold)`` for the focal losses (RetinaNet's band), no
            band for ``hard_negative`` (SSD's recipe, where every non-positive prior is a negative).
        matching: ``"iou"`` (SSD: a box's best prior plus every prior with IoU >= ``threshold``,
            :func:`utils.matching.match_priors`) or ``"atss"`` (an adaptive IoU threshold per box,
            :func:`utils.matching.match_priors_atss`; ``threshold`` is then unused).
        atss_candidates: ``"atss"`` only: priors nearest each box's centre that it may match.
    """

    def __init__(self, priors_cxcywh: Tensor, threshold: float = 0.5, neg_pos_ratio: float = 3,
                 alpha: float = 1.0, variances: Sequence[float] = (0.1, 0.2),
                 classification: str = "hard_negative", focal_gamma: float = 2.0, focal_alpha: float = 0.25,
                 ignore_threshold: float | None = None, matching: str = "iou",
                 atss_candidates: int = 36) -> None:
        super().__init__()
        if priors_cxcywh.dim() != 2 or priors_cxcywh.shape[1] != 4 or priors_cxcywh.shape[0] == 0:
            raise LossInputError(
                f"priors_cxcywh must be a non-empty (P, 4) tensor, got {tuple(priors_cxcywh.shape)}"
            )
        score_activation_for(classification)  # validates the name
        if not 0.0 < threshold <= 1.0:
            raise LossInputError(f"threshold must be in (0, 1], got {threshold!r}")
        if ignore_threshold is None and classification != "hard_negative":
            ignore_threshold = min(0.4, threshold)  # RetinaNet's 0.4, or the threshold when that is lower
        if ignore_threshold is not None and not 0.0 < ignore_threshold <= threshold:
            raise LossInputError(
                f"ignore_threshold must be in (0, threshold={threshold}], got {ignore_threshold!r}"
            )
        # `not x >= 0` rather than `x < 0`: NaN must fail too (an infinite gamma would zero the focal loss).
        if not (math.isfinite(neg_pos_ratio) and neg_pos_ratio >= 0):
            raise LossInputError(f"neg_pos_ratio must be a finite number >= 0, got {neg_pos_ratio!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise LossInputError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not (math.isfinite(focal_gamma) and focal_gamma >= 0 and 0.0 <= focal_alpha <= 1.0):
            raise LossInputError(
                f"need a finite focal_gamma >= 0 and focal_alpha in [0, 1], got {focal_gamma!r}, {focal_alpha!r}"
            )
        if matching not in MATCHING_RULES:
            raise LossInputError(f"matching must be one of {MATCHING_RULES}, got {matching!r}")
        if matching == "atss" and not 2 <= atss_candidates <= priors_cxcywh.shape[0]:
            raise LossInputError(
                f"atss_candidates must be in [2, {priors_cxcywh.shape[0]}] (the number of priors), "
                f"got {atss_candidates!r}"
            )
        if len(variances) != 2 or not all(math.isfinite(v) and v > 0 for v in variances):
            raise LossInputError(f"variances must be two finite numbers > 0, got {variances!r}")
        # Not persistent: priors derive from the config, so they stay out of checkpoints.
        self.register_buffer("priors_cxcywh", priors_cxcywh.detach().float().clone(), persistent=False)
        # What matching derives from the priors, computed once (see _priors_on).
        self._prior_boxes_source = self.priors_cxcywh
        self._prior_boxes = PriorBoxes(self.priors_cxcywh)
        self.threshold = float(threshold)
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.alpha = float(alpha)
        self.variances = (float(variances[0]), float(variances[1]))
        self.classification = classification
        self.focal_gamma = float(focal_gamma)
        self.focal_alpha = float(focal_alpha)
        self.ignore_threshold = None if ignore_threshold is None else float(ignore_threshold)
        self.matching = matching
        self.atss_candidates = int(atss_candidates)

    @property
    def score_activation(self) -> str:
        """``"softmax"`` or ``"sigmoid"``: how post-processing must read this loss's logits."""
        return score_activation_for(self.classification)

    def _check_inputs(self, predicted_locs: Tensor, predicted_scores: Tensor, boxes: Sequence[Tensor],
                      labels: Sequence[Tensor]) -> None:
        n_priors = self.priors_cxcywh.shape[0]
        if predicted_locs.dim() != 3 or predicted_locs.shape[1:] != (n_priors, 4):
            raise LossInputError(
                f"predicted_locs must be (N, {n_priors}, 4), got {tuple(predicted_locs.shape)}"
            )
        if predicted_scores.dim() != 3 or predicted_scores.shape[:2] != predicted_locs.shape[:2]:
            raise LossInputError(
                f"predicted_scores must be (N, {n_priors}, C) with N={predicted_locs.shape[0]}, "
                f"got {tuple(predicted_scores.shape)}"
            )
        if predicted_scores.shape[2] < 2:
            raise LossInputError(
                f"predicted_scores needs >= 2 classes (background + 1), got {predicted_scores.shape[2]}"
            )
        if len(boxes) != predicted_locs.shape[0]:
            raise LossInputError(
                f"got {len(boxes)} box tensors for a batch of {predicted_locs.shape[0]} images"
            )

    def _priors_on(self, device: torch.device) -> PriorBoxes:
        # Rebuilt only when the module moved (.to() replaces the buffer) or the inputs sit elsewhere.
        if self._prior_boxes_source is not self.priors_cxcywh or self._prior_boxes.cxcywh.device != device:
            self._prior_boxes_source = self.priors_cxcywh
            self._prior_boxes = PriorBoxes(self.priors_cxcywh.to(device))
        return self._prior_boxes

    def _check_targets(self, targets: Targets, n_classes: int) -> None:
        # Bad targets would otherwise surface later as NaN or a CUDA assert, or match nothing without a word
        # (pixel coordinates, a box off the image). One host sync for the batch: the corners', sides' and
        # labels' extremes. A NaN side makes its minimum NaN, an infinite coordinate one side infinite or NaN;
        # the rows are searched only when something is wrong.
        boxes, labels = targets.boxes, targets.labels
        if boxes.shape[0] == 0:
            return
        corner_min, corner_max = torch.aminmax(boxes, dim=0)  # (4,) each: x_min, y_min, x_max, y_max
        side_min, side_max = torch.aminmax(boxes[:, 2:] - boxes[:, :2])
        label_min, label_max = torch.aminmax(labels)
        extremes = torch.cat([corner_min, corner_max, torch.stack([side_min, side_max]),
                              torch.stack([label_min, label_max]).to(boxes.dtype)]).tolist()
        corner_min, corner_max, (side_min, side_max, label_min, label_max) = extremes[:4], extremes[4:8], extremes[8:]
        lowest, highest = min(corner_min[:2]), max(corner_max[2:])  # of all coordinates, when the sides are > 0
        last_start, first_end = max(corner_max[:2]), min(corner_min[2:])  # every box overlaps the image
        if (side_min > 0 and side_max < math.inf and label_min >= 1 and label_max < n_classes
                and _COORDINATE_RANGE[0] <= lowest and highest <= _COORDINATE_RANGE[1]
                and last_start < 1 and first_end > 0):
            return
        x_min, y_min, x_max, y_max = boxes.unbind(dim=1)
        # (rows that fail, what is wrong with one), in the order they are reported.
        problems = [
            (~(torch.isfinite(boxes).all(dim=1) & (x_max > x_min) & (y_max > y_min)),
             lambda row: f"boxes{_position(targets, row)} = {boxes[row].tolist()} is not a finite box with "
                         "x_max > x_min and y_max > y_min"),
            ((boxes < _COORDINATE_RANGE[0]).any(dim=1) | (boxes > _COORDINATE_RANGE[1]).any(dim=1),
             lambda row: f"boxes{_position(targets, row)} = {boxes[row].tolist()} has a coordinate outside "
                         f"{list(_COORDINATE_RANGE)}: boxes are fractional x_min, y_min, x_max, y_max (pixels "
                         "divided by the image's width and height), not pixels"),
            ((x_min >= 1) | (y_min >= 1) | (x_max <= 0) | (y_max <= 0),
             lambda row: f"boxes{_position(targets, row)} = {boxes[row].tolist()} lies outside the image: a "
                         "fractional box must overlap [0, 1] x [0, 1] to be matched to a prior"),
            ((labels < 1) | (labels >= n_classes),
             lambda row: f"labels{_position(targets, row)} = {int(labels[row])} is outside 1..{n_classes - 1} "
                         f"(0 is background, the model has {n_classes} classes)"),
        ]
        found = torch.stack([failing.any() for failing, _ in problems]).tolist()
        for (failing, describe), any_row in zip(problems, found, strict=True):
            if any_row:
                raise TargetError(describe(int(failing.nonzero()[0])))

    def forward(self, predicted_locs: Tensor, predicted_scores: Tensor, boxes: Sequence[Tensor],
                labels: Sequence[Tensor]) -> LossOutput:
        """Compute the loss of a batch.

        Args:
            predicted_locs: ``(N, P, 4)`` predicted offsets.
            predicted_scores: ``(N, P, C)`` raw class logits, column 0 = background.
            boxes: ``N`` tensors ``(n_i, 4)`` of fractional xyxy boxes (``n_i`` may be 0); each must overlap
                the image [0, 1] x [0, 1], and its coordinates lie in [-1, 2].
            labels: ``N`` long tensors ``(n_i,)`` in 1..C-1.

        Returns:
            :class:`LossOutput`; both parts are divided by the batch's number of positives (at least 1),
            so a batch without positives gives a finite loss with localization 0.

        Raises:
            TargetError: a box or label that cannot be a target (non-finite, empty, in pixels, off the
                image, a label out of range), named by its position in the lists.
        """
        self._check_inputs(predicted_locs, predicted_scores, boxes, labels)
        # The loss runs in float32 even under autocast: log-softmax and sums over thousands of priors
        # lose too much in bf16.
        locs = predicted_locs.float()
        scores = predicted_scores.float()
        n_classes = scores.shape[2]
        priors = self._priors_on(locs.device)

        targets = flatten_targets(boxes, labels).to(locs.device, torch.float32)
        self._check_targets(targets, n_classes)
        if self.matching == "atss":
            matches = match_priors_atss(targets, priors, self.atss_candidates)
        else:
            matches = match_priors(targets, priors, self.threshold)
        positive = matches.positive
        n_pos = matches.positive_index.shape[0]
        normalizer = float(max(n_pos, 1))

        # Only positives have a localization target: encode just their matched boxes (a few hundred),
        # not a target for every prior.
        matched = targets.boxes[matches.positive_row]
        prior_idx = matches.positive_index % len(priors)
        target_locs = encode_boxes(matched, priors.cxcywh[prior_idx], self.variances)
        predicted = locs.reshape(-1, 4).index_select(0, matches.positive_index)
        loc_sum = F.smooth_l1_loss(predicted, target_locs, beta=1.0, reduction="sum")
        loc_loss = loc_sum / normalizer

        ignored = None
        if self.ignore_threshold is not None:
            ignored = ~positive & (matches.iou >= self.ignore_threshold)
        if self.classification == "hard_negative":
            conf_loss = self._hard_negative_loss(scores, matches, ignored) / normalizer
        else:
            if self.classification == "focal_sigmoid":
                per_prior = self._sigmoid_focal(scores, matches.labels)
            else:
                per_prior = self._softmax_focal(scores, matches.labels)
            conf_loss = (per_prior * ~ignored).sum() / normalizer

        total = conf_loss + self.alpha * loc_loss
        return LossOutput(total=total, localization=loc_loss, confidence=conf_loss, n_positives=n_pos)

    def _hard_negative_loss(self, scores: Tensor, matches: Matches, ignored: Tensor | None) -> Tensor:
        # One log-softmax over all priors, without autograd, gives every prior's cross-entropy: the
        # negatives' (target 0) rank them, and the positives' and chosen negatives' are summed.
        target, positive = matches.labels, matches.positive
        with torch.no_grad():
            log_probs = F.log_softmax(scores, dim=-1)
            cross_entropy = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N, P)
        hard_neg = hard_negative_mask(cross_entropy, positive, self.neg_pos_ratio, ignored)
        return _SelectedCrossEntropySum.apply(scores, log_probs, cross_entropy, target, positive | hard_neg)

    def _sigmoid_focal(self, scores: Tensor, target: Tensor) -> Tensor:
        # One binary problem per object class; background is the all-zero target, its logit unused.
        # RetinaNet's loss, written in log space: (1 - p_t)^gamma as exp(gamma * log(1 - p_t)). The usual
        # form (torchvision's sigmoid_focal_loss) takes a power of 1 - p_t, which is exactly 0 once a logit
        # saturates, and for gamma < 1 the power's derivative there is infinite: NaN gradients.
        n_classes = scores.shape[2]
        one_hot = F.one_hot(target, n_classes)[..., 1:].to(scores.dtype)
        true_logit = scores[..., 1:] * (2 * one_hot - 1)  # the logit of the true outcome, z: p_t = sigmoid(z)
        cross_entropy = -F.logsigmoid(true_logit)
        modulating = torch.exp(self.focal_gamma * F.logsigmoid(-true_logit))  # (1 - p_t)^gamma
        alpha_t = self.focal_alpha * one_hot + (1.0 - self.focal_alpha) * (1.0 - one_hot)
        return (alpha_t * modulating * cross_entropy).sum(dim=-1)

    def _softmax_focal(self, scores: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(scores, dim=-1).gather(-1, target[..., None]).squeeze(-1)
        # 1 - p from log p by expm1 (no subtraction from 1), kept above 0: where p rounds to 1 the power's
        # derivative is infinite for gamma < 1, and the clamp's zero gradient there (the true one tends to 0)
        # keeps it finite.
        one_minus_p = torch.expm1(log_p).neg().clamp_min(torch.finfo(log_p.dtype).tiny)
        alpha_t = torch.where(target > 0, self.focal_alpha, 1.0 - self.focal_alpha)
        return -alpha_t * one_minus_p.pow(self.focal_gamma) * log_p
