"""Shared paths and small writers for the data tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
VOCDEVKIT = FIXTURES / "VOCdevkit"
RACCOON = FIXTURES / "raccoon"
COCO_JSON = FIXTURES / "coco" / "instances_raccoon.json"


def write_jpeg(path: Path, width: int, height: int, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), value, dtype=np.uint8)
    assert cv2.imwrite(str(path), image)
    return path


def write_voc_xml(
    path: Path,
    filename: str,
    width: int | None,
    height: int | None,
    objects: list[tuple[str, tuple, int]],
) -> Path:
    """A labelImg-style XML; objects are (name, (xmin, ymin, xmax, ymax) as written, difficult)."""
    size = "" if width is None else (
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
    )
    s = f"<annotation>\n\t<folder>images</folder>\n\t<filename>{filename}</filename>\n{size}\t<segmented>0</segmented>\n"
    for name, (x1, y1, x2, y2), difficult in objects:
        s += (
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x1}</xmin>\n"
            f"\t\t\t<ymin>{y1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(s + "</annotation>\n")
    return path


def labelimg_folder(root: Path, items: dict[str, tuple[int, int, list]]) -> tuple[Path, Path]:
    """images/ + annotations/ with one JPEG and XML per id: items[id] = (width, height, objects)."""
    images, annotations = root / "images", root / "annotations"
    for image_id, (w, h, objects) in items.items():
        write_jpeg(images / f"{image_id}.jpg", w, h)
        write_voc_xml(annotations / f"{image_id}.xml", f"{image_id}.jpg", w, h, objects)
    return images, annotations
