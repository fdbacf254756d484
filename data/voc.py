"""PASCAL VOC XML readers: a VOCdevkit tree and labelImg-style image/annotation folders.

Coordinates: VOC XML boxes are 1-based inclusive pixel indices. A box (xmin, ymin, xmax, ymax) becomes
the 0-based continuous box (xmin - 1, ymin - 1, xmax, ymax) (width xmax - xmin + 1), so xmax == xmin is
a box one pixel wide, which the devkit counts. A box whose XML values have xmax < xmin or ymax < ymin is
degenerate (negative extent as written) and is dropped; a box reaching outside the image is clipped to it.

Every object is kept with its `difficult` flag; whether training uses difficult boxes is the dataset's
decision (`DetectionDataset(use_difficult=...)`). `<part>` elements (person layout: head, hand, foot)
are parts of their object, never objects of their own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data.errors import AnnotationError, DataError, ImageReadError, SplitFileError, UnknownClassError
from data.index_cache import default_cache_dir, fingerprint, load_or_build
from data.records import ImageRecord, LoadStats, RecordList

logger = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".JPG", ".JPEG", ".PNG", ".BMP")
ON_ERROR_CHOICES = ("raise", "skip")
class _DefaultCacheDir:
    """Marker default of `cache_dir`: use `default_cache_dir()` (None disables the cache)."""

    def __repr__(self) -> str:
        return "default_cache_dir()"


_USE_DEFAULT_CACHE = _DefaultCacheDir()


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Validate a class list (object classes only, no background) and return it as a tuple."""
    if isinstance(class_names, str) or not class_names:
        raise DataError(f"class_names must be a non-empty list of class names, got {class_names!r}")
    names = tuple(str(c).strip() for c in class_names)
    if any(not n for n in names):
        raise DataError(f"class_names contains an empty name: {list(class_names)!r}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"class_names contains duplicates {dup}: {list(names)!r}")
    for bg in ("background", "__background__"):
        if bg in names:
            raise DataError(f"class_names lists object classes only (label 0 is background); remove {bg!r}")
    return names


def _text(elem: ET.Element, tag: str, xml_path: Path, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(f"{xml_path}: {where} has no <{tag}> value")
    return child.text.strip()


def _number(elem: ET.Element, tag: str, xml_path: Path, where: str) -> float:
    text = _text(elem, tag, xml_path, where)
    try:
        value = float(text)
    except ValueError:
        raise AnnotationError(f"{xml_path}: {where} <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):  # float() accepts "nan" and "inf", which no pixel coordinate is
        raise AnnotationError(f"{xml_path}: {where} <{tag}> is not a finite number: {text!r}")
    return value


def _flag(elem: ET.Element, tag: str, xml_path: Path, where: str) -> bool:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    text = child.text.strip().lower()
    if text in ("0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise AnnotationError(f"{xml_path}: {where} <{tag}> must be 0 or 1, got {child.text.strip()!r}")


def _resolve_image(images_dir: Path, filename: str | None, image_id: str, xml_path: Path,
                   stats: LoadStats) -> Path | None:
    """The image file of an annotation: ``<image_id><ext>`` in images_dir, as the devkit pairs them, else the
    XML's <filename> there (annotations named apart from their images).

    The file name comes first because a <filename> goes stale when images and annotations are renamed
    together, and may then name another image of the set; that case is warned about. A <filename> of the
    annotation's own name is taken as written, in its case (``IMG_1.JPG`` also "exists" as ``IMG_1.jpg`` on
    a case-insensitive file system).
    """
    named = images_dir / filename if filename else None
    # A bare file name names a file of the set; a path elsewhere is where the photo was annotated.
    in_set = named is not None and Path(filename).name == filename
    if in_set and named.stem == image_id and named.suffix in IMAGE_EXTENSIONS and named.is_file():
        return named
    for ext in IMAGE_EXTENSIONS:
        p = images_dir / f"{image_id}{ext}"
        if p.is_file():
            if in_set and named.is_file() and not named.samefile(p):
                stats.note(logger, logging.WARNING,
                           f"{xml_path}: <filename> {filename!r} names another image than the annotation's own "
                           f"{p.name}; using {p.name}")
            return p
    if named is not None and named.is_file():
        return named
    return None


def _image_size_from_file(path: Path, xml_path: Path) -> tuple[int, int]:
    from PIL import Image  # only needed for annotations that lack a usable <size>

    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception as exc:
        raise ImageReadError(f"{xml_path}: cannot read the size of image {path} ({exc})") from None


def _parse(
    xml_path: Path,
    class_to_label: dict[str, int],
    ignore_unknown: bool,
    images_dir: Path,
    image_id: str,
    image_path: Path | None,
    stats: LoadStats,
) -> ImageRecord:
    """Parse one VOC XML into a record, updating `stats`; raises DataError subclasses naming the file."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise AnnotationError(f"{xml_path}: annotation file not found") from None
    except ET.ParseError as exc:
        raise AnnotationError(f"{xml_path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise AnnotationError(f"{xml_path}: cannot read annotation file ({exc})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")

    if image_path is None:
        filename = root.findtext("filename")
        image_path = _resolve_image(images_dir, filename.strip() if filename else None, image_id, xml_path, stats)
        if image_path is None:
            raise ImageReadError(
                f"{xml_path}: image not found in {images_dir} (filename {filename!r}, id {image_id!r})"
            )
    elif not image_path.is_file():
        raise ImageReadError(f"{xml_path}: image {image_path} not found")

    width = height = 0
    size = root.find("size")
    if size is not None:
        try:
            width = int(float(size.findtext("width") or 0))
            height = int(float(size.findtext("height") or 0))
        except (ValueError, OverflowError):  # OverflowError: "inf"; int() of "nan" is a ValueError
            raise AnnotationError(
                f"{xml_path}: <size> width/height are not finite numbers: "
                f"{size.findtext('width')!r} x {size.findtext('height')!r}"
            ) from None
    if width <= 0 or height <= 0:
        # Some annotation tools write a zero or missing size: the image header is the truth then.
        width, height = _image_size_from_file(image_path, xml_path)
        logger.info("%s: no usable <size>; took %dx%d from %s", xml_path, width, height, image_path)

    raw_boxes: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    for k, obj in enumerate(root.findall("object")):  # direct children only: <part> is never an object
        where = f"object {k}"
        name = _text(obj, "name", xml_path, where)
        stats.boxes_read += 1
        label = class_to_label.get(name)
        if label is None:
            if ignore_unknown:
                stats.boxes_unknown += 1
                continue
            raise UnknownClassError(
                f"{xml_path}: {where} has unknown class {name!r} (known: {', '.join(class_to_label)}); "
                "add it to the class list (data.classes in a config), or skip such objects with "
                "data.ignore_unknown_classes: true"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{xml_path}: {where} ({name}) has no <bndbox>")
        where = f"{where} ({name}) <bndbox>"
        raw_boxes.append(tuple(_number(bndbox, t, xml_path, where) for t in ("xmin", "ymin", "xmax", "ymax")))
        labels.append(label)
        difficult.append(_flag(obj, "difficult", xml_path, f"object {k} ({name})"))

    voc = np.asarray(raw_boxes, dtype=np.float64).reshape(-1, 4)
    # Degenerate as written in the file; see the module docstring.
    bad = (voc[:, 2] < voc[:, 0]) | (voc[:, 3] < voc[:, 1])
    boxes = voc.copy()
    boxes[:, :2] -= 1.0  # 1-based inclusive -> 0-based continuous
    clipped = boxes.copy()
    np.clip(clipped[:, 0::2], 0.0, width, out=clipped[:, 0::2])
    np.clip(clipped[:, 1::2], 0.0, height, out=clipped[:, 1::2])
    outside = ~bad & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    moved = ~bad & ~outside & np.any(clipped != boxes, axis=1)
    drop = bad | outside
    for i in np.flatnonzero(drop):
        why = "xmax < xmin or ymax < ymin" if bad[i] else f"entirely outside the {width}x{height} image"
        stats.note(logger, logging.WARNING, f"{xml_path}: dropped box {voc[i].tolist()} ({why})")
    for i in np.flatnonzero(moved):
        stats.note(logger, logging.INFO,
            f"{xml_path}: clipped box {voc[i].tolist()} to the {width}x{height} image",
        )
    keep = ~drop
    stats.boxes_dropped += int(drop.sum())
    stats.boxes_clipped += int(moved.sum())
    record = ImageRecord(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        boxes=clipped[keep].astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64)[keep],
        difficult=np.asarray(difficult, dtype=bool)[keep],
    )
    stats.boxes_kept += record.n_boxes
    stats.boxes_difficult += int(record.difficult.sum())
    if record.n_boxes == 0:
        stats.images_empty += 1
        stats.note(logger, logging.INFO, f"{xml_path}: no boxes (image kept)")
    return record


def parse_voc_xml(
    xml_path: str | Path,
    class_names: Sequence[str],
    ignore_unknown: bool = False,
    *,
    images_dir: str | Path | None = None,
    image_id: str | None = None,
    stats: LoadStats | None = None,
) -> ImageRecord:
    """Parse one VOC XML file into an ImageRecord (boxes 0-based continuous pixel xyxy, see module doc).

    Args:
        xml_path: the annotation file.
        class_names: object classes in label order (label i+1 = class_names[i]).
        ignore_unknown: skip objects whose class is not in class_names instead of raising.
        images_dir: where the image lives (default: `<xml dir>/../JPEGImages`); the image is the XML's
            `<image_id>.<jpg|jpeg|png|bmp>` there, else the XML's <filename>.
        image_id: record id (default: the XML file stem).
        stats: LoadStats updated with what was read, dropped and clipped.

    Raises:
        AnnotationError (malformed XML, missing fields), UnknownClassError, ImageReadError (no image).
    """
    xml_path = Path(xml_path)
    class_to_label = {n: i + 1 for i, n in enumerate(check_class_names(class_names))}
    images_dir = Path(images_dir) if images_dir is not None else xml_path.parent.parent / "JPEGImages"
    own = LoadStats() if stats is None else stats
    own.images_read += 1
    record = _parse(xml_path, class_to_label, ignore_unknown, images_dir, image_id or xml_path.stem, None, own)
    own.images_kept += 1
    return record


def read_split_file(path: str | Path, flag_column: bool = False) -> list[str]:
    """Ids of a split list, one per non-empty line; a trailing image/XML extension is removed.

    A line is the whole id, spaces included (labelImg keeps file names such as ``IMG 001.jpg`` or
    ``raccoon 1.jpg``). With ``flag_column`` (a VOCdevkit's ImageSets/Main, whose ids have no spaces) a
    line may also be an id and a flag of -1, 0 or 1, as in VOC's class-specific lists: the id is then the
    first column. The file is read as UTF-8, with or without a byte-order mark. Raises SplitFileError
    naming the file when it is missing, not UTF-8, lists no id or lists one twice.
    """
    path = Path(path)
    if not path.is_file():
        siblings = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        hint = f"; available: {', '.join(siblings)}" if siblings else ""
        raise SplitFileError(f"{path}: split file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first id
    except UnicodeDecodeError as exc:
        raise SplitFileError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    ids = []
    for line in text.splitlines():
        columns = line.split()
        if not columns:
            continue
        flagged = flag_column and len(columns) == 2 and columns[1] in ("-1", "0", "1")
        token = columns[0] if flagged else line.strip()
        for ext in (*IMAGE_EXTENSIONS, ".xml"):
            if token.endswith(ext):
                token = token[: -len(ext)]
                break
        ids.append(token)
    if not ids:
        raise SplitFileError(f"{path}: lists no image id")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise SplitFileError(f"{path}: ids listed more than once: {dup}")
    return ids


def _load_entries(
    entries: list[tuple[str, Path, Path, Path | None]],
    class_names: Sequence[str],
    ignore_unknown: bool,
    on_error: str,
    cache_dir,
    name: str,
    source: str,
    extra_files: list[Path],
) -> RecordList:
    """Parse (image_id, xml_path, images_dir, image_path or None) entries, through the index cache."""
    if on_error not in ON_ERROR_CHOICES:
        raise DataError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    names = check_class_names(class_names)
    class_to_label = {n: i + 1 for i, n in enumerate(names)}
    if cache_dir is _USE_DEFAULT_CACHE:
        cache_dir = default_cache_dir()

    def build() -> tuple[list[ImageRecord], LoadStats, str]:
        stats = LoadStats()
        records = []
        first_annotation: dict[Path, Path] = {}  # image -> the annotation that claimed it
        for image_id, xml_path, images_dir, image_path in entries:
            stats.images_read += 1
            file_stats = LoadStats()
            try:
                rec = _parse(xml_path, class_to_label, ignore_unknown, images_dir, image_id, image_path,
                             file_stats)
            except DataError as exc:
                if on_error == "raise":
                    raise
                stats.images_skipped += 1
                stats.note(logger, logging.WARNING, f"skipped: {exc}")
                continue
            annotated_by = first_annotation.setdefault(rec.image_path, xml_path)
            if annotated_by != xml_path:
                message = (f"{annotated_by} and {xml_path} both annotate image {rec.image_path}: its objects "
                           "would count twice; remove one of the two annotations")
                if on_error == "raise":
                    raise AnnotationError(message)
                stats.images_skipped += 1
                stats.note(logger, logging.WARNING, f"skipped: {message}")
                continue
            stats.merge(file_stats)
            stats.images_kept += 1
            records.append(rec)
        return records, stats, _images_key(records)

    files = [e[1] for e in entries] + list(extra_files)
    layout = [(e[0], str(e[2]), str(e[3])) for e in entries]
    key = fingerprint(files, extra=(names, ignore_unknown, on_error, layout))
    # A load that skipped broken files is not cached: once the files are fixed it must be read again.
    # The images are known only after parsing (an XML names its image, and gives the size unless the
    # image must), so a cached index holds their fingerprint and is rebuilt when one changed or went.
    (records, stats, _), hit = load_or_build(
        cache_dir, name, key, build, store=lambda value: value[1].images_skipped == 0,
        still_valid=lambda value: _images_key(value[0]) == value[2],
    )
    level = logging.WARNING if (stats.images_skipped or stats.boxes_dropped) else logging.INFO
    logger.log(level, "%s%s: %s", source, " (index cache)" if hit else "", stats.summary())
    return RecordList(records, stats, cache_hit=hit)


def _images_key(records: Sequence[ImageRecord]) -> str:
    return fingerprint(r.image_path for r in records)


def _cache_name(prefix: str, *parts: object) -> str:
    return f"{prefix}-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def load_vocdevkit(
    root: str | Path,
    sets: Sequence[tuple[str, str]],
    class_names: Sequence[str] = VOC_CLASSES,
    *,
    ignore_unknown: bool = False,
    on_error: str = "raise",
    cache_dir: str | Path | None = _USE_DEFAULT_CACHE,  # type: ignore[assignment]
) -> RecordList:
    """Read a VOCdevkit tree: for each (folder, split) in `sets`, the ids of
    `root/<folder>/ImageSets/Main/<split>.txt`, their `Annotations/<id>.xml` and `JPEGImages/<id>.jpg`
    (or another image extension, or the XML's <filename>, as for `load_image_folder`).

    Example: `load_vocdevkit("VOCdevkit", [("VOC2007", "trainval"), ("VOC2012", "trainval")])`.

    Args:
        ignore_unknown: skip objects of classes outside class_names (counted) instead of raising.
        on_error: "raise" (default) stops at the first bad file with an error naming it; "skip" skips that
            image, logs why and counts it in `stats.images_skipped`.
        cache_dir: directory of the parsed-index cache (default `default_cache_dir()`; None disables it).

    Returns:
        RecordList of ImageRecord in split-file order, with `.stats` (LoadStats) and `.cache_hit`.
        Image ids must be unique over all sets (DataError otherwise).
    """
    root = Path(root)
    if isinstance(sets, tuple) and len(sets) == 2 and all(isinstance(s, str) for s in sets):
        sets = [sets]  # a single (folder, split) pair
    if not sets:
        raise DataError(f"{root}: no (folder, split) sets given")
    entries: list[tuple[str, Path, Path, Path | None]] = []
    split_files: list[Path] = []
    seen: dict[str, tuple[str, str]] = {}
    for folder, split in sets:
        base = root / folder
        if not base.is_dir():
            available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise DataError(f"{base}: VOC folder not found (available in {root}: {available})")
        split_path = base / "ImageSets" / "Main" / f"{split}.txt"
        split_files.append(split_path)
        for image_id in read_split_file(split_path, flag_column=True):
            if image_id in seen:
                raise SplitFileError(
                    f"{split_path}: image id {image_id!r} already listed by {seen[image_id]}; "
                    "image ids must be unique over all sets"
                )
            seen[image_id] = (folder, split)
            entries.append((image_id, base / "Annotations" / f"{image_id}.xml", base / "JPEGImages", None))
    return _load_entries(
        entries, class_names, ignore_unknown, on_error, cache_dir,
        name=_cache_name("voc", str(root.resolve()), [tuple(s) for s in sets]),
        source=f"VOC {root} {[tuple(s) for s in sets]}", extra_files=split_files,
    )


def split_ids(ids: Sequence[str], split: str, val_fraction: float, seed: int) -> list[str]:
    """Seeded split of ids (kept in their given order) into a held-out part ("val", also called "test") and
    "train"; "all" returns every id. The two parts never overlap and together give every id.

    Each id is held out on its own: when a hash of (seed, id), read as a number in [0, 1), is below
    `val_fraction`. So adding or removing files never moves another image between the parts (a permutation
    of the whole list would move many: training images would land in the test part of a later run), and
    the held-out part is `val_fraction` of the ids on average, not exactly.
    """
    if split not in ("train", "val", "test", "all"):
        raise DataError(
            f"split must be 'train', 'val' (= 'test') or 'all' when no split file is given, got {split!r}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if split == "all":
        return list(ids)
    want_val = split != "train"
    return [i for i in ids if (_unit_hash(seed, i) < val_fraction) == want_val]


def _unit_hash(seed: int, image_id: str) -> float:
    """A number in [0, 1) fixed by (seed, id), the same on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def load_image_folder(
    images_dir: str | Path,
    annotations_dir: str | Path,
    class_names: Sequence[str],
    split_file: str | Path | None = None,
    split: str = "all",
    val_fraction: float = 0.2,
    seed: int = 0,
    *,
    test_fraction: float | None = None,
    ignore_unknown: bool = False,
    on_error: str = "raise",
    cache_dir: str | Path | None = _USE_DEFAULT_CACHE,  # type: ignore[assignment]
) -> RecordList:
    """Read labelImg-style data: a folder of images and a folder of VOC XML files (one per image).

    With `split_file`, the ids listed there (one per line; `<id>.xml` must exist). Without it, every
    `*.xml` in annotations_dir and its subfolders (ids are their paths there without `.xml`, sorted), split by `split_ids(ids, split, val_fraction, seed)`:
    split "train", "val" (= "test": the held-out part) or "all"; `test_fraction`, when given, is the
    same setting as `val_fraction` under the name evaluation configs use. Each XML's image is `<id>.<ext>` in
    images_dir, else the file its <filename> names there.
    Same checks, options and output as `load_vocdevkit`.
    """
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    for d, what in ((images_dir, "images"), (annotations_dir, "annotations")):
        if not d.is_dir():
            raise DataError(f"{d}: {what} directory not found")
    if test_fraction is not None:
        val_fraction = test_fraction
    extra: list[Path] = []
    if split_file is not None:
        ids = read_split_file(split_file)
        extra.append(Path(split_file))
        split_desc = str(split_file)
    else:
        # Subfolders too (annotations/day1/x.xml is id "day1/x", as a split file would write it).
        relative = (p.relative_to(annotations_dir) for p in annotations_dir.rglob("*.xml"))
        all_ids = sorted(r.with_suffix("").as_posix() for r in relative
                         if not any(part.startswith(".") for part in r.parts))
        if not all_ids:
            raise DataError(f"{annotations_dir}: no .xml annotation files")
        n_images = sum(1 for p in images_dir.iterdir() if p.suffix in IMAGE_EXTENSIONS)
        if n_images > len(all_ids):
            logger.info("%s: %d image files but %d annotation files; images without an XML are not used",
                        images_dir, n_images, len(all_ids))
        ids = split_ids(all_ids, split, val_fraction, seed)
        split_desc = f"{split} (data.test_fraction={val_fraction}, seed={seed})"
        if not ids:
            raise DataError(
                f"{annotations_dir}: the {split!r} part of a random split of {len(all_ids)} annotation files "
                f"with data.test_fraction={val_fraction} and data.split_seed={seed} is empty; change the "
                "fraction or the seed, or give split files"
            )
    entries = [(i, annotations_dir / f"{i}.xml", images_dir, None) for i in ids]
    return _load_entries(
        entries, class_names, ignore_unknown, on_error, cache_dir,
        name=_cache_name("folder", str(images_dir.resolve()), str(annotations_dir.resolve()), split_desc),
        source=f"{annotations_dir} [{split_desc}]", extra_files=extra,
    )


__all__ = [
    "VOC_CLASSES", "check_class_names", "load_image_folder", "load_vocdevkit", "parse_voc_xml",
    "read_split_file", "split_ids",
]
