"""COCO-format reader (instances JSON + images folder) via pycocotools.

Categories map to the labels of a class list by name (label i + 1 is class i), or without one to
contiguous labels 1..C-1 in ascending id order (any integers, possibly with gaps). COCO boxes [x, y, w, h] are already continuous pixel
coordinates, so the 0-based continuous xyxy box is (x, y, x + w, y + h). `iscrowd` boxes are kept with
difficult=True, like VOC's difficult objects. Images without annotations are kept. Record ids are the
COCO image ids as strings.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

from data.errors import AnnotationError, DataError, ImageReadError, UnknownClassError
from data.records import ImageRecord, LoadStats, RecordList
from data.voc import check_class_names

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
    _check_entries(dataset, annotation_json)
    coco = COCO()
    coco.dataset = dataset
    # pycocotools prints progress lines to stdout; the log gets our own summary instead.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco.createIndex()
        except (KeyError, TypeError) as exc:
            raise AnnotationError(f"{annotation_json}: malformed COCO entry (missing field {exc})") from None
    return coco


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _unique_int_ids(entries: list, what: str, annotation_json: Path) -> set[int]:
    """The ``id`` of every entry of ``what`` ("images", "categories"); integers, each used once."""
    ids: set[int] = set()
    for i, entry in enumerate(entries):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        if not _is_int(entry_id):
            raise AnnotationError(f"{annotation_json}: {what}[{i}] has no integer 'id' (got {entry_id!r})")
        if entry_id in ids:
            raise AnnotationError(f"{annotation_json}: {what} id {entry_id} is used more than once")
        ids.add(entry_id)
    return ids


def _check_entries(dataset: dict, annotation_json: Path) -> None:
    """Refuse what pycocotools would index wrongly or silently: a repeated image id would hand one image's
    boxes to another, an annotation whose image or category id is not listed (``"1"`` is not ``1``) would
    vanish, a bbox of another length would be regrouped with its neighbours' numbers."""
    image_ids = _unique_int_ids(dataset["images"], "images", annotation_json)
    category_ids = _unique_int_ids(dataset["categories"], "categories", annotation_json)
    for category in dataset["categories"]:
        if not isinstance(category.get("name"), str) or not category["name"].strip():
            raise AnnotationError(f"{annotation_json}: category {category['id']} has no 'name'")
    seen: set[int] = set()
    for i, ann in enumerate(dataset["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if not _is_int(ann_id) or ann_id in seen:
            why = "is used more than once" if ann_id in seen else "is not an integer"
            raise AnnotationError(f"{annotation_json}: annotations[{i}] id {ann_id!r} {why}")
        seen.add(ann_id)
        where = f"{annotation_json}: annotation {ann_id}"
        # The type first: `in` on a set raises TypeError for a list or dict.
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            raise AnnotationError(f"{where} refers to image_id {ann.get('image_id')!r}, which no image has")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            raise AnnotationError(
                f"{where} has category_id {ann.get('category_id')!r}, which is not among the categories "
                f"{sorted(category_ids)}"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            raise AnnotationError(f"{where} bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):  # also refuses "0", which bool() would read as crowd
            raise AnnotationError(f"{where} iscrowd must be 0 or 1, got {ann['iscrowd']!r}")


def load_coco(
    images_dir: str | Path,
    annotation_json: str | Path,
    class_names: list[str] | None = None,
    *,
    ignore_unknown: bool = False,
    on_error: str = "raise",
) -> tuple[RecordList, list[str]]:
    """Read a COCO instances file. Returns (records with `.stats`, class_names in label order).

    With `class_names`, label i + 1 is the category named `class_names[i]`, whatever its id; an annotation
    of a category not listed raises UnknownClassError naming it, or with `ignore_unknown` is skipped and
    counted (`stats.boxes_unknown`). Without, the labels follow the categories in ascending id order.
    Boxes with w <= 0 or h <= 0 are dropped and boxes reaching outside the image are clipped (both
    counted in `.stats` and logged with the file and annotation id). A missing image file raises
    ImageReadError, or with on_error="skip" skips the image (counted in `stats.images_skipped`), and so
    does a file that an earlier image entry names already (its boxes would be another image's).
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
    category_names = {cid: str(coco.cats[cid]["name"]) for cid in cat_ids}
    if len(set(category_names.values())) != len(category_names):
        raise AnnotationError(f"{annotation_json}: duplicate category names {list(category_names.values())}")
    class_names = list(category_names.values()) if class_names is None else list(check_class_names(class_names))
    class_to_label = {name: i + 1 for i, name in enumerate(class_names)}
    cat_to_label = {cid: class_to_label.get(name, 0) for cid, name in category_names.items()}  # 0: not listed

    stats = LoadStats()
    records = RecordList(stats=stats)
    first_entry: dict[Path, int] = {}  # image file -> the image id that named it first
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        stats.images_read += 1
        try:
            width, height = int(info["width"]), int(info["height"])
            image_path = images_dir / info["file_name"]
        except (KeyError, TypeError, ValueError) as exc:
            raise AnnotationError(f"{annotation_json}: image {img_id} has an invalid entry ({exc})") from None
        if width <= 0 or height <= 0:  # every box would be clipped away as outside the image
            raise AnnotationError(f"{annotation_json}: image {img_id} has size {width}x{height}")
        problem = None
        if not image_path.is_file():
            problem = ImageReadError(f"{annotation_json}: image {img_id} file {image_path} not found")
        elif (first := first_entry.setdefault(image_path.resolve(), img_id)) != img_id:
            problem = AnnotationError(
                f"{annotation_json}: images {first} and {img_id} both name the file {image_path}: the boxes of "
                "one would be trained and scored as the other's"
            )
        if problem is not None:
            if on_error == "raise":
                raise problem
            stats.images_skipped += 1
            stats.note(logger, logging.WARNING, f"skipped: {problem}")
            continue
        anns = coco.imgToAnns.get(img_id, [])
        stats.boxes_read += len(anns)
        unknown = [a for a in anns if not cat_to_label[a["category_id"]]]
        if unknown and not ignore_unknown:
            name = category_names[unknown[0]["category_id"]]
            raise UnknownClassError(
                f"{annotation_json}: annotation {unknown[0]['id']} of image {img_id} has category {name!r}, which "
                f"is not among the classes {class_names}; add it to the class list (data.classes in a config), "
                "or skip such objects with data.ignore_unknown_classes: true"
            )
        if unknown:
            stats.boxes_unknown += len(unknown)
            anns = [a for a in anns if cat_to_label[a["category_id"]]]
        ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
        # _check_entries vouched for every bbox, category and iscrowd.
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        labels = np.array([cat_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([a.get("iscrowd", 0) == 1 for a in anns], dtype=bool)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # Judged in float32, the precision ImageRecord keeps: a box narrower than that would be stored
        # with no width.
        boxes_stored = boxes.astype(np.float32)
        bad = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0) | np.any(boxes_stored[:, 2:] <= boxes_stored[:, :2], axis=1)
        clipped = boxes_stored.astype(np.float64)
        np.clip(clipped[:, 0::2], 0, width, out=clipped[:, 0::2])
        np.clip(clipped[:, 1::2], 0, height, out=clipped[:, 1::2])
        outside = ~bad & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        moved = ~bad & ~outside & np.any(clipped != boxes_stored, axis=1)
        for i in np.flatnonzero(bad | outside):
            stats.note(logger, logging.WARNING,
                       f"{annotation_json}: dropped annotation {ann_ids[i]} of image {img_id} bbox {xywh[i].tolist()}")
        if moved.any():
            stats.note(logger, logging.INFO,
                       f"{annotation_json}: clipped annotations {ann_ids[moved].tolist()} to image {img_id}")
        keep = ~(bad | outside)
        stats.boxes_dropped += int((~keep).sum())
        stats.boxes_clipped += int(moved.sum())
        # COCO's `area` (the segmentation's) sorts objects into small, medium and large; where it is missing
        # or not a positive number, the box's area inside the image, as for VOC data.
        box_areas = ((clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])).tolist()
        areas = np.array([a["area"] if _is_number(a.get("area")) and a["area"] > 0 else box_area
                          for a, box_area in zip(anns, box_areas, strict=True)], dtype=np.float64)
        rec = ImageRecord(str(img_id), image_path, width, height, clipped[keep], labels[keep], crowd[keep],
                          areas[keep])
        stats.boxes_kept += rec.n_boxes
        stats.boxes_difficult += int(rec.difficult.sum())
        stats.images_empty += int(rec.n_boxes == 0)
        stats.images_kept += 1
        records.append(rec)
    level = logging.WARNING if (stats.images_skipped or stats.boxes_dropped) else logging.INFO
    logger.log(level, "COCO %s: %s", annotation_json, stats.summary())
    return records, class_names
