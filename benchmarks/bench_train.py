"""Training throughput: the whole loop against the model alone, measured in one run.

    python benchmarks/bench_train.py                       # demo config on the CPU
    python benchmarks/bench_train.py --rounds 40                 # more rounds, for a noisy machine
    python benchmarks/bench_train.py --steps 30 --config configs/demo.yaml train.batch_size=32
    python benchmarks/bench_train.py --steps 100 --images 2048 model.width_mult=1.0 model.batch_norm=false \
        train.batch_size=32 train.amp=bf16 data.num_workers=8    # on a GPU: the VOC-sized model

"whole loop": what train.py runs per step: DataLoader (decode + training augmentation + collate), forward,
MultiBoxLoss with matching and hard negatives, backward, optimizer and EMA step.
"model only": forward, a trivial loss on the outputs, backward and optimizer step on one batch of
pre-loaded tensors, with the same model, batch size, precision and memory format.
The ratio says how much the loop adds on top of the model. The two are timed in alternating rounds (and
the image cache is filled first, as after train.py's first epoch), and the ratio is the median of the
rounds' ratios, so a machine whose speed drifts during the run does not decide it. On CUDA the model-only
figure is also measured in fp32 without channels_last, for the AMP + channels_last speed-up.

With `--breakdown`, two more runners split the loop's cost between its halves:
"data only": the DataLoader and the copy of its batches to the device, with no model;
"step, pre-loaded batch": forward, MultiBoxLoss, backward, optimizer and EMA step and the logged loss, as
in the whole loop, on one batch from the loader kept on the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.dataset import DetectionDataset, build_dataloader  # noqa: E402
from data.sampler import ResumableSampler, SeededSamples  # noqa: E402
from data.synthetic import generate_shapes_dataset  # noqa: E402
from data.voc import load_vocdevkit  # noqa: E402
from utils.builders import build_augmentation, build_criterion, build_model, build_optimizer  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.ema import ModelEMA  # noqa: E402
from utils.engine import (  # noqa: E402
    autocast_context,
    configure_cpu_training,
    images_to_model,
    move_targets,
    resolve_amp_dtype,
    resolve_device,
)


def build_loader(cfg, root: Path, n_images: int, batch_size: int, device: torch.device):
    synthetic = cfg.data.synthetic
    generate_shapes_dataset(root, seed=0, n_trainval=n_images, n_test=1, image_size=synthetic.image_size)
    records = load_vocdevkit(root / "VOCdevkit", [("SHAPES", "trainval")], list(cfg.data.classes), cache_dir=None)
    transform = build_augmentation(cfg.augment, cfg.model.image_size)
    dataset = DetectionDataset(records, transform, use_difficult=False, cache_images=cfg.data.cache_images)
    if cfg.data.cache_images:
        # train.py decodes each image once, in its first epoch; the rounds measure the epochs after it.
        dataset.preload()
    sampler = ResumableSampler(len(dataset), batch_size=batch_size, seed=0, drop_last=True)
    workers = cfg.data.num_workers
    loader = build_dataloader(  # as train.py builds it
        SeededSamples(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda", persistent_workers=cfg.data.persistent_workers,
        sampler=sampler,
        drop_last=True,
    )  # fmt: skip
    return loader, sampler


def _seeded_model(cfg, device, channels_last) -> tuple[torch.nn.Module, torch.memory_format, torch.optim.Optimizer]:
    """The config's model (same initial weights for every runner) in training mode, and its optimizer."""
    torch.manual_seed(0)
    model = build_model(cfg.model, len(cfg.data.classes), cfg.loss.classification).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    return model, memory_format, build_optimizer(cfg.train, model)


def endless_batches(loader, sampler):
    """The loader's batches across epoch boundaries, each epoch reshuffled as train.py does."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def to_device(batch, device: torch.device, memory_format: torch.memory_format):
    """A loader batch moved as train.py's loop moves it: (images, boxes, labels)."""
    images, boxes, labels, _difficult = batch
    images = images_to_model(images, device, memory_format)
    boxes, labels = move_targets(boxes, labels, device)
    return images, boxes, labels


