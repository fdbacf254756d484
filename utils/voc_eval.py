"""PASCAL VOC detection AP, computed like the official devkit (VOCevaldet.m and VOCap.m), vectorized.

Coordinates are the devkit's: 1-based inclusive pixel indices (xmin, ymin, xmax, ymax), so a box's width
is ``xmax - xmin + 1``. The matching rules, per class:

* detections are ranked by score, descending. Ties keep their input order (order of the ``detections``
  list, then order inside each `ImageDetections`), because the sort is stable like MATLAB's ``sort``;
* each detection takes the ground-truth box of its image and class with the largest IoU (all boxes,
  difficult ones included; on equal IoU the earliest box wins, like the devkit's ``ov > ovmax`` loop).
  IoU uses the devkit's +1 convention: ``iw = min(x2) - max(x1) + 1``, areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``;
* if that IoU is ``>= iou_threshold`` (MATLAB devkit: ``ovmax >= VOCopts.minoverlap``; py-faster-rcnn
  uses ``>``, which differs only when an IoU is exactly 0.5): a difficult box makes the detection ignored
  (neither TP nor FP); otherwise the first detection to claim the box is a TP and later ones are FPs;
* anything else is a FP. Recall counts non-difficult boxes only (``n_positives``).

Outcomes the devkit leaves undefined, chosen here:

* a class without non-difficult ground truth (``n_positives == 0``) has recall 0/0; the devkit would
  report NaN and so would its mean. Here its AP is NaN, its curve arrays are empty, and it is left out
  of both means (a mean over zero classes is NaN);
* ignored detections (matched to difficult boxes) are dropped from the recall/precision arrays.
  In the devkit they repeat the previous point (or give 0/0 precision before the first counted
  detection), which changes neither the envelope nor the 11-point maxima, so both APs are identical;

The 11-point thresholds are the devkit's ``t=0:0.1:1`` as MATLAB computes them: ``a + k*d`` up to the middle
of the range and ``b - (n-k)*d`` after it, so the fourth is 0.30000000000000004 and a recall of exactly 3/10
does not reach it (the others equal ``k / 10``). ``np.arange(0, 1.1, 0.1)`` (py-faster-rcnn) differs at 0.6
and 0.7 as well.

The claimed/not-claimed loop of the devkit is sequential, but its outcome has a closed form: among
detections that reach the threshold on a non-difficult box, the highest-ranked one per box is the TP and
the rest are FPs. `evaluate_voc` computes best overlaps with padded (detections, max boxes per
(image, class)) arrays and picks the first claim per box with ``np.unique(return_index=True)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Largest padded IoU block (detections x boxes) built at once; bounds memory for crowded images.
_MAX_BLOCK_ELEMENTS = 1_000_000


class EvaluationInputError(ValueError):
    """Ground truth or detections that cannot be evaluated; the message names the image and the value."""


def _as_boxes(value: Any, image_id: str, what: str) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise EvaluationInputError(
            f"image {image_id!r}: {what} boxes must have shape (n, 4), got {boxes.shape}"
        )
    if not np.isfinite(boxes).all():
        raise EvaluationInputError(f"image {image_id!r}: {what} boxes contain NaN or infinite values")
    # Devkit boxes are inclusive, so xmax == xmin - 1 is an empty box (a continuous box of width 0, which
    # clipping can produce); anything narrower is an inverted box.
    bad = (boxes[:, 2] < boxes[:, 0] - 1) | (boxes[:, 3] < boxes[:, 1] - 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise EvaluationInputError(
            f"image {image_id!r}: {what} box {row} = {boxes[row].tolist()} has xmax < xmin - 1 or "
            "ymax < ymin - 1 (1-based inclusive devkit coordinates)"
        )
    return boxes


def _as_vector(value: Any, n: int, dtype: type, image_id: str, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.size == 0:
        array = array.reshape(0)
    if array.ndim != 1 or array.shape[0] != n:
        raise EvaluationInputError(f"image {image_id!r}: {what} must have shape ({n},), got {array.shape}")
    if dtype is np.int64 and array.size and array.dtype.kind not in "iu":
        raise EvaluationInputError(f"image {image_id!r}: {what} must be integers, got dtype {array.dtype}")
    if dtype is np.bool_ and array.size and array.dtype.kind not in "biu":
        raise EvaluationInputError(f"image {image_id!r}: {what} must be booleans, got dtype {array.dtype}")
    array = array.astype(dtype)
    if dtype is np.float64 and not np.isfinite(array).all():
        raise EvaluationInputError(f"image {image_id!r}: {what} contain NaN or infinite values")
    return array


@dataclass
class ImageGroundTruth:
    """Annotated boxes of one image in devkit form.

    boxes: (n, 4) float64 1-based inclusive pixel (xmin, ymin, xmax, ymax); labels: (n,) int64 in
    1..C-1; difficult: (n,) bool. width/height: image size in pixels (used for COCO area ranges and
    plots). areas: None, or (n,) the objects' own areas for COCO's size ranges (COCO data's `area`), which
    are else the boxes'. Arrays are converted and checked on construction.
    """

    image_id: str
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    width: int
    height: int
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_id = str(self.image_id)
        self.boxes = _as_boxes(self.boxes, self.image_id, "ground-truth")
        n = self.boxes.shape[0]
        self.labels = _as_vector(self.labels, n, np.int64, self.image_id, "ground-truth labels")
        self.difficult = _as_vector(
            self.difficult, n, np.bool_, self.image_id, "ground-truth difficult flags"
        )
        if self.areas is not None:
            self.areas = _as_vector(self.areas, n, np.float64, self.image_id, "ground-truth areas")
        self.width = int(self.width)
        self.height = int(self.height)


@dataclass
class ImageDetections:
    """Detections of one image in devkit form.

    boxes: (k, 4) float64 1-based inclusive pixel (xmin, ymin, xmax, ymax); labels: (k,) int64 in
    1..C-1; scores: (k,) float64. Any order. Equal scores of a class rank in the order of `tie_break`
    ((k,) int64, lower first: `read_voc_results` gives each line's position in its class file, the order
    the devkit keeps) or, when no detection has one, in input order.
    """

    image_id: str
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    tie_break: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_id = str(self.image_id)
        self.boxes = _as_boxes(self.boxes, self.image_id, "detection")
        k = self.boxes.shape[0]
        self.labels = _as_vector(self.labels, k, np.int64, self.image_id, "detection labels")
        self.scores = _as_vector(self.scores, k, np.float64, self.image_id, "detection scores")
        if self.tie_break is not None:
            self.tie_break = _as_vector(self.tie_break, k, np.int64, self.image_id, "detection tie_break")


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True)
class VOCResult:
    """Per-class and mean VOC APs.

    ap07/ap12: class name -> VOC2007 11-point AP / VOC2010+ area AP (NaN when the class has no
    non-difficult ground truth). recall/precision: class name -> (m,) float64 arrays along the ranked
    detections, ignored (difficult-matched) detections left out; empty without detections or positives.
    n_positives: non-difficult boxes per class; n_detections: detections per class (ignored included).
    max_recall (method): the recall the class's detections reach in the end. The 11-point AP averages the
    best precision at recall >= 0, 0.1, ..., 1.0, so a class whose recall stays below 1 scores at most
    10/11 = 0.909 there, however precise its detections.
    voc07_map/voc12_map: means over the classes with n_positives > 0.
    """

    class_names: tuple[str, ...]
    ap07: dict[str, float]
    ap12: dict[str, float]
    recall: dict[str, np.ndarray]
    precision: dict[str, np.ndarray]
    n_positives: dict[str, int]
    n_detections: dict[str, int]
    voc07_map: float
    voc12_map: float
    iou_threshold: float

    def max_recall(self, name: str) -> float:
        """Final recall of class `name` (NaN without non-difficult ground truth, 0 without detections)."""
        if self.n_positives[name] == 0:
            return math.nan
        curve = self.recall[name]
        return float(curve[-1]) if curve.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no curves); NaN becomes None so the output is strict JSON."""
        return {
            "iou_threshold": float(self.iou_threshold),
            "voc07_map": _json_float(self.voc07_map),
            "voc12_map": _json_float(self.voc12_map),
            "classes": {
                name: {
                    "ap07": _json_float(self.ap07[name]),
                    "ap12": _json_float(self.ap12[name]),
                    "n_positives": int(self.n_positives[name]),
                    "n_detections": int(self.n_detections[name]),
                    "max_recall": _json_float(self.max_recall(name)),
                }
                for name in self.class_names
            },
        }

    def format_table(self) -> str:
        """Per-class table with ground-truth and detection counts and both APs, then the means."""

        def fmt(value: float) -> str:
            return f"{'n/a':>8}" if math.isnan(value) else f"{value:8.4f}"

        width = max([len("class"), len("mean"), *(len(n) for n in self.class_names)])
        lines = [f"{'class':<{width}}  {'n_gt':>7}  {'n_det':>8}  {'recall':>8}  {'AP07':>8}  {'AP12':>8}"]
        lines.append("-" * len(lines[0]))
        for name in self.class_names:
            lines.append(
                f"{name:<{width}}  {self.n_positives[name]:>7d}  {self.n_detections[name]:>8d}  "
                f"{fmt(self.max_recall(name))}  {fmt(self.ap07[name])}  {fmt(self.ap12[name])}"
            )
        lines.append("-" * len(lines[0]))
        lines.append(
            f"{'mean':<{width}}  {'':>7}  {'':>8}  {'':>8}  {fmt(self.voc07_map)}  {fmt(self.voc12_map)}"
        )
        return "\n".join(lines)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of one precision-recall curve, as the devkit computes it.

    recall, precision: (m,) arrays along the ranked detections (empty -> 0.0).
    use_07_metric=True: VOC2007 11-point AP, mean over t in {0, 0.1, ..., 1} of the largest precision
    at recall >= t (0 where no such point). False: VOC2010+ AP, the area under the precision envelope
    (precision made non-increasing from the right), summed where recall changes.
    """
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise EvaluationInputError(
            f"recall and precision must be 1-D arrays of equal length, got {rec.shape} and {prec.shape}"
        )
    if use_07_metric:
        maxima = []
        for t in DEVKIT_11_POINT_THRESHOLDS:
            above = prec[rec >= t]
            maxima.append(float(above.max()) if above.size else 0.0)
        return sum(maxima) / 11.0  # eleven additions of 1/11 would give 1.0000000000000002
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changed = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[changed] - mrec[changed - 1]) * mpre[changed]))


# MATLAB's 0:0.1:1 (see the module docstring).
DEVKIT_11_POINT_THRESHOLDS = tuple([k * 0.1 for k in range(6)] + [1.0 - (10 - k) * 0.1 for k in range(6, 11)])


def devkit_iou(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU with the devkit's +1 pixel convention, broadcasting over leading dims.

    det, gt: (..., 4) 1-based inclusive (xmin, ymin, xmax, ymax). Returns (...) float64. Operations run
    in the devkit's order so results match it bit for bit; 0 where the union is empty.
    """
    iw = np.maximum(np.minimum(det[..., 2], gt[..., 2]) - np.maximum(det[..., 0], gt[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(det[..., 3], gt[..., 3]) - np.maximum(det[..., 1], gt[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    union = (
        (det[..., 2] - det[..., 0] + 1.0) * (det[..., 3] - det[..., 1] + 1.0)
        + (gt[..., 2] - gt[..., 0] + 1.0) * (gt[..., 3] - gt[..., 1] + 1.0)
        - inter
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _best_overlaps(
    det_boxes: np.ndarray, det_group: np.ndarray, gt_boxes: np.ndarray, gt_group: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best IoU and the index of its box (into `gt_boxes`) for each detection, within its group.

    det_boxes (n, 4), det_group (n,); gt_boxes (g, 4), gt_group (g,); a group is one (image, class)
    pair, numbered 0..n_groups-1. The boxes of a group are gathered through a padded (n, max boxes per
    group) index array; padding gets IoU -inf. Detections whose group has no boxes get (-inf, 0).
    """
    n = det_boxes.shape[0]
    best_ov = np.full(n, -np.inf)
    best_gt = np.zeros(n, dtype=np.int64)
    if n == 0 or gt_boxes.shape[0] == 0:
        return best_ov, best_gt
    # Stable, so boxes of one group stay in annotation order and argmax ties go to the earliest box.
    order = np.argsort(gt_group, kind="stable")
    counts = np.bincount(gt_group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    max_boxes = int(counts.max())
    slots = np.arange(max_boxes)
    chunk = max(1, _MAX_BLOCK_ELEMENTS // max_boxes)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        group = det_group[lo:hi]
        valid = slots[None, :] < counts[group][:, None]
        index = order[np.where(valid, starts[group][:, None] + slots[None, :], 0)]
        overlaps = devkit_iou(det_boxes[lo:hi, None, :], gt_boxes[index])
        overlaps[~valid] = -np.inf
        column = overlaps.argmax(axis=1)
        rows = np.arange(hi - lo)
        best_ov[lo:hi] = overlaps[rows, column]
        best_gt[lo:hi] = index[rows, column]
    return best_ov, best_gt


def _match(
    det_boxes: np.ndarray,
    det_group: np.ndarray,
    gt_boxes: np.ndarray,
    gt_group: np.ndarray,
    gt_difficult: np.ndarray,
    n_groups: int,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Devkit outcome of ranked detections: (true_positive (n,) bool, ignored (n,) bool); the rest are FPs.

    Detections must already be in rank order within each class (groups never mix classes).
    """
    best_ov, best_gt = _best_overlaps(det_boxes, det_group, gt_boxes, gt_group, n_groups)
    hit = best_ov >= iou_threshold
    ignored = hit & gt_difficult[best_gt] if gt_boxes.shape[0] else np.zeros_like(hit)
    claims = np.flatnonzero(hit & ~ignored)
    # In rank order the first claim on each box is the one the sequential devkit loop accepts.
    _, first = np.unique(best_gt[claims], return_index=True)
    true_positive = np.zeros(det_boxes.shape[0], dtype=bool)
    true_positive[claims[first]] = True
    return true_positive, ignored


def _pr_curve(true_positive: np.ndarray, n_positives: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall and precision (m,) after each ranked (non-ignored) detection of one class."""
    tp = np.cumsum(true_positive, dtype=np.float64)
    fp = np.cumsum(~true_positive, dtype=np.float64)
    return tp / n_positives, tp / (tp + fp)


def _check_labels(
    labels: np.ndarray, owner: np.ndarray, image_ids: Sequence[str], n_classes: int, what: str
) -> None:
    bad = (labels < 1) | (labels > n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EvaluationInputError(
            f"image {image_ids[owner[i]]!r}: {what} label {int(labels[i])} is outside 1..{n_classes} "
            f"({n_classes} classes)"
        )


def _concat(arrays: list[np.ndarray], empty_shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(empty_shape, dtype=dtype)


def evaluate_voc(
    detections: Sequence[ImageDetections],
    ground_truth: Sequence[ImageGroundTruth],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> VOCResult:
    """VOC AP per class and mAP (11-point and area) of `detections` against `ground_truth`.

    ground_truth: one entry per evaluated image (unique ids); images without an entry in `detections`
    simply have no detections. detections: at most one entry per image, each id present in
    `ground_truth` (the devkit rejects unknown images too). Labels are 1..len(class_names).
    Raises EvaluationInputError for duplicate or unknown image ids, labels out of range or a threshold
    outside (0, 1].
    """
    class_names = tuple(class_names)
    n_classes = len(class_names)
    if n_classes == 0:
        raise EvaluationInputError("class_names is empty")
    if not 0.0 < iou_threshold <= 1.0:
        raise EvaluationInputError(f"iou_threshold must be in (0, 1], got {iou_threshold}")

    image_ids = [gt.image_id for gt in ground_truth]
    image_index: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        if image_id in image_index:
            raise EvaluationInputError(f"image {image_id!r} appears twice in the ground truth")
        image_index[image_id] = i
    n_images = len(image_ids)

    gt_boxes = _concat([gt.boxes for gt in ground_truth], (0, 4), np.float64)
    gt_labels = _concat([gt.labels for gt in ground_truth], (0,), np.int64)
    gt_difficult = _concat([gt.difficult for gt in ground_truth], (0,), np.bool_)
    gt_image = np.repeat(np.arange(n_images), [gt.labels.shape[0] for gt in ground_truth])
    _check_labels(gt_labels, gt_image, image_ids, n_classes, "ground-truth")

    seen: set[str] = set()
    det_owner = np.empty(len(detections), dtype=np.int64)
    for j, det in enumerate(detections):
        if det.image_id in seen:
            raise EvaluationInputError(f"image {det.image_id!r} appears twice in the detections")
        seen.add(det.image_id)
        if det.image_id not in image_index:
            raise EvaluationInputError(
                f"detections for image {det.image_id!r}, which has no ground-truth entry"
            )
        det_owner[j] = image_index[det.image_id]
    det_boxes = _concat([d.boxes for d in detections], (0, 4), np.float64)
    det_labels = _concat([d.labels for d in detections], (0,), np.int64)
    det_scores = _concat([d.scores for d in detections], (0,), np.float64)
    det_image = np.repeat(det_owner, [d.labels.shape[0] for d in detections])
    _check_labels(det_labels, det_image, image_ids, n_classes, "detection")

    # Rank once for all classes, in stable passes: by tie-break, by score descending, then by class, so equal
    # scores of a class keep the tie-break (else input) order. The smallest label dtype lets numpy use its
    # radix sort for the last pass.
    given = [d.tie_break is not None for d in detections]
    if any(given) and not all(given):
        raise EvaluationInputError("either every ImageDetections has a tie_break or none has")
    ranked = np.arange(det_scores.shape[0])
    if detections and all(given):
        ranked = np.argsort(_concat([d.tie_break for d in detections], (0,), np.int64), kind="stable")
    ranked = ranked[np.argsort(-det_scores[ranked], kind="stable")]
    ranked = ranked[np.argsort(det_labels[ranked].astype(np.min_scalar_type(n_classes)), kind="stable")]
    det_boxes, det_labels, det_image = det_boxes[ranked], det_labels[ranked], det_image[ranked]
    true_positive, ignored = _match(
        det_boxes,
        det_image * n_classes + det_labels - 1,
        gt_boxes,
        gt_image * n_classes + gt_labels - 1,
        gt_difficult,
        n_images * n_classes,
        iou_threshold,
    )
    class_bounds = np.searchsorted(det_labels, np.arange(1, n_classes + 2))
    positives = np.bincount(gt_labels[~gt_difficult], minlength=n_classes + 1)

    ap07: dict[str, float] = {}
    ap12: dict[str, float] = {}
    recall: dict[str, np.ndarray] = {}
    precision: dict[str, np.ndarray] = {}
    n_positives: dict[str, int] = {}
    n_detections: dict[str, int] = {}
    for c, name in enumerate(class_names, start=1):
        lo, hi = class_bounds[c - 1], class_bounds[c]
        n_positives[name] = int(positives[c])
        n_detections[name] = int(hi - lo)
        if n_positives[name] == 0:
            recall[name] = precision[name] = np.zeros(0)
            ap07[name] = ap12[name] = math.nan
            continue
        recall[name], precision[name] = _pr_curve(true_positive[lo:hi][~ignored[lo:hi]], n_positives[name])
        ap07[name] = voc_ap(recall[name], precision[name], use_07_metric=True)
        ap12[name] = voc_ap(recall[name], precision[name], use_07_metric=False)

    scored = [name for name in class_names if n_positives[name] > 0]
    if len(scored) < n_classes:
        logger.warning(
            "classes without non-difficult ground truth, AP NaN and left out of the means: %s",
            ", ".join(name for name in class_names if n_positives[name] == 0),
        )
    voc07_map = float(np.mean([ap07[n] for n in scored])) if scored else math.nan
    voc12_map = float(np.mean([ap12[n] for n in scored])) if scored else math.nan
    return VOCResult(
        class_names=class_names,
        ap07=ap07,
        ap12=ap12,
        recall=recall,
        precision=precision,
        n_positives=n_positives,
        n_detections=n_detections,
        voc07_map=voc07_map,
        voc12_map=voc12_map,
        iou_threshold=float(iou_threshold),
    )
