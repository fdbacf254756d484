"""COCO-format reader (instances JSON + images folder) via pycocotools.

Category ids (any integers, possibly with gaps) map to contiguous labels 1..C-1 in ascending id order;
`class_names` comes back in that order. COCO boxes [x, y, w, h] are already continuous pixel
coordinates, so the 0-based continuous xyxy box is (x, y, x + w, y + h). `iscrowd` boxes are kept with
difficult=True, like VOC's difficult objects. Images without annotations are kept. Record ids are the
COCO image ids as strings.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from data.errors import AnnotationError, DataError, ImageReadError
from data.records import ImageRecord, LoadStats, RecordList

logger = logging.getLogger(__name__)


def _load_coco_api(annotation_json: Path):
    from pycocotools.coco import COCO

    if not annotation_json.is_file():
        raise AnnotationError(f"{annotation_json}: COCO annotation file not found")
    try:
        with open(annotation_json) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{annotation_json}: malformed JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset, dict) or not isinstance(dataset.get(key), list):
            raise AnnotationError(f"{annotation_json}: missing or invalid '{key}' list")
    coco = COCO()
    coco.dataset = dataset
    # pycocotools prints progress lines to stdout; the log gets our own summary instead.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as exc:
            raise AnnotationError(f"{annotation_json}: malformed COCO entry (missing field {exc})") from None
    return coco


def load_coco(
    images_dir: str | Path,
    annotation_json: str | Path,
    *,
    on_error: str = "raise",
) -> tuple[RecordList, list[str]]:
    """Read a COCO instances file. Returns (records with `.stats`, class_names in label order).

    Boxes with w <= 0 or h <= 0 are dropped and boxes reaching outside the image are clipped (both
    counted in `.stats` and logged with the file and annotation id). A missing image file raises
    ImageReadError, or with on_error="skip" skips the image (counted in `stats.images_skipped`).
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    images_dir, annotation_json = Path(images_dir), Path(annotation_json)
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images directory not found")
    coco = _load_coco_api(annotation_json)
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise AnnotationError(f"{annotation_json}: no categories")
    cat_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    class_names = [str(coco.cats[cid]["name"]) for cid in cat_ids]
    if len(set(class_names)) != len(class_names):
        raise AnnotationError(f"{annotation_json}: duplicate category names {class_names}")

    stats = LoadStats()
    records = RecordList(stats=stats)
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        stats.images_read += 1
        try:
            width, height = int(info["width"]), int(info["height"])
            image_path = images_dir / info["file_name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise AnnotationError(f"{annotation_json}: image {img_id} has an invalid entry ({exc})") from None
        if not image_path.is_file():
            msg = f"{annotation_json}: image {img_id} file {image_path} not found"
            if on_error == "raise":
                raise ImageReadError(msg)
            stats.images_skipped += 1
            stats.note(logger, logging.WARNING, f"skipped: {msg}")
            continue
        anns = coco.imgToAnns.get(img_id, [])
        stats.boxes_read += len(anns)
        ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
        try:
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            labels = np.array([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        except KeyError as exc:
            raise AnnotationError(
                f"{annotation_json}: an annotation of image {img_id} has an unknown category or no {exc}"
            ) from None
        except ValueError as exc:
            raise AnnotationError(f"{annotation_json}: image {img_id} has a malformed bbox ({exc})") from None
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        bad = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
        clipped = boxes.copy()
        np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
        np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
        outside = ~bad & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        moved = ~bad & ~outside & np.any(clipped != boxes, axis=1)
        for i in np.flatnonzero(bad | outside):
            stats.note(logger, logging.WARNING,
                       f"{annotation_json}: dropped annotation {ann_ids[i]} of image {img_id} bbox {xywh[i].tolist()}")
        if moved.any():
            stats.note(logger, logging.INFO,
                       f"{annotation_json}: clipped annotations {ann_ids[moved].tolist()} to image {img_id}")
        keep = ~(bad | outside)
        stats.boxes_dropped += int((~keep).sum())
        stats.boxes_clipped += int(moved.sum())
        rec = ImageRecord(str(img_id), image_path, width, height, clipped[keep], labels[keep], crowd[keep])
        stats.boxes_kept += rec.n_boxes
        stats.boxes_difficult += int(rec.difficult.sum())
        stats.images_empty += int(rec.n_boxes == 0)
        stats.images_kept += 1
        records.append(rec)
    level = logging.WARNING if (stats.images_skipped or stats.boxes_dropped) else logging.INFO
    logger.log(level, "COCO %s: %s", annotation_json, stats.summary())
    return records, class_names
