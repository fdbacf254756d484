"""Data pipeline benchmark: images/s of one worker through decode + augmentation on real photographs.

Runs in the main process without a DataLoader, i.e. what one DataLoader worker does per sample:
`DetectionDataset.__getitem__` = OpenCV decode + BGR->RGB + albumentations pipeline + tensors.

    python benchmarks/bench_data.py                        # raccoon photographs, all measurements
    python benchmarks/bench_data.py --root tests/fixtures/raccoon --passes 20
    python benchmarks/bench_data.py --shapes-root data/shapes-bench   # also a synthetic shapes trainval set
                                      # (python -m data.synthetic --root data/shapes-bench)

The raccoon photographs are read from ../shared/data/raccoon when present, else from the 8-image copy
in tests/fixtures/raccoon.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import cv2
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.dataset import DetectionDataset, load_image  # noqa: E402
from data.synthetic import SHAPES_CLASSES  # noqa: E402
from data.transforms import build_eval_transform, build_train_transform  # noqa: E402
from data.voc import load_image_folder, load_vocdevkit  # noqa: E402

logger = logging.getLogger(__name__)

SHARED_RACCOON = REPO_ROOT.parent / "shared" / "data" / "raccoon"
FIXTURE_RACCOON = REPO_ROOT / "tests" / "fixtures" / "raccoon"


def rate(dataset: DetectionDataset, passes: int, repeats: int) -> float:
    """Best of `repeats` runs of `passes` sweeps over the dataset, in samples per second."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for i in range(len(dataset)):
                dataset[i]
        best = max(best, passes * len(dataset) / (time.perf_counter() - start))
    return best


def decode_rate(dataset: DetectionDataset, passes: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for record in dataset.records:
                load_image(record.image_path)
        best = max(best, passes * len(dataset) / (time.perf_counter() - start))
    return best


def measure(records, image_size: int, passes: int, repeats: int, seed: int) -> dict[str, float]:
    train = DetectionDataset(records, build_train_transform(image_size, seed=seed))
    cached = DetectionDataset(records, build_train_transform(image_size, seed=seed), cache_images=True)
    cached.preload()
    evaluation = DetectionDataset(records, build_eval_transform(image_size))
    # One warm-up sweep: first calls pay for lazy imports and allocator growth.
    for i in range(min(len(train), 20)):
        train[i]
        evaluation[i]
    return {
        "decode only": decode_rate(train, passes, repeats),
        "decode + training augmentation": rate(train, passes, repeats),
        "training augmentation, cached decoded images": rate(cached, passes, repeats),
        "decode + eval transform": rate(evaluation, passes, repeats),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="raccoon folder (images/, annotations/)")
    parser.add_argument("--image-size", type=int, default=224, help="side of the augmented images")
    parser.add_argument("--passes", type=int, default=2, help="sweeps over the images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentation draws")
    parser.add_argument("--shapes-root", type=Path, default=None,
                        help="also measure the synthetic shapes trainval set under this root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # One worker = one thread: DataLoader workers run with torch/OpenCV threads at 1.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    root = args.root or (SHARED_RACCOON if SHARED_RACCOON.is_dir() else FIXTURE_RACCOON)
    records = load_image_folder(root / "images", root / "annotations", ["raccoon"], cache_dir=None)
    sizes = sorted(r.width * r.height for r in records)
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"opencv {cv2.__version__}, torch {torch.__version__}")
    print(f"raccoon photographs: {len(records)} from {root} (median {sizes[len(sizes) // 2] / 1e3:.0f} kpixel)"
          f", output {args.image_size}x{args.image_size}, best of {args.repeats} x {args.passes} passes")
    for name, value in measure(records, args.image_size, args.passes, args.repeats, args.seed).items():
        print(f"  {name:<46} {value:8.1f} images/s")
    if args.shapes_root is not None:
        shapes = load_vocdevkit(args.shapes_root / "VOCdevkit", [("SHAPES", "trainval")], SHAPES_CLASSES,
                                cache_dir=None)[:500]
        print(f"synthetic shapes: first {len(shapes)} trainval images ({shapes[0].width}x{shapes[0].height})")
        for name, value in measure(shapes, args.image_size, 1, args.repeats, args.seed).items():
            print(f"  {name:<46} {value:8.1f} images/s")


if __name__ == "__main__":
    main()
