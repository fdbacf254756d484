"""Run a trained checkpoint on images and draw what it finds.

    python detect.py --checkpoint checkpoints/demo/best.pt --input photo.jpg
    python detect.py --checkpoint checkpoints/voc/best.pt --input "photos/*.jpg" --output-dir out --min-score 0.4

Each image's drawing is <output-dir>/<name>_detections.jpg. Inputs from several folders (a glob such as
"trips/*/x.jpg") keep their folders below the deepest folder they share, so trips/a/x.jpg and trips/b/x.jpg
become <output-dir>/a/x_detections.jpg and <output-dir>/b/x_detections.jpg; two images of one folder that
differ only in extension keep it (x_jpg_detections.jpg, x_png_detections.jpg), and a name still taken
(x.jpg beside x.JPG, which sorts first) gets a number (x_jpg_2_detections.jpg). detections.json lists each image with its output.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data.dataset import load_image
from data.errors import ImageReadError
from data.transforms import build_eval_transform, normalize_images
from model.loss import score_activation_for
from utils.atomic_file import atomic_file
from utils.builders import checkpoint_config, detector_from_checkpoint
from utils.checkpoint import INFERENCE_KEYS, load_checkpoint
from utils.engine import resolve_device
from utils.errors import USER_ERRORS, user_message
from utils.output_dir import prepare_output_dir

logger = logging.getLogger("detect")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class InputError(ValueError):
    """An input path that names no readable image, or an output file that cannot be written."""


def number(text: str, kind: type[float] | type[int]) -> float:
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def score_threshold(text: str) -> float:
    value = number(text, float)
    if not 0.0 <= value < 1.0:  # also refuses NaN; no score is above 1, so 1 would keep nothing
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def overlap_threshold(text: str) -> float:
    value = number(text, float)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def voting_iou(text: str) -> float:
    value = number(text, float)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (0 turns voting off), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Detect objects with a Tiny-Detector checkpoint; writes annotated images and a JSON of "
        "detections in pixel coordinates."
    )
    parser.add_argument("--checkpoint", required=True, help="a best.pt/last.pt written by train.py")
    parser.add_argument("--input", required=True, help="an image file, a folder of images, or a quoted glob")
    parser.add_argument(
        "--output-dir", default="detections",
        help="where the drawn images (<name>_detections.jpg; inputs from several folders keep their folders "
        "below the one they share) and detections.json go (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--min-score", type=score_threshold, default=0.4,
        help="lowest score drawn and reported, in [0, 1): a detection needs a score strictly above it "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--max-overlap", type=overlap_threshold, default=0.45,
        help="NMS IoU threshold in (0, 1]: a box overlapping a higher-scored box of its class by more is dropped "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--top-k", type=positive_int, default=200,
                        help="most detections kept per image, >= 1 (default: %(default)s)")
    parser.add_argument(
        "--box-voting-iou", type=voting_iou, default=None,
        help="box voting IoU in [0, 1] (0 turns it off); default: the checkpoint config's eval.box_voting_iou. "
        "The voters are the candidates above --min-score",
    )  # fmt: skip
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when there is one), cpu, cuda or cuda:N (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_inputs(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        if not glob.has_magic(pattern) and not path.exists():
            raise InputError(f"--input {pattern!r}: no such file or folder (relative to {Path.cwd()})")
        raise InputError(f"--input {pattern!r}: no image files found")
    return files


def output_names(files: list[Path]) -> list[Path]:
    """Each input's drawing, relative to the output folder: unique even where file names repeat."""
    folders = [Path(os.path.abspath(path.parent)) for path in files]
    shared = Path(os.path.commonpath(folders))
    # Lower case, because two names that differ only in case are one file on macOS and Windows.
    stems = Counter((folder, path.stem.lower()) for folder, path in zip(folders, files, strict=True))
    names, taken = [], set()
    for folder, path in zip(folders, files, strict=True):
        base = path.stem if stems[folder, path.stem.lower()] == 1 else f"{path.stem}_{path.suffix[1:]}"
        name, n = folder.relative_to(shared) / f"{base}_detections.jpg", 2
        while str(name).lower() in taken:  # only names such as x.JPG beside x.jpg get here
            name, n = folder.relative_to(shared) / f"{base}_{n}_detections.jpg", n + 1
        taken.add(str(name).lower())
        names.append(name)
    return names


