"""VOC results files (``comp4_det_test_<class>.txt``): atomic writing and strict reading.

One file per class, one detection per line: ``image_id score xmin ymin xmax ymax`` with the box in the
devkit's 1-based inclusive pixel coordinates. Numbers are written with Python's shortest round-trip
representation (``repr`` of a float64), so reading a file back gives bit-identical scores and boxes and
therefore the same ranking and the same AP; fixed decimals would merge close scores into ties and could
reorder detections of different images.

Lines are written in input order (order of the ``detections`` list, then order inside each image), and
`read_voc_results` regroups them per image in ``known_image_ids`` order, keeping file order inside an
image; with the same image order on both sides, ties in score rank the same way after a round trip.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.voc_eval import ImageDetections

logger = logging.getLogger(__name__)

RESULTS_FIELDS = "image_id score xmin ymin xmax ymax"


class ResultsFormatError(ValueError):
    """A results file or detection that does not fit the VOC results format; names file and line."""


def results_file_name(class_name: str) -> str:
    """File name of one class's detections, as the devkit names it for competition 4."""
    return f"comp4_det_test_{class_name}.txt"


def writable_class_name(name: str) -> bool:
    """Whether a class's results file can be named after it: spaces are fine in a file name (COCO has
    "traffic light"); a path separator or NUL is not."""
    return bool(name) and "/" not in name and os.sep not in name and "\0" not in name


def _check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(class_names)
    if not names:
        raise ResultsFormatError("class_names is empty")
    for name in names:
        if not writable_class_name(name):
            raise ResultsFormatError(f"class name {name!r} cannot be used in a results file name")
    if len(set(names)) != len(names):
        raise ResultsFormatError(f"class names are not unique: {list(names)}")
    return names


def writable_image_id(image_id: str) -> bool:
    """Whether a results line can hold `image_id`: its fields are separated by whitespace."""
    return bool(image_id) and not any(ch.isspace() for ch in image_id)


def _check_image_id(image_id: str, where: str) -> None:
    if not writable_image_id(image_id):
        raise ResultsFormatError(f"{where}: image id {image_id!r} is empty or contains whitespace")


def write_voc_results(
    out_dir: str | Path, detections: Sequence[ImageDetections], class_names: Sequence[str]
) -> list[Path]:
    """Write ``comp4_det_test_<class>.txt`` for every class into `out_dir` (created if needed).

    detections: per image, devkit 1-based boxes (k, 4), labels (k,) in 1..len(class_names), scores (k,).
    Classes without detections get an empty file. All files are written to temporary names first and
    renamed into place only once every file is complete, so an error leaves no partial file behind.
    Returns the written paths in class order. Raises ResultsFormatError for labels out of range, image
    ids that are empty or contain whitespace, and unusable class names.
    """
    names = _check_class_names(class_names)
    out_dir = Path(out_dir)
    lines: list[list[str]] = [[] for _ in names]
    for det in detections:
        _check_image_id(det.image_id, "detections")
        labels = det.labels
        if labels.size and (labels.min() < 1 or labels.max() > len(names)):
            bad = int(labels[(labels < 1) | (labels > len(names))][0])
            raise ResultsFormatError(
                f"detections of image {det.image_id!r}: label {bad} is outside 1..{len(names)}"
            )
        # tolist() gives Python floats, whose repr is the shortest exact form.
        for label, score, box in zip(labels.tolist(), det.scores.tolist(), det.boxes.tolist(), strict=True):
            lines[label - 1].append(f"{det.image_id} {score!r} {box[0]!r} {box[1]!r} {box[2]!r} {box[3]!r}\n")

    out_dir.mkdir(parents=True, exist_ok=True)
    temporary: list[str] = []
    try:
        for class_lines in lines:
            fd, tmp_name = tempfile.mkstemp(prefix=".comp4_det_test_", suffix=".tmp", dir=out_dir)
            temporary.append(tmp_name)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(class_lines)
                handle.flush()
                os.fsync(handle.fileno())
        paths = [out_dir / results_file_name(name) for name in names]
        for tmp_name, path in zip(temporary, paths, strict=True):
            os.replace(tmp_name, path)
    except BaseException:
        for tmp_name in temporary:
            Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %d detections in %d results files to %s", sum(map(len, lines)), len(names), out_dir)
    return paths


def _nonblank_line_numbers(lines: list[str]) -> list[int]:
    return [number for number, line in enumerate(lines, start=1) if line.split()]


# The numbers numpy's reader takes (Python's float() also takes '1_0' and non-ASCII digits).
_NUMBER = re.compile(r"[+-]?((\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|inf|infinity|nan)", re.ASCII | re.IGNORECASE)


def _file_lines(text: str) -> list[str]:
    """The lines as numpy's reader counts them: read_text has turned \\r\\n and \\r into \\n, and
    str.splitlines would also split at form feeds and other separators."""
    return text.split("\n")