def loop_step(cfg, device, amp_dtype, channels_last) -> tuple[Callable[..., None], torch.memory_format]:
    """train.py's step on a batch already on the device, and the memory format its images need.

    `step(images, boxes, labels)`: forward, MultiBoxLoss, backward, optimizer and EMA step, the logged loss.
    """
    model, memory_format, optimizer = _seeded_model(cfg, device, channels_last)
    criterion = build_criterion(cfg.loss, model).to(device)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None

    def step(images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> None:
        with autocast_context(device, amp_dtype):
            locs, scores = model(images)
        loss = criterion(locs.float(), scores.float(), boxes, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        loss.total.item()  # the loop logs the loss every step

    return step, memory_format


def whole_loop_runner(cfg, loader, sampler, device, amp_dtype, channels_last) -> Callable[[int], None]:
    """`run(k)` trains k more steps exactly as train.py's loop does, across epoch boundaries."""
    step, memory_format = loop_step(cfg, device, amp_dtype, channels_last)
    stream = endless_batches(loader, sampler)

    def run(steps: int) -> None:
        for _ in range(steps):
            step(*to_device(next(stream), device, memory_format))

    return run


def data_only_runner(loader, sampler, device, channels_last) -> Callable[[int], None]:
    """`run(k)`: k batches from the loader, moved to the device; no model."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    stream = endless_batches(loader, sampler)

    def run(steps: int) -> None:
        for _ in range(steps):
            to_device(next(stream), device, memory_format)

    return run


def preloaded_step_runner(cfg, batch, device, amp_dtype, channels_last) -> Callable[[int], None]:
    """`run(k)`: k of the whole loop's steps on one batch kept on the device."""
    step, memory_format = loop_step(cfg, device, amp_dtype, channels_last)
    on_device = to_device(batch, device, memory_format)

    def run(steps: int) -> None:
        for _ in range(steps):
            step(*on_device)

    return run


def model_only_runner(cfg, batch_size, device, amp_dtype, channels_last) -> Callable[[int], None]:
    """`run(k)`: k steps of forward, a trivial loss, backward and optimizer step on one pre-loaded batch."""
    model, memory_format, optimizer = _seeded_model(cfg, device, channels_last)
    size = cfg.model.image_size
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)

    def run(steps: int) -> None:
        for _ in range(steps):
            with autocast_context(device, amp_dtype):
                locs, scores = model(images)
            loss = locs.float().square().mean() + scores.float().logsumexp(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def images_per_second(run: Callable[[int], None], steps: int, warmup: int, batch_size: int,
                      device: torch.device) -> float:
    run(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def interleaved_rounds(runners: dict[str, Callable[[int], None]], rounds: int, steps: int, warmup: int,
                       batch_size: int, device: torch.device) -> dict[str, list[float]]:
    """images/s of each runner in `rounds` rounds; each round times every runner once, in turn.

    A shared VM's speed drifts over seconds (other tenants, clocks), so timing one runner after the other
    compares two different machines. Interleaving them, and reversing the order every round, puts both
    under the same conditions; the ratio is then taken within each round.
    """
    names = list(runners)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            figures[name].append(images_per_second(runners[name], steps, warmup, batch_size, device))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config of the model and batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    parser.add_argument("--rounds", type=int, default=20, help="measurements of each, interleaved")
    parser.add_argument("--images", type=int, default=256, help="synthetic images generated for the loop")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the data alone and the step on a pre-loaded batch")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.images < cfg.train.batch_size:  # the loader drops the incomplete batch: it would yield none
        parser.error(f"--images {args.images} is less than train.batch_size {cfg.train.batch_size}: no full batch")
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        configure_cpu_training()  # as train.py does
    else:
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark  # as train.py does
    amp_dtype = resolve_amp_dtype(cfg.train.amp, device)
    channels_last = cfg.train.channels_last
    batch = cfg.train.batch_size
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch}, "
          f"width {cfg.model.width_mult}, batch_norm {cfg.model.batch_norm}, amp {amp_dtype}, "
          f"channels_last {channels_last}, workers {cfg.data.num_workers}, "
          f"{args.rounds} rounds of {args.steps} steps")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        loader, sampler = build_loader(cfg, Path(tmp), args.images, batch, device)
        runners = {
            "model only": model_only_runner(cfg, batch, device, amp_dtype, channels_last),
            "whole loop": whole_loop_runner(cfg, loader, sampler, device, amp_dtype, channels_last),
        }
        if device.type == "cuda":
            runners["fp32 NCHW"] = model_only_runner(cfg, batch, device, None, False)
        if args.breakdown:
            # Its own loader, so the whole loop's batches and epochs stay as they would be without it.
            data_loader, data_sampler = build_loader(cfg, Path(tmp) / "data-only", args.images, batch, device)
            runners["data only"] = data_only_runner(data_loader, data_sampler, device, channels_last)
            runners["step, pre-loaded batch"] = preloaded_step_runner(
                cfg, next(iter(data_loader)), device, amp_dtype, channels_last)
        figures = interleaved_rounds(runners, args.rounds, args.steps, args.warmup, batch, device)
    model_only, whole = figures["model only"], figures["whole loop"]
    ratios = [w / m for w, m in zip(whole, model_only, strict=True)]
    ratio = statistics.median(ratios)
    print(f"model only (forward + backward + step, pre-loaded batch): {statistics.median(model_only):8.1f} "
          f"images/s (median; rounds {_figures(model_only)})")
    print(f"whole loop (data + forward + loss + backward + step):     {statistics.median(whole):8.1f} "
          f"images/s (median; rounds {_figures(whole)})")
    print(f"whole loop / model only: {ratio:.3f} (overhead {100 * (1 - ratio):.1f}%; median of the rounds' "
          f"ratios, {min(ratios):.3f}-{max(ratios):.3f})")
    if device.type == "cuda":
        plain = figures["fp32 NCHW"]
        print(f"model only, fp32 NCHW:                                    {statistics.median(plain):8.1f} images/s")
        speedups = [m / p for m, p in zip(model_only, plain, strict=True)]
        print(f"AMP ({amp_dtype}) + channels_last speed-up over fp32: {statistics.median(speedups):.2f}x")
    if args.breakdown:
        for name in ("data only", "step, pre-loaded batch"):
            part = figures[name]
            shares = [w / p for w, p in zip(whole, part, strict=True)]
            print(f"{name + ':':<57}{statistics.median(part):8.1f} images/s (median; rounds {_figures(part)}); "
                  f"whole loop / this: {statistics.median(shares):.3f}")


def _figures(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
