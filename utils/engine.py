"""The training step loop and the inference loop, as plain functions shared by train.py and eval.py."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from data.dataset import ignore_interrupts, stack_images
from data.records import ImageRecord
from data.transforms import normalize_images
from utils.config import ConfigError
from utils.distributed import DistributedContext, all_gather_objects, all_reduce_mean
from utils.ema import ModelEMA
from utils.voc_eval import ImageDetections, ImageGroundTruth

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; training stops and keeps the last good checkpoint."""


def non_finite_entries(module: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or infinity (a diverged step can leave them with a
    finite loss, e.g. BatchNorm's running variance)."""
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def resolve_device(name: str, source: str = "config key 'train.device'") -> torch.device:
    """The torch device for `name` ('auto', 'cpu', 'cuda' or 'cuda:N'); `source` names where the value came from
    (a config key or a command-line flag) in the ConfigError raised for a value this machine cannot use."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"{source} is {name!r}, expected auto, cpu, cuda or cuda:N") from error
    # Other torch device types (meta, mps, xpu, ...) would fail, or silently compute nothing, deep inside the
    # model and the loaders, which are written for these two.
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{source} is {name!r}, expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source} is {name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{source} is {name!r} but this machine has only {torch.cuda.device_count()} CUDA device(s)")
    return device


def keep_freed_memory_in_process() -> bool:
    """Stop glibc from handing freed activation buffers back to the kernel between training steps.

    By default glibc serves blocks above a (dynamic) threshold with mmap and trims the top of the heap on
    free, so each step's multi-megabyte activations are unmapped and then page-faulted back in, zeroed,
    on the next step: about 60,000 page faults a second in a CPU training run here. Raising both
    thresholds keeps that memory in the process (it is reused every step anyway). Returns whether the
    settings took effect (False off glibc, e.g. on macOS or musl).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def configure_cpu_training() -> None:
    """Process-wide CPU settings for training (no effect on results beyond flushing subnormals)."""
    # Tiny gradients and moments of a from-scratch model become subnormal floats, which x86 CPUs
    # process tens of times slower; flushing them to zero changes nothing measurable in accuracy.
    torch.set_flush_denormal(True)
    keep_freed_memory_in_process()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic instructions (AVX-512 BF16 or AMX).

    Without them oneDNN emulates bf16, and autocast runs several times slower than fp32.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.amp`; None means full fp32.

    `auto` is bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native bf16 instructions, fp32 on
    other CPUs.
    """
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    if amp == "fp32":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cpu" and dtype is torch.float16:
        raise ConfigError("config key 'train.amp': fp16 autocast is CUDA-only; use bf16 or fp32 on CPU")
    return dtype


def check_compile_toolchain(device: torch.device) -> None:
    """Refuse `train.compile` on a CPU without a working C++ compiler, before anything is trained.

    torch.compile is lazy: without the check, inductor would fail on the first training step with a long
    traceback (``InvalidCxxCompiler``). On CUDA it generates Triton kernels instead.
    """
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler  # torch's own search (CXX, then g++)
    except ImportError:  # another torch layout: the compile itself will tell
        return
    try:
        get_cpp_compiler()
    except Exception as error:
        raise ConfigError(
            f"config key 'train.compile': torch.compile on CPU needs a working C++ compiler ({error}); "
            "install one (e.g. g++, or set CXX to it) or set train.compile=false"
        ) from None


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    # A null context keeps the step code free of precision branches.
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@dataclass
class StepStats:
    epoch: int
    step: int  # global optimizer step, counted from 1
    loss: float
    localization: float
    confidence: float
    lr: float
    images_per_s: float


def move_targets(
    boxes: list[torch.Tensor], labels: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return (
        [b.to(device, non_blocking=True) for b in boxes],
        [lab.to(device, non_blocking=True) for lab in labels],
    )


def images_to_model(images: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A loader batch's uint8 images as the model takes them: on `device`, normalized, in `memory_format`."""
    return normalize_images(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)


def describe_error(error: BaseException) -> str:
    """``"Type: first line of the message"``, or the type alone for an empty message (torch's EOFError)."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    epoch: int,
    global_step: int,
    total_batches: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    grad_clip_norm: float | None,
    context: DistributedContext,
    on_step: Callable[[StepStats], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    show_progress: bool = True,
    ema: ModelEMA | None = None,
    stop_signalled: Callable[[], bool] | None = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> tuple[int, bool]:
    """Run the optimizer over `loader` once; returns (global_step, stopped_early).

    `on_step` sees every step's statistics (logging, periodic checkpoints); `should_stop` is polled after
    each step so a signal handler can end the epoch at a step boundary with a consistent state.
    `stop_signalled` (one process only) tells whether a stop was requested: fetching the next batch may then
    fail, as a SIGTERM sent to the whole job kills the loader's workers too, and that failure ends the epoch
    after the last step completed instead of the run. `on_load_failure` sees any other failure to load a
    batch before it is raised: the state is then the last completed step's, which a checkpoint can keep.
    """
    model.train()
    progress = tqdm(
        total=total_batches, desc=f"epoch {epoch}", disable=not (context.is_main and show_progress),
        dynamic_ncols=True, leave=False,
    )
    last_time = time.perf_counter()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = None
    while True:
        try:
            if batches is None:  # persistent workers are waited for here, at the start of every epoch
                batches = iter(loader)
            images, boxes, labels, _difficult = next(batches)
        except StopIteration:
            break
        except Exception as error:
            if stop_signalled is None or not stop_signalled():
                if on_load_failure is not None:
                    on_load_failure(error)
                raise
            logger.warning("the next batch could not be loaded after the stop request (%s): stopping after step %d",
                           describe_error(error), global_step)
            progress.close()
            return global_step, True
        images = images_to_model(images, device, memory_format)
        boxes, labels = move_targets(boxes, labels, device)
        with autocast_context(device, amp_dtype):
            locs, scores = model(images)
        # The loss runs in fp32: log-softmax and the hard-negative ranking are sensitive to bf16 rounding.
        loss = criterion(locs.float(), scores.float(), boxes, labels)
        # One row for the step: (non-finite loss, loss, localization, confidence). Under DDP it is averaged over
        # the ranks in one collective, so every rank stops together (the first value is above 0 when any rank's
        # loss is not finite) and the logged loss is the mean of the ranks' losses, the one the averaged
        # gradients descend, not rank 0's share of the batch.
        parts = torch.stack([loss.total, loss.localization, loss.confidence]).detach()
        step_row = all_reduce_mean(torch.cat([(~torch.isfinite(parts[:1])).to(parts.dtype), parts]), context)
        non_finite, total, localization, confidence = step_row.tolist()
        if non_finite:
            where = "" if not math.isfinite(loss.total.item()) else " on another rank"
            raise NonFiniteLossError(
                f"loss became {'non-finite' if where else loss.total.item()}{where} at epoch {epoch}, step "
                f"{global_step + 1} (this rank: localization {loss.localization.item()}, confidence "
                f"{loss.confidence.item()}); lower train.lr, enable train.grad_clip_norm or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; scheduler.step() sets the next one
        scaler.scale(loss.total).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        global_step += 1

        now = time.perf_counter()
        images_per_s = images.shape[0] * context.world_size / max(now - last_time, 1e-9)
        last_time = now
        stats = StepStats(
            epoch=epoch,
            step=global_step,
            loss=total,
            localization=localization,
            confidence=confidence,
            lr=lr,
            images_per_s=images_per_s,
        )
        progress.set_postfix(
            loss=f"{stats.loss:.3f}", loc=f"{stats.localization:.3f}", conf=f"{stats.confidence:.3f}",
            lr=f"{stats.lr:.2e}", img_s=f"{images_per_s:.1f}",
        )  # fmt: skip
        progress.update(1)
        if on_step is not None:
            on_step(stats)
        if should_stop is not None and should_stop():
            progress.close()
            return global_step, True
    progress.close()
    return global_step, False


def to_devkit_boxes(boxes_frac: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fractional xyxy -> VOC devkit 1-based pixel boxes (x1 + 1, y1 + 1, x2, y2) of the continuous box."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    pixels = boxes_frac.astype(np.float64) * scale
    devkit = pixels.copy()
    # A box thinner than one pixel comes out with xmax between xmin - 1 and xmin: still a valid devkit box,
    # written the same way as ground truth of that width, so a perfect detection of it has IoU 1.
    devkit[:, :2] += 1.0
    return devkit


def ground_truth_from_records(records: list[ImageRecord]) -> list[ImageGroundTruth]:
    """Annotations in the devkit's 1-based pixel coordinates, difficult boxes included (the devkit ignores them)."""
    ground_truth = []
    for record in records:
        boxes = record.boxes.astype(np.float64).copy()
        boxes[:, :2] += 1.0
        ground_truth.append(
            ImageGroundTruth(
                image_id=record.image_id,
                boxes=boxes.reshape(-1, 4),
                labels=record.labels.astype(np.int64),
                difficult=record.difficult.astype(bool),
                width=record.width,
                height=record.height,
                areas=record.areas,
            )
        )
    return ground_truth


class _IndexedImages(torch.utils.data.Dataset):
    """Yields (image, dataset index) so detections can be mapped back to their records."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: list[int]) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        index = self.indices[position]
        return self.dataset[index][0], index


def _collate_indexed(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, indices = zip(*batch, strict=True)
    return stack_images(images), torch.tensor(indices)


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    records: list[ImageRecord],
    device: torch.device,
    *,
    batch_size: int,
    num_workers: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    min_score: float,
    max_overlap: float,
    top_k: int,
    context: DistributedContext,
    activation: str = "softmax",
    box_voting_iou: float | None = None,
    show_progress: bool = True,
) -> list[ImageDetections]:
    """Detections for every record (in record order) in devkit pixel coordinates.

    Under distributed training each rank infers a strided shard and the shards are gathered on every rank.
    """
    detector = model.module if hasattr(model, "module") else model
    was_training = detector.training
    detector.eval()
    shard = list(range(context.rank, len(records), context.world_size))
    loader = torch.utils.data.DataLoader(
        _IndexedImages(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_indexed,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_interrupts,
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    shard_results: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    progress = tqdm(loader, desc="inference", disable=not (context.is_main and show_progress), leave=False)
    for images, indices in progress:
        images = images_to_model(images, device, memory_format)
        with autocast_context(device, amp_dtype):
            locs, scores = detector(images)
        per_image = detector.detect_objects(
            locs.float(), scores.float(), min_score=min_score, max_overlap=max_overlap, top_k=top_k,
            activation=activation, box_voting_iou=box_voting_iou,
        )
        for index, found in zip(indices.tolist(), per_image, strict=True):
            shard_results.append(
                (index, found.boxes.cpu().numpy(), found.labels.cpu().numpy(), found.scores.cpu().numpy())
            )
    if was_training:
        detector.train()

    by_index = {}
    for results in all_gather_objects(shard_results, context):
        for index, boxes, labels, scores in results:
            by_index[index] = (boxes, labels, scores)
    detections = []
    for index, record in enumerate(records):
        boxes, labels, scores = by_index[index]
        detections.append(
            ImageDetections(
                image_id=record.image_id,
                boxes=to_devkit_boxes(boxes.reshape(-1, 4), record.width, record.height),
                labels=labels.astype(np.int64),
                scores=scores.astype(np.float64),
            )
        )
    return detections


def steps_lr_lambda(
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    schedule: str,
    milestones: list[int],
    gamma: float,
    min_lr_ratio: float,
) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warm-up, then multistep or cosine decay.

    The cosine reaches ``min_lr_ratio`` at ``total_steps``, one past the last step taken (the usual
    ``T_max = total`` convention); a warm-up of any positive length takes at least one step.
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if warmup_epochs > 0:
        warmup_steps = max(1, warmup_steps)
    milestone_steps = [m * steps_per_epoch for m in milestones]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "multistep":
            return gamma ** sum(step >= m for m in milestone_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * cosine

    return factor
