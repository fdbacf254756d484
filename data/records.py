"""In-memory description of an annotated image and of what a loader read, kept and dropped.

Coordinates: `ImageRecord.boxes` are **0-based continuous** pixel xyxy. A VOC box given in 1-based
inclusive pixel indices (xmin, ymin, xmax, ymax) is stored as (xmin - 1, ymin - 1, xmax, ymax), so
its width is xmax - xmin + 1 pixels. A COCO box [x, y, w, h] (already continuous) is (x, y, x + w, y + h).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Problem messages kept in LoadStats.problems; a huge broken dataset must not fill memory with them.
MAX_PROBLEMS = 1000


@dataclass
class ImageRecord:
    """One annotated image.

    Attributes:
        image_id: identifier unique within a loaded dataset (VOC id / file stem / COCO image id).
        image_path: path of the image file.
        width, height: image size in pixels as annotated.
        boxes: (n, 4) float32 continuous 0-based pixel xyxy, inside [0, width] x [0, height].
        labels: (n,) int64 in 1..C-1 (0 is background).
        difficult: (n,) bool (VOC `difficult` or COCO `iscrowd`).
        areas: None, or (n,) float64 object areas in pixels that are not the boxes' own (COCO's `area`,
            that of the segmentation), which COCO-style metrics sort into small, medium and large.
    """

    image_id: str
    image_path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        n = len(self.boxes)
        if self.areas is not None:
            self.areas = np.asarray(self.areas, dtype=np.float64).reshape(-1)
        areas = n if self.areas is None else len(self.areas)
        if len(self.labels) != n or len(self.difficult) != n or areas != n:
            raise ValueError(
                f"record {self.image_id!r}: {n} boxes but {len(self.labels)} labels, "
                f"{len(self.difficult)} difficult flags and {areas} areas"
            )

    @property
    def n_boxes(self) -> int:
        return len(self.boxes)


@dataclass
class LoadStats:
    """Counts of what a loader read, kept, dropped and changed; `merge` adds two of them.

    images_read: annotation entries read. images_kept: records returned. images_skipped: entries skipped
    because of a bad file (only with on_error="skip"). images_empty: kept records without any box.
    boxes_read: objects read. boxes_kept: boxes in the returned records. boxes_dropped: degenerate boxes
    (xmax < xmin or ymax < ymin as a VOC XML writes them, or nothing left inside the image after clipping). boxes_clipped:
    boxes moved inside the image. boxes_unknown: objects of unknown classes ignored (ignore_unknown=True).
    boxes_difficult: kept boxes flagged difficult.
    """

    images_read: int = 0
    images_kept: int = 0
    images_skipped: int = 0
    images_empty: int = 0
    boxes_read: int = 0
    boxes_kept: int = 0
    boxes_dropped: int = 0
    boxes_clipped: int = 0
    boxes_unknown: int = 0
    boxes_difficult: int = 0
    problems: list[str] = field(default_factory=list)

    def merge(self, other: LoadStats) -> LoadStats:
        """Add `other`'s counts (and problem messages) into this object; returns self."""
        for f in fields(self):
            if f.name == "problems":
                self.problems.extend(other.problems[: max(0, MAX_PROBLEMS - len(self.problems))])
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def note(self, log: logging.Logger, level: int, message: str) -> None:
        """Log a problem with a file and keep its message (the first MAX_PROBLEMS; counts stay exact)."""
        log.log(level, message)
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def summary(self) -> str:
        return (
            f"images read {self.images_read}, kept {self.images_kept}, skipped {self.images_skipped}, "
            f"without boxes {self.images_empty}; boxes read {self.boxes_read}, kept {self.boxes_kept} "
            f"({self.boxes_difficult} difficult), dropped {self.boxes_dropped}, clipped {self.boxes_clipped}, "
            f"unknown class ignored {self.boxes_unknown}"
        )

    def log(self, source: str) -> None:
        logger.info("%s: %s", source, self.summary())


class RecordList(list):
    """A list of ImageRecord that also carries the LoadStats of the load that produced it.

    `cache_hit` tells whether the index came from the on-disk index cache.
    """

    def __init__(self, records=(), stats: LoadStats | None = None, cache_hit: bool = False) -> None:
        super().__init__(records)
        self.stats = stats if stats is not None else LoadStats()
        self.cache_hit = cache_hit
