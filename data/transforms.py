"""Albumentations pipelines: the SSD training augmentation and the evaluation resize.

Both pipelines take `image` (H, W, 3) uint8 RGB, `bboxes` (n, 4) fractional xyxy in [0, 1]
(albumentations format), `labels` (n,) and `difficult` (n,), and return `image` as a (3, S, S) uint8
tensor plus the surviving `bboxes` (fractional xyxy), `labels` and `difficult`.

Normalization with ImageNet mean/std is not part of the pipelines: `normalize_images` runs it on whole
batches, on the device that runs the model. A DataLoader then moves uint8 pixels between processes and to
the GPU, a quarter of the bytes of float32 ones.

Training (SSD recipe): zoom-out (`Expand`: a canvas up to 4x filled with the mean colour), IoU-constrained
random crop (`IoURandomCrop`), resize to S x S, horizontal flip, photometric distortion.
The first three run as one step, `ExpandCropResize`: the same random draws and boxes as `Expand`,
`IoURandomCrop` and `A.Resize` in a row, but one affine warp from the source photograph straight to
S x S instead of building a canvas of up to 16x the photograph's pixels (and a plain resize of the crop,
the same pixels as the steps in a row, when the window lies inside the photograph). Flip and photometric
distortion run after the resize: they commute with it (a flip exactly, the per-pixel colour changes up to
interpolation rounding), and on the S x S image they cost a fraction of what they cost on a large
photograph.

Randomness: every random draw comes from the Compose's `random_generator` / `py_random`. Use
`seed_transform(transform, seed)` to make a pipeline reproducible (one shared stream for all steps).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The canvas of a zoom-out is filled with the mean colour, so after normalization it is ~zero.
MEAN_PIXEL: tuple[int, int, int] = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # type: ignore[assignment]
# SSD's crop options: None keeps the whole image, 0.0 is an unconstrained patch, the rest are the
# minimum IoU that the patch must have with at least one box.
SSD_MIN_IOUS: tuple[float | None, ...] = (None, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


# ---------------------------------------------------------------------------------------------------------
# Pure geometry shared by the transforms below (boxes: (n, 4+k) arrays whose first 4 columns are fractional
# xyxy; extra columns, e.g. albumentations' label columns, travel with their box).


def sample_expand(py_random: random.Random, height: int, width: int, max_ratio: float) -> tuple[int, int, int, int]:
    """Zoom-out parameters (top, left, canvas_h, canvas_w): ratio ~ U[1, max_ratio], a uniform offset."""
    ratio = py_random.uniform(1.0, max_ratio)
    canvas_h, canvas_w = int(height * ratio), int(width * ratio)
    top = py_random.randint(0, canvas_h - height)
    left = py_random.randint(0, canvas_w - width)
    return top, left, canvas_h, canvas_w


def expand_boxes(
    bboxes: np.ndarray, height: int, width: int, top: int, left: int, canvas_h: int, canvas_w: int
) -> np.ndarray:
    """Fractional boxes of a height x width image placed at (top, left) on a canvas_h x canvas_w canvas."""
    out = np.array(bboxes, dtype=np.float64, copy=True)
    out[:, [0, 2]] = (out[:, [0, 2]] * width + left) / canvas_w
    out[:, [1, 3]] = (out[:, [1, 3]] * height + top) / canvas_h
    return out


def sample_iou_crop(
    rng: np.random.Generator,
    py_random: random.Random,
    height: int,
    width: int,
    boxes_px: np.ndarray,
    min_ious: Sequence[float | None],
    min_scale: float,
    max_aspect: float,
    max_trials: int,
) -> tuple[int, int, int, int]:
    """SSD crop patch (x0, y0, x1, y1) in integer pixels of a height x width image (see IoURandomCrop).

    boxes_px: (n, 4) pixel xyxy. All `max_trials` candidates are drawn and tested at once; the first
    valid one wins, none valid (or option None) -> the whole image.
    """
    whole = (0, 0, width, height)
    min_iou = min_ious[py_random.randrange(len(min_ious))]
    if min_iou is None:
        return whole
    t = max_trials
    w = rng.uniform(min_scale, 1.0, t) * width
    h = rng.uniform(min_scale, 1.0, t) * height
    x0 = np.floor(rng.uniform(0.0, 1.0, t) * (width - w))
    y0 = np.floor(rng.uniform(0.0, 1.0, t) * (height - h))
    # Integer patches so the image crop and the box arithmetic use the same rectangle.
    x1 = np.minimum(x0 + np.maximum(np.round(w), 1), width)
    y1 = np.minimum(y0 + np.maximum(np.round(h), 1), height)
    aspect = (y1 - y0) / (x1 - x0)
    ok = (aspect >= 1.0 / max_aspect) & (aspect <= max_aspect)
    if len(boxes_px):
        iou = _iou(np.stack([x0, y0, x1, y1], axis=1), boxes_px)  # (T, n)
        cx = 0.5 * (boxes_px[:, 0] + boxes_px[:, 2])
        cy = 0.5 * (boxes_px[:, 1] + boxes_px[:, 3])
        centre_in = (
            (cx[None] > x0[:, None]) & (cx[None] < x1[:, None])
            & (cy[None] > y0[:, None]) & (cy[None] < y1[:, None])
        )  # fmt: skip
        ok &= (iou.max(axis=1) >= min_iou) & centre_in.any(axis=1)
    hits = np.flatnonzero(ok)
    if len(hits) == 0:
        return whole
    k = hits[0]
    return int(x0[k]), int(y0[k]), int(x1[k]), int(y1[k])


def crop_boxes(bboxes: np.ndarray, crop: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Boxes of a height x width image after cropping to `crop`: those whose centre lies strictly inside
    are kept (with their extra columns) and clipped to the patch; fractional w.r.t. the patch."""
    x0, y0, x1, y1 = crop
    if (x0, y0, x1, y1) == (0, 0, width, height) or len(bboxes) == 0:
        return bboxes
    px = bboxes[:, :4] * np.array([width, height, width, height], dtype=np.float64)
    cx = 0.5 * (px[:, 0] + px[:, 2])
    cy = 0.5 * (px[:, 1] + px[:, 3])
    keep = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
    out = np.array(bboxes[keep], dtype=np.float64, copy=True)
    px = px[keep] - np.array([x0, y0, x0, y0], dtype=np.float64)
    pw, ph = x1 - x0, y1 - y0
    np.clip(px[:, 0::2], 0, pw, out=px[:, 0::2])
    np.clip(px[:, 1::2], 0, ph, out=px[:, 1::2])
    out[:, :4] = px / np.array([pw, ph, pw, ph], dtype=np.float64)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair: a (T, 4), b (n, 4) xyxy -> (T, n)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def _box_columns(data: dict[str, Any]) -> np.ndarray:
    """The (n, 4) fractional xyxy of the boxes in albumentations' data dict (label columns dropped)."""
    boxes = np.asarray(data.get("bboxes", ()), dtype=np.float64)
    return boxes[:, :4] if boxes.size else np.zeros((0, 4))


