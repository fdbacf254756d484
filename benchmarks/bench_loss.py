"""Time the vectorized loss and post-processing against straightforward per-image loops.

    python benchmarks/bench_loss.py [--batch-size 32] [--max-boxes 20] [--repeats 10] [--threads N]
    python benchmarks/bench_loss.py --device cuda --naive-repeats 1     # on a GPU

1. MultiBoxLoss (matching included) on a batch with 1..max_boxes boxes per image, against the per-image
   reference of tests/test_loss.py.
2. detect_objects on the raw outputs of an untrained TinyDetector (nearly every (prior, class) pair is
   above min_score, the worst case), against the naive per-class NMS loop of tests/test_postprocess.py.

Both sides run in the same process on the same inputs; the figures are medians of several runs. The
process gets train.py's CPU settings first (subnormals flushed, freed memory kept in the process), so the
loss is timed as it runs in training. On CUDA each timed call ends with a synchronize, so a figure is the
call's whole time on the device, not only its launches.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.detector import TinyDetector  # noqa: E402
from model.loss import MultiBoxLoss  # noqa: E402
from model.priors import create_prior_boxes  # noqa: E402
from tests.test_loss import random_batch, reference_multibox_loss  # noqa: E402
from tests.test_postprocess import naive_detect_objects  # noqa: E402
from utils.engine import configure_cpu_training  # noqa: E402

logger = logging.getLogger(__name__)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` followed by a wait for the device's queue, so timers see the kernels as well as the launches."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return run


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    if warmup:
        fn()  # first calls pay for allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fast: Callable[[], object], slow: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of each function, run alternately so both see the same load from other jobs."""
    fast()
    slow()
    fast_times, slow_times = [], []
    for _ in range(repeats):
        for fn, times in ((fast, fast_times), (slow, slow_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(fast_times), statistics.median(slow_times)


def bench_loss(args: argparse.Namespace, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    priors = create_prior_boxes()
    locs, scores, boxes, labels = random_batch(args.batch_size, args.max_boxes, args.n_classes, generator,
                                               min_boxes=1, n_priors=priors.shape[0])
    priors, locs, scores = priors.to(device), locs.to(device), scores.to(device)
    boxes, labels = [b.to(device) for b in boxes], [lab.to(device) for lab in labels]
    loss_fn = MultiBoxLoss(priors).to(device)
    n_boxes = sum(len(b) for b in boxes)
    print(f"loss+matching, batch {args.batch_size}, {n_boxes} boxes (1..{args.max_boxes} per image), "
          f"{priors.shape[0]} priors, {args.n_classes} classes, median of {args.repeats}")

    fast, slow = interleaved_medians(
        synchronized(lambda: loss_fn(locs, scores, boxes, labels), device),
        synchronized(lambda: reference_multibox_loss(locs, scores, boxes, labels, priors), device),
        args.repeats,
    )
    print(f"  forward           vectorized {fast * 1e3:8.2f} ms | per-image reference {slow * 1e3:8.2f} ms "
          f"| {slow / fast:5.1f}x (target >= 10x)")

    # Training runs the backward pass too; the reference builds a graph of many small per-image ops.
    # Gradients start from None each time, as after train.py's zero_grad, rather than being added to
    # the previous call's.
    locs.requires_grad_(True)
    scores.requires_grad_(True)

    def backward(loss: torch.Tensor) -> None:
        locs.grad = scores.grad = None
        loss.backward()

    fast, slow = interleaved_medians(
        synchronized(lambda: backward(loss_fn(locs, scores, boxes, labels).total), device),
        synchronized(lambda: backward(reference_multibox_loss(locs, scores, boxes, labels, priors)[0]), device),
        args.repeats,
    )
    print(f"  forward+backward  vectorized {fast * 1e3:8.2f} ms | per-image reference {slow * 1e3:8.2f} ms "
          f"| {slow / fast:5.1f}x (target >= 10x)")


def bench_postprocess(args: argparse.Namespace, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    model = TinyDetector(args.n_classes, width_mult=args.width).eval()
    with torch.no_grad():
        locs, scores = model(torch.randn(args.batch_size, 3, model.image_size, model.image_size))
    model, locs, scores = model.to(device), locs.to(device), scores.to(device)
    above = (scores.softmax(-1)[..., 1:] > args.min_score).float().mean().item()
    print(f"post-processing, batch {args.batch_size}, untrained model (width {args.width}), "
          f"{above:.1%} of the {scores.shape[1] * (scores.shape[2] - 1)} (prior, class) pairs per image "
          f"above min_score {args.min_score}")
    fast = median_seconds(
        synchronized(lambda: model.detect_objects(locs, scores, min_score=args.min_score), device), args.repeats)
    # The naive loop takes seconds per call: fewer runs, no warm-up.
    slow = median_seconds(
        synchronized(lambda: naive_detect_objects(locs, scores, model.priors_cxcywh, min_score=args.min_score),
                     device),
        args.naive_repeats,
        warmup=False,
    )
    print(f"  detect_objects {fast * 1e3:9.2f} ms (median of {args.repeats}) | naive per-class NMS loop "
          f"{slow * 1e3:9.2f} ms (median of {args.naive_repeats}) | {slow / fast:5.1f}x (target >= 20x)")
    # Box voting (eval.box_voting_iou) averages every kept box with its class's candidates around it; here
    # nearly every pair is a candidate, the most voters it can meet.
    plain, voting = interleaved_medians(
        synchronized(lambda: model.detect_objects(locs, scores, min_score=args.min_score), device),
        synchronized(lambda: model.detect_objects(locs, scores, min_score=args.min_score, box_voting_iou=0.5),
                     device),
        args.repeats,
    )
    print(f"  with box voting (IoU 0.5) {voting * 1e3:9.2f} ms | without {plain * 1e3:9.2f} ms "
          f"| {voting / plain:5.2f}x the time")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--max-boxes", type=int, default=20, help="boxes per image drawn from 1..max")
    parser.add_argument("--n-classes", type=int, default=21, help="classes including background")
    parser.add_argument("--width", type=float, default=0.25, help="width multiplier of the untrained model")
    parser.add_argument("--min-score", type=float, default=0.01, help="post-processing's score threshold")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each fast side (medians)")
    parser.add_argument("--naive-repeats", type=int, default=3, help="runs of the naive NMS loop")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random batch and model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this PyTorch build or on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        configure_cpu_training()  # as train.py does
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    bench_loss(args, device)
    bench_postprocess(args, device)


if __name__ == "__main__":
    main()