def class_colour(label: int) -> tuple[int, int, int]:
    # A fixed, well-spread hue per class so the same class keeps its colour across images.
    hue = (label * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 230]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_detections(image_rgb: np.ndarray, found: list[dict[str, Any]]) -> np.ndarray:
    """A BGR copy of the image with each box, class name and score drawn."""
    canvas = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    thickness = max(1, round(min(canvas.shape[:2]) / 200))
    height, width = canvas.shape[:2]
    # cv2 draws a line of thickness t > 1 over (t + 1) // 2 pixels on each side of its own: a box on the
    # border moves in by that much to be seen whole.
    inset = (thickness + 1) // 2 if thickness > 1 else 0
    # Labels grow with the picture, as the lines do: at a fixed size they vanish when a large photo is shown whole.
    font_scale = 0.45 * max(1.0, min(height, width) / 500)
    text_thickness = max(1, round(font_scale))
    for det in found:
        # Continuous pixel coordinates [0, W] to the first and last pixel the box covers.
        x1, y1, x2, y2 = det["box"]
        x1, y1 = max(math.floor(x1), inset), max(math.floor(y1), inset)
        x2, y2 = min(math.ceil(x2) - 1, width - 1 - inset), min(math.ceil(y2) - 1, height - 1 - inset)
        colour = class_colour(det["label"])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        text = f"{det['class']} {det['score']:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_thickness)
        top = max(0, y1 - th - baseline - 2)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + baseline + 2), colour, -1)
        cv2.putText(canvas, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    text_thickness, cv2.LINE_AA)
    return canvas


@torch.inference_mode()
def detect_image(detector, transform, image_rgb: np.ndarray, device: torch.device, args: argparse.Namespace,
                 class_names: list[str], activation: str, box_voting_iou: float | None) -> list[dict[str, Any]]:
    height, width = image_rgb.shape[:2]
    tensor = transform(image=image_rgb, bboxes=np.zeros((0, 4)), labels=[], difficult=[])["image"]
    locs, scores = detector(normalize_images(tensor.unsqueeze(0).to(device)))
    found = detector.detect_objects(
        locs.float(), scores.float(), min_score=args.min_score, max_overlap=args.max_overlap, top_k=args.top_k,
        activation=activation, box_voting_iou=box_voting_iou,
    )[0]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = (found.boxes.cpu() * scale).tolist()
    return [
        {"label": int(label), "class": class_names[int(label) - 1], "score": round(float(score), 4),
         "box": [round(v, 1) for v in box]}
        for box, label, score in zip(boxes, found.labels.tolist(), found.scores.tolist(), strict=True)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        files = resolve_inputs(args.input)
        checkpoint = load_checkpoint(args.checkpoint, require=INFERENCE_KEYS)
        device = resolve_device(args.device, "--device")
        detector = detector_from_checkpoint(checkpoint, args.checkpoint).to(device).eval()
        class_names = list(checkpoint["class_names"])  # checked by detector_from_checkpoint
        transform = build_eval_transform(detector.image_size)
        saved = checkpoint_config(checkpoint, args.checkpoint)
        activation = score_activation_for(saved.loss.classification)
        box_voting_iou = args.box_voting_iou
        if box_voting_iou is None:
            box_voting_iou = saved.eval.box_voting_iou
        box_voting_iou = box_voting_iou or None
        output_dir = prepare_output_dir(Path(args.output_dir))
        report, unreadable = [], []
        for path, name in zip(files, output_names(files), strict=True):
            try:
                # A photo is searched and drawn as it is shown, upright, with its EXIF orientation applied,
                # unlike training and evaluation, which keep the frame annotations are written in.
                image = load_image(path, upright=True)
            except ImageReadError as error:  # one bad file among many: the others are still detected
                logger.error("%s", error)
                unreadable.append(str(path))
                continue
            found = detect_image(detector, transform, image, device, args, class_names, activation, box_voting_iou)
            drawn_path = prepare_output_dir(output_dir / name.parent, "output subfolder") / name.name
            if not cv2.imwrite(str(drawn_path), draw_detections(image, found)):
                raise InputError(f"cannot write {drawn_path}")
            report.append({"image": str(path), "width": image.shape[1], "height": image.shape[0],
                           "output": str(drawn_path), "detections": found})  # fmt: skip
            logger.info("%s: %d detections -> %s", path, len(found), drawn_path)
        try:
            with atomic_file(output_dir / "detections.json", "w") as handle:
                json.dump(report, handle, indent=2)
        except OSError as error:
            raise InputError(f"cannot write {output_dir / 'detections.json'}: {error.strerror or error}") from error
        print(f"wrote {len(report)} images and {output_dir / 'detections.json'}")
        if unreadable:
            where = f"the others are in {output_dir}" if report else "no image could be processed"
            raise InputError(f"{len(unreadable)} of the {len(files)} images could not be read (first: "
                             f"{unreadable[0]}); {where}")
    except (InputError, *USER_ERRORS) as error:
        logger.error("%s", user_message(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
