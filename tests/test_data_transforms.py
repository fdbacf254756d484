"""Augmentation: SSD training pipeline and evaluation resize (albumentations); batch normalization."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from data.dataset import load_image
from data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_PIXEL,
    Expand,
    ExpandCropResize,
    IoURandomCrop,
    build_eval_transform,
    build_train_transform,
    normalize_images,
    seed_transform,
)
from data.voc import load_image_folder
from tests.data_fixtures import RACCOON


def raccoon_samples():
    records = load_image_folder(RACCOON / "images", RACCOON / "annotations", ["raccoon"], cache_dir=None)
    out = []
    for r in records:
        scale = np.array([r.width, r.height, r.width, r.height], dtype=np.float32)
        out.append((load_image(r.image_path), r.boxes / scale, r.labels, r.difficult))
    return out


def edge_sample():
    # Boxes on every border and a tiny one: the cases where clipping and filtering matter.
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.02, 0.03], [0.98, 0.5, 1, 1], [0.3, 0.3, 0.7, 0.7]], np.float32)
    return image, boxes, np.array([1, 2, 3, 1]), np.array([False, True, False, False])


def test_train_boxes_stay_inside_with_positive_area_over_many_draws():
    transform = build_train_transform(224, seed=0)
    samples = [*raccoon_samples(), edge_sample()]
    n_draws, fewer, shrunk = 0, 0, 0
    for _ in range(40):
        for image, boxes, labels, difficult in samples:
            out = transform(image=image, bboxes=boxes, labels=labels, difficult=difficult)
            img = out["image"]
            assert isinstance(img, torch.Tensor) and img.shape == (3, 224, 224) and img.dtype == torch.uint8
            b = np.asarray(out["bboxes"], dtype=np.float64).reshape(-1, 4)
            assert len(b) == len(out["labels"]) == len(out["difficult"])
            assert (b >= 0).all() and (b <= 1).all()
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            assert set(np.asarray(out["labels"]).tolist()) <= set(labels.tolist())
            n_draws += 1
            fewer += len(b) < len(boxes)
            if len(b) == len(boxes) == 1:
                shrunk += (b[0, 2] - b[0, 0]) < 0.9 * (boxes[0, 2] - boxes[0, 0])
    assert n_draws == 360
    assert fewer > 0 and shrunk > 0  # crops removed boxes, zoom-outs shrank them


def test_flip_mirrors_boxes_and_pixels_exactly():
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.2, 0.35, 0.9], [0.5, 0.0, 1.0, 0.25]], dtype=np.float32)
    labels, difficult = np.array([1, 2]), np.array([False, True])
    plain = build_train_transform(64, photometric=False, expand_probability=0.0, random_crop=False,
                                  horizontal_flip=False)
    reference = plain(image=image, bboxes=boxes, labels=labels, difficult=difficult)
    flip_only = build_train_transform(64, photometric=False, expand_probability=0.0, random_crop=False, seed=3)
    mirrored = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
    seen = set()
    for _ in range(30):
        out = flip_only(image=image, bboxes=boxes, labels=labels, difficult=difficult)
        b = np.asarray(out["bboxes"], dtype=np.float32)
        assert np.asarray(out["labels"]).tolist() == [1, 2]
        if torch.equal(out["image"], reference["image"]):
            np.testing.assert_allclose(b, boxes, rtol=0, atol=1e-7)
            seen.add("plain")
        else:
            assert torch.equal(out["image"], torch.flip(reference["image"], dims=[2]))
            np.testing.assert_allclose(b, mirrored, rtol=0, atol=1e-7)
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_expand_places_the_image_on_a_mean_canvas():
    t = Expand(max_ratio=3.0, p=1.0)
    image = np.full((10, 20, 3), 7, dtype=np.uint8)
    params = {"top": 5, "left": 10, "canvas_h": 30, "canvas_w": 60}
    canvas = t.apply(image, **params)
    assert canvas.shape == (30, 60, 3)
    assert (canvas[5:15, 10:30] == 7).all()
    outside = np.ones((30, 60), bool)
    outside[5:15, 10:30] = False
    assert (canvas[outside] == np.array(MEAN_PIXEL, np.uint8)).all()
    # Box (10, 5, 20, 10) px in the 20x10 image -> (20, 10, 30, 15) px on the 60x30 canvas.
    boxes = np.array([[0.5, 0.5, 1.0, 1.0, 4.0]])  # 5th column: a label travelling with the box
    out = t.apply_to_bboxes(boxes, shape=(10, 20, 3), **params)
    np.testing.assert_allclose(out, [[20 / 60, 10 / 30, 30 / 60, 15 / 30, 4.0]], rtol=0, atol=1e-12)
    assert MEAN_PIXEL == (124, 116, 104)


def test_expand_keeps_box_pixel_size():
    transform = A.Compose([Expand(max_ratio=4.0, p=1.0)], bbox_params=A.BboxParams(
        format="albumentations", label_fields=["labels"]))
    seed_transform(transform, 0)
    image = np.zeros((40, 50, 3), np.uint8)
    for _ in range(20):
        out = transform(image=image, bboxes=np.array([[0.2, 0.25, 0.6, 0.75]]), labels=[1])
        h, w = out["image"].shape[:2]
        assert 40 <= h <= 160 and 50 <= w <= 200
        (x1, y1, x2, y2), = out["bboxes"]
        assert (x2 - x1) * w == pytest.approx(20, abs=1e-6) and (y2 - y1) * h == pytest.approx(20, abs=1e-6)


def test_crop_keeps_boxes_whose_centre_is_inside_and_clips_them():
    t = IoURandomCrop()
    # 100x50 image, crop x 10..60, y 0..50 (50x50)
    boxes_px = np.array([
        [0, 0, 30, 20],    # centre (15, 10): kept, clipped to (0, 0, 20, 20) in the crop
        [70, 10, 90, 40],  # centre (80, 25): outside, removed
        [30, 20, 70, 50],  # centre (50, 35): kept, clipped to (20, 20, 50, 50)
        [55, 0, 65, 10],   # centre (60, 5): on the edge counts as outside
    ], dtype=np.float64)
    boxes = np.concatenate([boxes_px / [100, 50, 100, 50], [[1], [2], [3], [4]]], axis=1)
    out = t.apply_to_bboxes(boxes, crop=(10, 0, 60, 50), shape=(50, 100, 3))
    np.testing.assert_allclose(out, [[0, 0, 0.4, 0.4, 1], [0.4, 0.4, 1.0, 1.0, 3]], rtol=0, atol=1e-12)
    image = np.arange(50 * 100 * 3, dtype=np.uint8).reshape(50, 100, 3)
    assert np.array_equal(t.apply(image, crop=(10, 0, 60, 50)), image[:, 10:60])


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_crop_respects_min_iou_and_patch_shape():
    t = IoURandomCrop(min_ious=(0.7,))
    t.set_random_state(np.random.default_rng(0), __import__("random").Random(0))
    box = np.array([[0.2, 0.1, 0.7, 0.8]])
    box_px = box[0] * [200, 100, 200, 100]
    cropped = 0
    for _ in range(100):
        crop = t.get_params_dependent_on_data({"shape": (100, 200, 3)}, {"bboxes": box})["crop"]
        x0, y0, x1, y1 = crop
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
        if crop == (0, 0, 200, 100):
            continue
        cropped += 1
        assert iou(crop, box_px) >= 0.7
        assert x1 - x0 >= 0.3 * 200 - 1 and y1 - y0 >= 0.3 * 100 - 1
        assert 0.5 <= (y1 - y0) / (x1 - x0) <= 2.0
        cx, cy = (box_px[0] + box_px[2]) / 2, (box_px[1] + box_px[3]) / 2
        assert x0 < cx < x1 and y0 < cy < y1
    assert cropped > 50
    whole = IoURandomCrop(min_ious=(None,))
    assert whole.get_params_dependent_on_data({"shape": (100, 200, 3)}, {"bboxes": box}) == {"crop": (0, 0, 200, 100)}


def compare_with_fused_step(separate_steps, fused_step, seed, draws, check_images):
    """Run both pipelines, seeded alike, `draws` times on raccoon-177 (two boxes): boxes and labels must agree,
    `check_images(separate_image, fused_image)` judges the pixels. Returns how many draws moved the boxes."""
    image, boxes, labels, difficult = raccoon_samples()[5]
    params = A.BboxParams(format="albumentations", label_fields=["labels", "difficult"])
    separate = A.Compose(separate_steps, bbox_params=params)
    fused = A.Compose([fused_step], bbox_params=params)
    seed_transform(separate, seed)
    seed_transform(fused, seed)
    moved = 0
    for _ in range(draws):
        a = separate(image=image, bboxes=boxes, labels=labels, difficult=difficult)
        b = fused(image=image, bboxes=boxes, labels=labels, difficult=difficult)
        np.testing.assert_allclose(np.asarray(b["bboxes"]), np.asarray(a["bboxes"]), rtol=0, atol=1e-9)
        assert np.asarray(a["labels"]).tolist() == np.asarray(b["labels"]).tolist()
        check_images(a["image"], b["image"])
        moved += not np.allclose(np.asarray(b["bboxes"]), boxes)
    return moved


def test_fused_step_equals_expand_crop_resize_in_a_row():
    def same_picture(a, b):
        assert a.shape == b.shape == (96, 96, 3)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.mean() < 1.5  # the same picture; only interpolation rounding at edges differs

    changed = compare_with_fused_step([Expand(max_ratio=4.0, p=0.5), IoURandomCrop(), A.Resize(96, 96)],
                                      ExpandCropResize(96, expand_max_ratio=4.0, expand_probability=0.5),
                                      seed=11, draws=30, check_images=same_picture)
    assert changed > 10


def test_window_inside_the_image_is_resized_exactly_as_crop_then_resize():
    # Without a zoom-out the window lies inside the photograph, and the fused step takes cv2.resize's path:
    # the same pixels as IoURandomCrop then A.Resize, not just the same picture.
    cropped = compare_with_fused_step([IoURandomCrop(), A.Resize(96, 96)], ExpandCropResize(96, expand_max_ratio=1.0),
                                      seed=3, draws=20, check_images=np.testing.assert_array_equal)
    assert cropped > 5


def test_image_without_boxes_passes_through_training():
    transform = build_train_transform(96, seed=1)
    image = np.zeros((50, 70, 3), np.uint8)
    for _ in range(20):
        out = transform(image=image, bboxes=np.zeros((0, 4), np.float32), labels=[], difficult=[])
        assert out["image"].shape == (3, 96, 96) and len(out["bboxes"]) == 0


def test_eval_transform_only_resizes():
    image = np.empty((30, 40, 3), np.uint8)
    image[:] = np.array(MEAN_PIXEL, np.uint8)
    image[:, :20] = 255
    boxes = np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)
    out = build_eval_transform(80)(image=image, bboxes=boxes, labels=[3], difficult=[True])
    np.testing.assert_allclose(np.asarray(out["bboxes"]), boxes, rtol=0, atol=1e-7)
    assert np.asarray(out["labels"]).tolist() == [3] and np.asarray(out["difficult"]).tolist() == [True]
    img = out["image"]
    assert img.shape == (3, 80, 80) and img.dtype == torch.uint8
    assert img[:, 40, 5].tolist() == [255, 255, 255]
    assert img[:, 40, 70].tolist() == list(MEAN_PIXEL)


def test_normalize_images_by_hand():
    # white (255) -> (1 - mean) / std; the mean colour (rounded to whole pixels) -> about 0
    images = torch.stack([torch.full((3, 2, 2), 255, dtype=torch.uint8),
                          torch.tensor(MEAN_PIXEL, dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)])
    out = normalize_images(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    white = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, :, 1, 0].numpy(), white, rtol=1e-6)
    assert out[1].abs().max() < 0.01


def test_normalize_images_gives_albumentations_floats_for_every_pixel_value():
    # The pipelines normalized with A.Normalize before normalization moved to the batch; the same floats
    # keep trained models and recorded results valid. Every value 0..255 in every channel, bit for bit.
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)  # (256, 1, 3)
    expected = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0, p=1.0)(image=ramp)["image"]
    got = normalize_images(torch.from_numpy(ramp).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_normalize_images_keeps_channels_last_and_checks_input():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = normalize_images(images)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalize_images(images.contiguous()))
    assert normalize_images(images[0]).shape == (3, 5, 7)  # one image
    with pytest.raises(TypeError, match="uint8 images.*float32"):
        normalize_images(images.float())
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 7\)"):
        normalize_images(torch.zeros(2, 4, 5, 7, dtype=torch.uint8))


def test_same_seed_same_augmentation():
    image, boxes, labels, difficult = raccoon_samples()[4]
    a, b = build_train_transform(128, seed=7), build_train_transform(128, seed=7)
    c = build_train_transform(128, seed=8)
    outs = []
    for t in (a, b, c):
        outs.append([t(image=image, bboxes=boxes, labels=labels, difficult=difficult) for _ in range(5)])
    for x, y in zip(outs[0], outs[1], strict=True):
        assert torch.equal(x["image"], y["image"])
        np.testing.assert_array_equal(np.asarray(x["bboxes"]), np.asarray(y["bboxes"]))
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(outs[0], outs[2], strict=True))
    seed_transform(a, 7)  # re-seeding restarts the stream
    again = a(image=image, bboxes=boxes, labels=labels, difficult=difficult)
    assert torch.equal(again["image"], outs[0][0]["image"])


def test_strength_switches_and_checks():
    names = [type(t).__name__ for t in build_train_transform(64).transforms]
    assert names == ["ExpandCropResize", "HorizontalFlip", "ColorJitter", "ToTensorV2"]
    off = build_train_transform(64, photometric=False, expand_max_ratio=1.0, random_crop=False,
                                horizontal_flip=False)
    assert [type(t).__name__ for t in off.transforms] == ["ExpandCropResize", "ToTensorV2"]
    assert off.transforms[0].min_ious == (None,)
    geometric = build_train_transform(64, expand_max_ratio=2.5, expand_probability=0.3).transforms[0]
    assert (geometric.expand_max_ratio, geometric.expand_probability, geometric.size) == (2.5, 0.3, 64)
    assert geometric.fill == MEAN_PIXEL
    with pytest.raises(ValueError, match="expand_max_ratio"):
        build_train_transform(64, expand_max_ratio=0.5)
    with pytest.raises(ValueError, match="expand_probability"):
        build_train_transform(64, expand_probability=1.5)
    with pytest.raises(ValueError, match="min_ious"):
        IoURandomCrop(min_ious=(1.5,))
    assert build_eval_transform(64).transforms[0].interpolation == cv2.INTER_LINEAR
