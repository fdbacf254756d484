"""Evaluation benchmarks: VOC mAP computation time and inference images/s.

Each measurement is one function returning a dict of figures; `main` runs the selected ones.

    python benchmarks/bench_eval.py                # all measurements
    python benchmarks/bench_eval.py --only map     # only the mAP computation time
    python benchmarks/bench_eval.py --only inference
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from utils.voc_eval import ImageDetections, ImageGroundTruth, evaluate_voc  # noqa: E402

logger = logging.getLogger(__name__)


def make_synthetic_eval_data(
    n_images: int = 5000, dets_per_image: int = 200, n_classes: int = 20, seed: int = 0
) -> tuple[list[ImageDetections], list[ImageGroundTruth]]:
    """Deterministic VOC-like data: 1-5 boxes per image (10 % difficult), `dets_per_image` detections each.

    About 30 % of the detections are jittered copies of a box of their image (80 % with its label), the
    rest random boxes with random labels, so every class gets TPs, FPs, duplicates and ignored hits.
    Boxes are 1-based devkit pixel boxes in 500 x 375 images, scores uniform float32 values.
    """
    rng = np.random.default_rng(seed)
    width, height = 500, 375
    n_gt = rng.integers(1, 6, size=n_images)
    g = int(n_gt.sum())
    xy = rng.uniform(1, [width - 60, height - 60], size=(g, 2))
    wh = rng.uniform(20, 200, size=(g, 2))
    gt_boxes = np.round(np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1))
    gt_labels = rng.integers(1, n_classes + 1, size=g)
    gt_difficult = rng.random(g) < 0.1

    d = n_images * dets_per_image
    det_image = np.repeat(np.arange(n_images), dets_per_image)
    starts = np.cumsum(n_gt) - n_gt
    source = starts[det_image] + (rng.random(d) * n_gt[det_image]).astype(np.int64)
    near = rng.random(d) < 0.3
    jittered = gt_boxes[source] + rng.normal(0, 8, size=(d, 4))
    xy = rng.uniform(1, [width - 60, height - 60], size=(d, 2))
    wh = rng.uniform(10, 250, size=(d, 2))
    random_boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1)
    det_boxes = np.where(near[:, None], jittered, random_boxes)
    det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
    det_labels = np.where(near & (rng.random(d) < 0.8), gt_labels[source], rng.integers(1, n_classes + 1, d))
    det_scores = rng.random(d).astype(np.float32).astype(np.float64)

    gt_split = np.cumsum(n_gt)[:-1]
    ground_truth = [
        ImageGroundTruth(f"{i:06d}", b, lab, dif, width, height)
        for i, (b, lab, dif) in enumerate(
            zip(
                np.split(gt_boxes, gt_split),
                np.split(gt_labels, gt_split),
                np.split(gt_difficult, gt_split),
                strict=True,
            )
        )
    ]
    det_split = np.arange(dets_per_image, d, dets_per_image)
    detections = [
        ImageDetections(f"{i:06d}", b, lab, s)
        for i, (b, lab, s) in enumerate(
            zip(
                np.split(det_boxes, det_split),
                np.split(det_labels, det_split),
                np.split(det_scores, det_split),
                strict=True,
            )
        )
    ]
    return detections, ground_truth


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_map(
    n_images: int = 5000,
    dets_per_image: int = 200,
    n_classes: int = 20,
    repeats: int = 3,
    reference_images: int = 250,
) -> dict[str, float]:
    """Time `evaluate_voc` on n_images x dets_per_image detections (best of `repeats`), and compare with
    the devkit loop transcription of tests/test_voc_eval.py on the first `reference_images` images."""
    from tests.test_voc_eval import reference_voc_eval

    class_names = [f"class{c}" for c in range(1, n_classes + 1)]
    detections, ground_truth = make_synthetic_eval_data(n_images, dets_per_image, n_classes)
    full = _best_time(lambda: evaluate_voc(detections, ground_truth, class_names), repeats)
    result = evaluate_voc(detections, ground_truth, class_names)
    sub_det, sub_gt = detections[:reference_images], ground_truth[:reference_images]
    vectorized_sub = _best_time(lambda: evaluate_voc(sub_det, sub_gt, class_names), repeats)
    reference_sub = _best_time(lambda: reference_voc_eval(sub_det, sub_gt, class_names), 1)
    # The loop is linear in detections (a handful of boxes per image and class), so scale it up.
    reference_full = reference_sub * n_images / reference_images
    figures = {
        "n_detections": float(n_images * dets_per_image),
        "evaluate_voc_s": full,
        "voc07_map": result.voc07_map,
        "voc12_map": result.voc12_map,
        "subset_vectorized_s": vectorized_sub,
        "subset_reference_s": reference_sub,
        "reference_full_estimate_s": reference_full,
        "speedup_full": reference_full / full,
    }
    print(
        f"mAP computation, {n_images} images x {dets_per_image} detections, {n_classes} classes: "
        f"evaluate_voc {full:.3f} s (best of {repeats}); VOC07 mAP {result.voc07_map:.4f}, "
        f"VOC10+ mAP {result.voc12_map:.4f}"
    )
    print(
        f"  first {reference_images} images ({reference_images * dets_per_image} detections): vectorized "
        f"{vectorized_sub * 1e3:.1f} ms, devkit-style loop {reference_sub * 1e3:.0f} ms"
    )
    print(
        f"  loop scaled to all {n_images} images: ~{reference_full:.1f} s, "
        f"x{figures['speedup_full']:.0f} slower than evaluate_voc"
    )
    return figures


def bench_inference(
    width_mult: float = 0.125, batch_norm: bool = True, batch_size: int = 16, n_batches: int = 6, n_classes: int = 4
) -> dict[str, float]:
    """Images/s of the demo model's inference: forward pass, then forward + `detect_objects` (min_score
    0.01, NMS 0.45, top_k 200) on a batch of 224x224 inputs, and the full-width VGG16 forward."""
    import torch

    from model.detector import TinyDetector

    def images_per_s(model: TinyDetector, postprocess: bool, batches: int) -> float:
        images = torch.randn(batch_size, 3, model.image_size, model.image_size)
        with torch.inference_mode():
            model(images)  # warm-up: oneDNN picks its kernels on the first call
            start = time.perf_counter()
            for _ in range(batches):
                locs, scores = model(images)
                if postprocess:
                    model.detect_objects(locs, scores, min_score=0.01, max_overlap=0.45, top_k=200)
            return batches * batch_size / (time.perf_counter() - start)

    torch.manual_seed(0)
    small = TinyDetector(n_classes, width_mult=width_mult, batch_norm=batch_norm).eval()
    figures = {
        "forward_images_per_s": images_per_s(small, False, n_batches),
        "forward_postprocess_images_per_s": images_per_s(small, True, n_batches),
        "vgg16_forward_images_per_s": images_per_s(TinyDetector(21).eval(), False, 1),
    }
    print(
        f"inference, batch {batch_size}, {torch.get_num_threads()} threads: width {width_mult} "
        f"(batch_norm {batch_norm}) forward {figures['forward_images_per_s']:.1f} images/s, forward + "
        f"post-processing {figures['forward_postprocess_images_per_s']:.1f} images/s (untrained model: "
        f"nearly every prior above min_score, the slowest case); full-width VGG16 forward "
        f"{figures['vgg16_forward_images_per_s']:.1f} images/s"
    )
    return figures


BENCHMARKS: dict[str, Callable[[], dict[str, float]]] = {"map": bench_map, "inference": bench_inference}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        default=None,
        help="measurements to run (default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return {name: BENCHMARKS[name]() for name in (args.only or BENCHMARKS)}


if __name__ == "__main__":
    main()
