"""Score detections against a split's annotations: VOC AP (07 and 10+) and, optionally, COCO metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data.errors import DataError
from data.records import ImageRecord
from utils.coco_eval import evaluate_coco
from utils.engine import ground_truth_from_records
from utils.voc_eval import ImageDetections, VOCResult, evaluate_voc


def check_countable_boxes(records: list[ImageRecord], split: str) -> None:
    """DataError unless some image of the split has a box that is not difficult: the only kind mAP
    counts. Without one every AP is undefined (NaN), and training would never write a best.pt."""
    if not any((~record.difficult).any() for record in records):
        n_boxes = sum(record.n_boxes for record in records)
        n_difficult = sum(int(record.difficult.sum()) for record in records)
        raise DataError(
            f"the {split} has no box that counts for mAP: {len(records)} images, {n_boxes} boxes kept, "
            f"{n_difficult} of them difficult. Check the data section's test settings, data.classes, and "
            "whether data.ignore_unknown_classes dropped every box (the loader's log counts them)"
        )


@dataclass
class EvaluationResult:
    voc: VOCResult
    coco: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        summary = self.voc.to_dict()
        summary["coco"] = self.coco
        return summary


def evaluate_detections(
    detections: list[ImageDetections],
    records: list[ImageRecord],
    class_names: list[str],
    *,
    coco: bool = True,
    iou_threshold: float = 0.5,
) -> EvaluationResult:
    """VOC metrics (always) and COCO metrics (when `coco`) of devkit-coordinate detections."""
    ground_truth = ground_truth_from_records(records)
    voc = evaluate_voc(detections, ground_truth, class_names, iou_threshold=iou_threshold)
    coco_metrics = evaluate_coco(detections, ground_truth, class_names) if coco else None
    return EvaluationResult(voc=voc, coco=coco_metrics)