def _check_crop_args(min_ious, min_scale, max_aspect, max_trials) -> None:
    if not min_ious:
        raise ValueError("crop min_ious must not be empty")
    for m in min_ious:
        if m is not None and not 0.0 <= m <= 1.0:
            raise ValueError(f"crop min_ious must be None or in [0, 1], got {m!r}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"crop min_scale must be in (0, 1], got {min_scale!r}")
    if not max_aspect >= 1.0:
        raise ValueError(f"crop max_aspect must be >= 1, got {max_aspect!r}")
    if max_trials < 1:
        raise ValueError(f"crop max_trials must be >= 1, got {max_trials!r}")


def _check_fill(fill: Sequence[int]) -> tuple[int, int, int]:
    if len(fill) != 3:
        raise ValueError(f"fill must be 3 channel values, got {fill!r}")
    return tuple(int(v) for v in fill)  # type: ignore[return-value]


_IMAGE_AND_BOXES = (A.core.type_definitions.Targets.IMAGE, A.core.type_definitions.Targets.BBOXES)


class Expand(A.DualTransform):
    """Zoom out: put the image at a random place on a canvas `ratio` times its size, ratio ~ U[1, max_ratio].

    The canvas is filled with `fill` (the mean colour). Boxes keep their pixels, so in fractional
    coordinates they shrink by 1 / ratio. Targets: image, bboxes.
    """

    _targets = _IMAGE_AND_BOXES

    def __init__(self, max_ratio: float = 4.0, fill: Sequence[int] = MEAN_PIXEL, p: float = 0.5) -> None:
        super().__init__(p=p)
        if not max_ratio >= 1.0:
            raise ValueError(f"Expand max_ratio must be >= 1, got {max_ratio!r}")
        self.max_ratio = float(max_ratio)
        self.fill = _check_fill(fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        top, left, canvas_h, canvas_w = sample_expand(self.py_random, height, width, self.max_ratio)
        return {"top": top, "left": left, "canvas_h": canvas_h, "canvas_w": canvas_w}

    def apply(self, img: np.ndarray, top: int, left: int, canvas_h: int, canvas_w: int, **params: Any) -> np.ndarray:
        height, width = img.shape[:2]
        # copyMakeBorder writes the canvas in one C pass: much cheaper than np.full + a copy.
        return cv2.copyMakeBorder(
            img, top, canvas_h - height - top, left, canvas_w - width - left, cv2.BORDER_CONSTANT, value=self.fill
        )

    def apply_to_bboxes(
        self, bboxes: np.ndarray, top: int, left: int, canvas_h: int, canvas_w: int, **params: Any
    ) -> np.ndarray:
        height, width = params["shape"][:2]
        return expand_boxes(bboxes, height, width, top, left, canvas_h, canvas_w)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio", "fill")


class IoURandomCrop(A.DualTransform):
    """SSD's random crop: pick an option from `min_ious`; None keeps the whole image, a number m asks for a
    patch whose IoU with at least one box is >= m (0.0: any patch).

    A patch has sides U[min_scale, 1] times the image's and aspect ratio (h/w) within
    [1/max_aspect, max_aspect]; up to `max_trials` patches are drawn at once and the first one that meets
    the IoU constraint and contains the centre of at least one box is taken (none: the image is kept).
    Boxes whose centre lies inside the patch are kept and clipped to it; the others are removed (their
    labels go with them). An image without boxes gets an unconstrained patch. Targets: image, bboxes.
    """

    _targets = _IMAGE_AND_BOXES

    def __init__(
        self,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        max_aspect: float = 2.0,
        max_trials: int = 50,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        _check_crop_args(min_ious, min_scale, max_aspect, max_trials)
        self.min_ious = tuple(min_ious)
        self.min_scale = float(min_scale)
        self.max_aspect = float(max_aspect)
        self.max_trials = int(max_trials)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        boxes = _box_columns(data)
        boxes_px = boxes * np.array([width, height, width, height])
        crop = sample_iou_crop(self.random_generator, self.py_random, height, width, boxes_px, self.min_ious,
                               self.min_scale, self.max_aspect, self.max_trials)
        return {"crop": crop}

    def apply(self, img: np.ndarray, crop: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop
        return img[y0:y1, x0:x1]

    def apply_to_bboxes(self, bboxes: np.ndarray, crop: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        return crop_boxes(bboxes, crop, height, width)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_ious", "min_scale", "max_aspect", "max_trials")


class ExpandCropResize(A.DualTransform):
    """`Expand` (with probability `expand_probability`), then `IoURandomCrop`, then a resize to size x size,
    done as one affine warp of the source image.

    Same random draws, same boxes as the three steps in a row; the image differs only by interpolation
    rounding after a zoom-out, and not at all when the window lies inside the image. The zoom-out canvas
    is never built: on a large photograph a 4x canvas is up to 16x its pixels, which made the separate
    steps the slowest part of training. Pixels outside the source image
    get `fill`. `min_ious=(None,)` disables the crop. Targets: image, bboxes.
    """

    _targets = _IMAGE_AND_BOXES

    def __init__(
        self,
        size: int,
        expand_max_ratio: float = 4.0,
        expand_probability: float = 0.5,
        fill: Sequence[int] = MEAN_PIXEL,
        min_ious: Sequence[float | None] = SSD_MIN_IOUS,
        min_scale: float = 0.3,
        max_aspect: float = 2.0,
        max_trials: int = 50,
        interpolation: int = cv2.INTER_LINEAR,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if size < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        if not expand_max_ratio >= 1.0:
            raise ValueError(f"expand_max_ratio must be >= 1 (1 disables zoom-out), got {expand_max_ratio!r}")
        if not 0.0 <= expand_probability <= 1.0:
            raise ValueError(f"expand_probability must be in [0, 1], got {expand_probability!r}")
        _check_crop_args(min_ious, min_scale, max_aspect, max_trials)
        self.size = int(size)
        self.expand_max_ratio = float(expand_max_ratio)
        self.expand_probability = float(expand_probability)
        self.fill = _check_fill(fill)
        self.min_ious = tuple(min_ious)
        self.min_scale = float(min_scale)
        self.max_aspect = float(max_aspect)
        self.max_trials = int(max_trials)
        self.interpolation = interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        expand = (0, 0, height, width)
        # Draw in the order of Expand(p) followed by IoURandomCrop, so both give the same result.
        if self.expand_max_ratio > 1.0 and self.expand_probability > 0.0 and (
            self.expand_probability >= 1.0 or self.py_random.random() < self.expand_probability
        ):
            expand = sample_expand(self.py_random, height, width, self.expand_max_ratio)
        top, left, canvas_h, canvas_w = expand
        boxes = _box_columns(data)
        boxes_px = expand_boxes(boxes, height, width, *expand) * np.array([canvas_w, canvas_h, canvas_w, canvas_h])
        crop = sample_iou_crop(self.random_generator, self.py_random, canvas_h, canvas_w, boxes_px, self.min_ious,
                               self.min_scale, self.max_aspect, self.max_trials)
        return {"expand": expand, "crop": crop}

    def apply(
        self, img: np.ndarray, expand: tuple[int, int, int, int], crop: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        top, left = expand[0], expand[1]
        x0, y0, x1, y1 = crop
        height, width = img.shape[:2]
        if left <= x0 and top <= y0 and x1 - left <= width and y1 - top <= height:
            # The window lies inside the image (always so without a zoom-out): a plain resize samples the
            # same points as the warp below, 4x faster (0.08 against 0.33 ms for 256 -> 224 pixels).
            window = img[y0 - top : y1 - top, x0 - left : x1 - left]
            return cv2.resize(window, (self.size, self.size), interpolation=self.interpolation)
        sx, sy = (x1 - x0) / self.size, (y1 - y0) / self.size
        # Output pixel centre u + 0.5 samples crop coordinate (u + 0.5) * sx (cv2.resize's convention),
        # i.e. source pixel index (u + 0.5) * sx - 0.5 + x0 - left.
        matrix = np.array([[sx, 0.0, 0.5 * sx - 0.5 + x0 - left], [0.0, sy, 0.5 * sy - 0.5 + y0 - top]])
        return cv2.warpAffine(
            img, matrix, (self.size, self.size), flags=self.interpolation | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT, borderValue=self.fill,
        )

    def apply_to_bboxes(
        self, bboxes: np.ndarray, expand: tuple[int, int, int, int], crop: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        height, width = params["shape"][:2]
        top, left, canvas_h, canvas_w = expand
        return crop_boxes(expand_boxes(bboxes, height, width, *expand), crop, canvas_h, canvas_w)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "expand_max_ratio", "expand_probability", "fill", "min_ious", "min_scale", "max_aspect",
                "max_trials", "interpolation")


def _bbox_params() -> A.BboxParams:
    # Fractional xyxy in and out. Every step here keeps boxes inside [0, 1], so albumentations' filter
    # (clip + drop boxes without area) runs once at the end instead of after each step, where it cost
    # more than the image work on small images.
    return A.BboxParams(
        format="albumentations", label_fields=["labels", "difficult"], clip=True, check_each_transform=False
    )


def build_train_transform(
    image_size: int = 224,
    *,
    photometric: bool = True,
    expand_max_ratio: float = 4.0,
    expand_probability: float = 0.5,
    random_crop: bool = True,
    horizontal_flip: bool = True,
    crop_min_ious: Sequence[float | None] = SSD_MIN_IOUS,
    mean: Sequence[float] = IMAGENET_MEAN,
    seed: int | None = None,
) -> A.Compose:
    """The SSD training augmentation as one A.Compose (see the module docstring for inputs/outputs).

    Args:
        image_size: output side S.
        photometric: brightness/contrast/saturation/hue jitter (SSD's photometric distortion).
        expand_max_ratio: largest zoom-out canvas side ratio (1.0 disables zoom-out).
        expand_probability: probability of a zoom-out (0 disables it).
        random_crop: IoU-constrained random crop with options `crop_min_ious`.
        horizontal_flip: flip with probability 0.5.
        mean: the normalization's mean, whose colour fills the zoom-out canvas.
        seed: seed of the pipeline's random stream (None: fresh entropy).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    if not 0.0 <= expand_probability <= 1.0:
        raise ValueError(f"expand_probability must be in [0, 1], got {expand_probability!r}")
    if expand_max_ratio < 1.0:
        raise ValueError(f"expand_max_ratio must be >= 1 (1 disables zoom-out), got {expand_max_ratio!r}")
    steps: list[A.BasicTransform] = [
        ExpandCropResize(
            image_size,
            expand_max_ratio=expand_max_ratio,
            expand_probability=expand_probability,
            fill=tuple(int(round(255 * m)) for m in mean),
            min_ious=tuple(crop_min_ious) if random_crop else (None,),
        )
    ]
    if horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if photometric:
        # After SSD's photometric distortions, as one jitter applied together with p 0.5 (SSD draws each on
        # its own): brightness x[0.875, 1.125] (SSD adds +-32/255, which this matches at white),
        # contrast and saturation x[0.5, 1.5], hue +-18 degrees.
        steps.append(A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5))
    steps.append(ToTensorV2())
    transform = A.Compose(steps, bbox_params=_bbox_params())
    seed_transform(transform, seed)
    return transform


def build_eval_transform(image_size: int = 224) -> A.Compose:
    """Evaluation: resize to S x S; boxes are unchanged in fractional coordinates."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return A.Compose(
        [A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR), ToTensorV2()],
        bbox_params=_bbox_params(),
    )


def normalize_images(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 RGB images ``(..., 3, H, W)`` -> float32 ``(pixel - 255 mean) * (1 / (255 std))`` per channel.

    Runs where the images are (the GPU, in CUDA training) and keeps their memory format. The constants
    are rounded to float32 before the arithmetic and the division is a product with the reciprocal, as
    albumentations' ``Normalize`` computes it, so both give the same floats for every pixel value.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images (0..255), got dtype {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize_images expects (..., 3, H, W) RGB images, got shape {tuple(images.shape)}")
    offset, scale = _normalization_constants(tuple(mean), tuple(std), images.device)
    return images.float().sub_(offset).mul_(scale)


@functools.lru_cache(maxsize=8)
def _normalization_constants(mean: tuple[float, ...], std: tuple[float, ...],
                             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a new tensor per batch would be a host-to-device copy, and a wait, on a GPU.
    channel = torch.tensor([mean, std], dtype=torch.float32, device=device).mul_(255.0)
    return channel[0].view(3, 1, 1), channel[1].reciprocal_().view(3, 1, 1)


def seed_transform(transform: Any, seed: int | None) -> None:
    """Give a Compose one random stream (numpy + python) seeded by `seed`, shared by all its steps.

    albumentations' own `set_random_seed` gives every step its own generator with the *same* seed, which
    correlates their draws; one shared stream does not. No-op for objects that are not a Compose.
    """
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
