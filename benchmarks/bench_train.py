"""Training throughput: the whole loop against the model alone, measured in one run.

    python benchmarks/bench_train.py                       # demo config on the CPU
    python benchmarks/bench_train.py --steps 30 --config configs/demo.yaml train.batch_size=32
    python benchmarks/bench_train.py --steps 100 --images 2048 model.width_mult=1.0 model.batch_norm=false \
        train.batch_size=32 train.amp=bf16 data.num_workers=8    # on a GPU: the VOC-sized model

"whole loop": what train.py runs per step: DataLoader (decode + training augmentation + collate), forward,
MultiBoxLoss with matching and hard negatives, backward, optimizer and EMA step.
"model only": forward, a trivial loss on the outputs, backward and optimizer step on one batch of
pre-loaded tensors, with the same model, batch size, precision and memory format.
The ratio says how much the loop adds on top of the model. On CUDA the model-only figure is also measured
in fp32 without channels_last, for the AMP + channels_last speed-up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
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
    resolve_amp_dtype,
    resolve_device,
)


def build_loader(cfg, root: Path, n_images: int, batch_size: int, device: torch.device):
    synthetic = cfg.data.synthetic
    generate_shapes_dataset(root, seed=0, n_trainval=n_images, n_test=1, image_size=synthetic.image_size)
    records = load_vocdevkit(root / "VOCdevkit", [("SHAPES", "trainval")], list(cfg.data.classes), cache_dir=None)
    transform = build_augmentation(cfg.augment, cfg.model.image_size)
    dataset = DetectionDataset(records, transform, use_difficult=False, cache_images=cfg.data.cache_images)
    sampler = ResumableSampler(len(dataset), batch_size=batch_size, seed=0, drop_last=True)
    workers = cfg.data.num_workers
    loader = build_dataloader(  # as train.py builds it
        SeededSamples(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda", persistent_workers=True, sampler=sampler,
        drop_last=True,
    )  # fmt: skip
    return loader, sampler


def time_whole_loop(cfg, loader, sampler, device, amp_dtype, channels_last, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, len(cfg.data.classes), cfg.loss.classification).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    criterion = build_criterion(cfg.loss, model).to(device)
    optimizer = build_optimizer(cfg.train, model)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    model.train()
    done, epoch, started = 0, 0, None
    while done < warmup + steps:
        sampler.set_epoch(epoch)
        for images, boxes, labels, _ in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            boxes = [b.to(device) for b in boxes]
            labels = [lab.to(device) for lab in labels]
            with autocast_context(device, amp_dtype):
                locs, scores = model(images)
            loss = criterion(locs.float(), scores.float(), boxes, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            loss.total.item()  # the loop logs the loss every step
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * loader.batch_size / (time.perf_counter() - started)


def time_model_only(cfg, batch_size, device, amp_dtype, channels_last, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg.model, len(cfg.data.classes), cfg.loss.classification).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = build_optimizer(cfg.train, model)
    size = cfg.model.image_size
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast_context(device, amp_dtype):
            locs, scores = model(images)
        loss = locs.float().square().mean() + scores.float().logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--images", type=int, default=256, help="synthetic images generated for the loop")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
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
          f"channels_last {channels_last}, workers {cfg.data.num_workers}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        loader, sampler = build_loader(cfg, Path(tmp), args.images, batch, device)
        model_only = time_model_only(cfg, batch, device, amp_dtype, channels_last, args.steps, args.warmup)
        whole = time_whole_loop(cfg, loader, sampler, device, amp_dtype, channels_last, args.steps, args.warmup)
    print(f"model only (forward + backward + step, pre-loaded batch): {model_only:8.1f} images/s")
    print(f"whole loop (data + forward + loss + backward + step):     {whole:8.1f} images/s")
    print(f"whole loop / model only: {whole / model_only:.3f} (overhead {100 * (1 - whole / model_only):.1f}%)")
    if device.type == "cuda":
        plain = time_model_only(cfg, batch, device, None, False, args.steps, args.warmup)
        print(f"model only, fp32 NCHW:                                    {plain:8.1f} images/s")
        print(f"AMP ({amp_dtype}) + channels_last speed-up over fp32: {model_only / plain:.2f}x")


if __name__ == "__main__":
    main()
