"""COCO-style detection metrics through pycocotools, in memory (no JSON files), on VOC-style inputs.

Inputs are the `ImageGroundTruth` / `ImageDetections` of `utils.voc_eval` (devkit 1-based inclusive
boxes). They are converted back to continuous 0-based pixel boxes in COCO's (x, y, w, h) form:
``(xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1)``, area ``w * h``. Difficult boxes become
``iscrowd=1`` (COCO's way of saying "matching it is neither rewarded nor punished"; pycocotools then
measures overlap with it as intersection over the detection's area).

Conventions of pycocotools kept as they are: 10 IoU thresholds .50:.05:.95, 101 recall points,
area ranges small < 32², medium 32²..96², large > 96² (by ground-truth area), and maxDets 1/10/100
applied per image and class. A metric pycocotools reports as -1 (no ground truth in that area range,
or none at all) is returned as None, so the dict stays strict JSON.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from utils.voc_eval import EvaluationInputError, ImageDetections, ImageGroundTruth

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for bbox evaluation.
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def devkit_to_coco_xywh(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) devkit 1-based inclusive (xmin, ymin, xmax, ymax) -> (n, 4) continuous 0-based (x, y, w, h)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack(
        [
            boxes[:, 0] - 1.0,
            boxes[:, 1] - 1.0,
            boxes[:, 2] - boxes[:, 0] + 1.0,
            boxes[:, 3] - boxes[:, 1] + 1.0,
        ],
        axis=1,
    )


def _coco_from_dataset(dataset: dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_labels(labels: np.ndarray, image_id: str, n_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 1 or labels.max() > n_classes):
        bad = int(labels[(labels < 1) | (labels > n_classes)][0])
        raise EvaluationInputError(f"image {image_id!r}: {what} label {bad} is outside 1..{n_classes}")


def evaluate_coco(
    detections: Sequence[ImageDetections],
    ground_truth: Sequence[ImageGroundTruth],
    class_names: Sequence[str],
) -> dict[str, float | None]:
    """COCO metrics of `detections` against `ground_truth` (same inputs and rules as `evaluate_voc`).

    Returns {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}:
    floats in [0, 1], or None where pycocotools has nothing to measure (-1). With no detections at all
    every metric that has ground truth is 0.0 (pycocotools' loadRes would crash on an empty list, so the
    result set is built directly). Raises EvaluationInputError for unknown or duplicate image ids and
    labels outside 1..len(class_names).
    """
    names = tuple(class_names)
    if not names:
        raise EvaluationInputError("class_names is empty")
    image_numbers: dict[str, int] = {}
    images, gt_annotations = [], []
    for gt in ground_truth:
        if gt.image_id in image_numbers:
            raise EvaluationInputError(f"image {gt.image_id!r} appears twice in the ground truth")
        _check_labels(gt.labels, gt.image_id, len(names), "ground-truth")
        number = len(image_numbers) + 1  # COCO ids start at 1
        image_numbers[gt.image_id] = number
        images.append({"id": number, "file_name": gt.image_id, "width": gt.width, "height": gt.height})
        boxes_xywh = devkit_to_coco_xywh(gt.boxes).tolist()
        # COCO's size ranges go by the object's own area (its segmentation's, in COCO data), else the box's.
        areas = gt.areas.tolist() if gt.areas is not None else [w * h for _, _, w, h in boxes_xywh]
        for box, label, difficult, area in zip(
            boxes_xywh, gt.labels.tolist(), gt.difficult.tolist(), areas, strict=True
        ):
            gt_annotations.append(
                {
                    # pycocotools treats annotation id 0 as "unmatched", so ids start at 1.
                    "id": len(gt_annotations) + 1,
                    "image_id": number,
                    "category_id": label,
                    "bbox": box,
                    "area": area,
                    "iscrowd": int(difficult),
                }
            )
    categories = [{"id": c, "name": name} for c, name in enumerate(names, start=1)]

    seen: set[str] = set()
    dt_annotations = []
    for det in detections:
        if det.image_id not in image_numbers:
            raise EvaluationInputError(
                f"detections for image {det.image_id!r}, which has no ground-truth entry"
            )
        if det.image_id in seen:
            raise EvaluationInputError(f"image {det.image_id!r} appears twice in the detections")
        seen.add(det.image_id)
        _check_labels(det.labels, det.image_id, len(names), "detection")
        number = image_numbers[det.image_id]
        for box, label, score in zip(
            devkit_to_coco_xywh(det.boxes).tolist(), det.labels.tolist(), det.scores.tolist(), strict=True
        ):
            # The fields loadRes would add: id from 1, area from the box, iscrowd 0.
            dt_annotations.append(
                {
                    "id": len(dt_annotations) + 1,
                    "image_id": number,
                    "category_id": label,
                    "bbox": box,
                    "score": score,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )

    coco_gt = _coco_from_dataset({"images": images, "categories": categories, "annotations": gt_annotations})
    coco_dt = _coco_from_dataset({"images": images, "categories": categories, "annotations": dt_annotations})
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools output:\n%s", output.getvalue())
    return {
        name: (None if value < 0 else float(value))
        for name, value in zip(COCO_METRIC_NAMES, evaluator.stats.tolist(), strict=True)
    }