def _syntax_error(path: Path, text: str) -> ResultsFormatError | None:
    """The first line without 6 fields or with a non-number, as an error naming file and line."""
    for number, line in enumerate(_file_lines(text), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            return ResultsFormatError(
                f"{path}:{number}: expected 6 fields '{RESULTS_FIELDS}', got {len(fields)}: {line.strip()!r}"
            )
        for name, value in zip(RESULTS_FIELDS.split()[1:], fields[1:], strict=True):
            if not _NUMBER.fullmatch(value):
                return ResultsFormatError(f"{path}:{number}: {name} {value!r} is not a number")
    return None


def _parse_results_file(
    path: Path, image_index: dict[str, int], id_width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image index (n,), scores (n,), boxes (n, 4)) of one class file; errors name the file and line.

    numpy's C reader parses well-formed files; any problem is then located by a line-by-line pass, so
    messages give file line numbers (blank lines skipped by the reader still count). `id_width` is one
    more than the longest known image id: a longer id in the file comes back truncated to that width,
    which matches no known id and is reported as unknown.
    """
    dtype = [("image_id", f"U{id_width}")] + [(name, "f8") for name in RESULTS_FIELDS.split()[1:]]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data" for empty files
            table = np.loadtxt(path, dtype=dtype, comments=None, ndmin=1, encoding="utf-8")
    except FileNotFoundError:
        raise ResultsFormatError(f"{path}: results file is missing") from None
    except UnicodeDecodeError as exc:
        raise ResultsFormatError(f"{path}: not a UTF-8 text file ({exc})") from None
    except ValueError as exc:
        error = _syntax_error(path, path.read_text(encoding="utf-8"))
        raise (error or ResultsFormatError(f"{path}: {exc}")) from None
    n = table.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4))
    numbers = np.stack([table[name] for name in RESULTS_FIELDS.split()[1:]], axis=1)

    def locate(row: int) -> tuple[int, str]:
        """File line number and text of table row `row` (only on the error path)."""
        lines = _file_lines(path.read_text(encoding="utf-8"))
        number = _nonblank_line_numbers(lines)[row]
        return number, lines[number - 1]

    def fail(row: int, message: str) -> ResultsFormatError:
        return ResultsFormatError(f"{path}:{locate(row)[0]}: {message}")

    bad = ~np.isfinite(numbers).all(axis=1)
    if bad.any():
        raise fail(int(np.flatnonzero(bad)[0]), "NaN or infinite value")
    boxes = numbers[:, 1:]
    # 1-based inclusive boxes: xmax == xmin - 1 is an empty box (zero continuous width), narrower is inverted.
    bad = (boxes[:, 2] < boxes[:, 0] - 1) | (boxes[:, 3] < boxes[:, 1] - 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise fail(row, f"box {boxes[row].tolist()} has xmax < xmin - 1 or ymax < ymin - 1")

    image = np.empty(n, dtype=np.int64)
    for row, image_id in enumerate(table["image_id"].tolist()):
        index = image_index.get(image_id)
        if index is None:
            number, line = locate(row)  # the table may hold a truncated id; report the file's
            raise ResultsFormatError(f"{path}:{number}: unknown image id {line.split()[0]!r}")
        image[row] = index
    return image, numbers[:, 0], boxes


def read_voc_results(
    results_dir: str | Path, class_names: Sequence[str], known_image_ids: Sequence[str]
) -> list[ImageDetections]:
    """Read ``comp4_det_test_<class>.txt`` of every class from `results_dir`.

    Returns one ImageDetections per id of `known_image_ids`, in that order (empty where an image has no
    detection), boxes in devkit 1-based pixels, labels 1..len(class_names). Inside an image, detections
    keep class order, then file order; each carries its line's position in its class file as `tie_break`,
    so that `evaluate_voc` ranks equal scores in file order, as the devkit does. Raises ResultsFormatError naming the file (and line) for a missing
    directory or class file, lines without exactly 6 fields, values that are not finite numbers, boxes
    with xmax < xmin - 1 or ymax < ymin - 1, and image ids not in `known_image_ids`.
    """
    names = _check_class_names(class_names)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ResultsFormatError(f"{results_dir}: results directory does not exist")
    image_ids = [str(i) for i in known_image_ids]
    for image_id in image_ids:
        _check_image_id(image_id, f"{results_dir}: the evaluated split (results files cannot list it)")
    image_index = {image_id: i for i, image_id in enumerate(image_ids)}
    if len(image_index) != len(image_ids):
        duplicate = next(i for i, count in Counter(image_ids).items() if count > 1)
        raise ResultsFormatError(f"known_image_ids lists {duplicate!r} more than once")

    id_width = max(map(len, image_ids), default=0) + 1
    images, scores, boxes, labels, lines = [], [], [], [], []
    for label, name in enumerate(names, start=1):
        image, score, box = _parse_results_file(results_dir / results_file_name(name), image_index, id_width)
        images.append(image)
        scores.append(score)
        boxes.append(box)
        labels.append(np.full(image.shape[0], label, dtype=np.int64))
        lines.append(np.arange(image.shape[0], dtype=np.int64))
    image = np.concatenate(images)
    if not image_ids:
        return []
    # Stable: inside one image, detections stay in class order, then file order.
    order = np.argsort(image, kind="stable")
    split = np.cumsum(np.bincount(image, minlength=len(image_ids)))[:-1]
    per_image = zip(
        np.split(np.concatenate(boxes)[order], split),
        np.split(np.concatenate(labels)[order], split),
        np.split(np.concatenate(scores)[order], split),
        np.split(np.concatenate(lines)[order], split),
        strict=True,
    )
    result = [
        ImageDetections(image_id, b, lab, s, tie_break=line)
        for image_id, (b, lab, s, line) in zip(image_ids, per_image, strict=True)
    ]
    logger.info("read %d detections for %d images from %s", image.shape[0], len(image_ids), results_dir)
    return result
