"""Train the Tiny-Detector.

    python train.py --config configs/demo.yaml
    python train.py --config configs/voc.yaml train.epochs=2 data.root=/data/VOCdevkit
    python train.py --config configs/voc.yaml --resume checkpoints/voc/last.pt
    torchrun --nproc_per_node 4 train.py --config configs/voc.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from data.dataset import DetectionDataset, build_dataloader
from data.errors import DataError
from data.sampler import ResumableSampler, SeededSamples
from data.transforms import build_eval_transform
from model.loss import score_activation_for
from utils.atomic_file import atomic_file
from utils.builders import (
    build_augmentation,
    build_criterion,
    build_model,
    build_optimizer,
    checkpoint_config,
    load_split_records,
    prepare_synthetic,
    unlisted_random_split,
)
from utils.checkpoint import (
    TRAINING_KEYS,
    CheckpointError,
    atomic_save,
    collect_rng_states,
    image_keys,
    load_checkpoint,
    restore_rng_states,
    split_changes,
    split_ids_of,
    trained_images_among,
)
from utils.config import (
    Config,
    ConfigError,
    DataConfig,
    changes_refused_on_resume,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from utils.distributed import (
    all_gather_objects,
    any_rank,
    broadcast_buffers,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from utils.ema import ModelEMA
from utils.engine import (
    NonFiniteLossError,
    StepStats,
    check_compile_toolchain,
    configure_cpu_training,
    describe_error,
    non_finite_entries,
    resolve_amp_dtype,
    resolve_device,
    run_inference,
    steps_lr_lambda,
    train_one_epoch,
)
from utils.errors import USER_ERRORS, user_message
from utils.evaluation import check_countable_boxes, evaluate_detections
from utils.metrics_log import MetricsLogger
from utils.output_dir import prepare_output_dir

logger = logging.getLogger("train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Tiny-Detector (VGG16 base, 441 priors) from a YAML config.",
        epilog="Any config key can be overridden with dotted key=value pairs among the flags, e.g. "
        "'train.epochs=2 data.root=/data/VOCdevkit model.pretrained=false'. "
        "See docs/CONFIG.md for every key.",
    )
    parser.add_argument("--config", help="YAML config file (see configs/); optional with --resume")
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="continue exactly from a last.pt/best.pt written by this script (its saved config is used; "
        "overrides given here still apply)",
    )
    parser.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Intermixed: overrides may come before, between or after the flags ('... train.epochs=2 --no-progress').
    return build_parser().parse_intermixed_args(argv)


class SecondInterrupt(KeyboardInterrupt):
    """A second Ctrl-C while the first one's stop is pending: stop at once."""


def _worker_exit_noticed_later(_signum: int, _frame: Any) -> None:
    """SIGCHLD handler after a stop request: a loader finds its dead workers when it next waits for them."""


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag polled at step boundaries, so the state saved is consistent.

    A SIGTERM sent to every process of the job (`kill -- -PGID`, SLURM's `scancel`, systemd) kills the data
    loader's workers as well. torch's SIGCHLD handler would then raise in the middle of the step, wherever
    the main process is, for instance between two parameters' optimizer updates. Once a stop is requested,
    a handler that does nothing replaces it, and stays after :meth:`restore`: a dead worker is then found
    where the next batch is fetched, between steps (see `train_one_epoch`'s `stop_signalled`), and a loader
    shut down later does not raise for workers that died.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal_name is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now, without saving (see main)
                raise SecondInterrupt
            logger.warning("%s received again: still saving last.pt at the end of this step",
                           signal.Signals(signum).name)
            return
        self.signal_name = signal.Signals(signum).name
        # A Python handler rather than SIG_DFL: a SIGCHLD already pending would otherwise be reported as
        # "ignored due to race condition".
        signal.signal(signal.SIGCHLD, _worker_exit_noticed_later)
        logger.warning("%s received: saving last.pt at the end of this step", self.signal_name)

    def __call__(self) -> bool:
        return self.signal_name is not None


def build_datasets(cfg: Config) -> tuple[DetectionDataset, DetectionDataset]:
    """Training and test datasets; each keeps its records in `.records`."""
    prepare_synthetic(cfg.data)
    train_dataset = DetectionDataset(
        load_split_records(cfg.data, "train"),
        build_augmentation(cfg.augment, cfg.model.image_size),
        use_difficult=cfg.data.train_use_difficult,
        cache_images=cfg.data.cache_images,
    )
    test_dataset = DetectionDataset(
        load_split_records(cfg.data, "test"), build_eval_transform(cfg.model.image_size), use_difficult=True
    )
    return train_dataset, test_dataset


def check_trainable_boxes(records: list, use_difficult: bool) -> None:
    """DataError when the training split has no box to learn from: every prior would train as background."""
    trained = sum(record.n_boxes if use_difficult else int((~record.difficult).sum()) for record in records)
    if trained == 0:
        raise DataError(
            f"the train split has no box to train on ({len(records)} images"
            f"{'' if use_difficult else ', difficult boxes left out'}). Check the data section's train "
            "settings, data.classes, and whether data.ignore_unknown_classes dropped every box (the loader's "
            "log counts them)"
        )


def warn_shared_images(train_records: list, test_records: list) -> None:
    """Warn when the test split holds images of the training split: their mAP measures memory, not detection.

    A warning, not an error: scoring on training images is a legitimate check that a model can fit its data.
    """
    trained = {Path(record.image_path).resolve() for record in train_records}
    shared = sorted(str(record.image_path) for record in test_records if Path(record.image_path).resolve() in trained)
    if shared:
        logger.warning(
            "%d of the %d test images are also training images (first: %s): their mAP is not a test of the "
            "model. Check the split files or data.train_sets / data.test_sets, and look for two annotations of "
            "one image (a copied XML)", len(shared), len(test_records),
            shared[0],
        )


def warn_changed_splits(checkpoint: dict[str, Any], data_ids: dict[str, Any], test_records: list,
                        resume: str | Path, data: DataConfig) -> None:
    """Warn when a resumed run's data are not those it trained and evaluated on so far (files added, removed
    or renamed): the resume is then not exact, and test images it trained on make its mAP a test of memory.
    Adds to `data_ids` the images trained on so far that its training split no longer holds."""
    why = unlisted_random_split(data, checkpoint)
    if why:
        logger.warning("%s: %s", resume, why)
        data_ids["earlier_unknown"] = True  # so that later resumes and eval.py still say so
    saved = checkpoint.get("data_ids")
    if not isinstance(saved, dict):  # written before checkpoints listed their splits
        return
    changes = split_changes(saved, data_ids)
    if changes:
        logger.warning("%s: %s; the resumed run does not continue the same training (nor best.pt's selection) "
                       "exactly", resume, "; ".join(changes))
    trained = trained_images_among(checkpoint, test_records)
    if trained:
        logger.warning("%d of the %d test images were training images of this run before the resume (first: %s): "
                       "their mAP is not a test of the model", len(trained), len(test_records), trained[0])
    # What the run trained on stays listed, so that eval.py can still tell its test images from them.
    earlier = image_keys(saved, "train_images", "trained_earlier") - image_keys(data_ids, "train_images")
    data_ids["trained_earlier"] = torch.tensor(sorted(earlier), dtype=torch.int64)


def config_for_resume(checkpoint_path: str | Path, overrides: list[str],
                      checkpoint: dict[str, Any] | None = None) -> Config:
    """The config of the run a checkpoint continues, with the overrides a resumed run may take.

    Exact resume needs the run's own config. Overrides of where and how long it runs, and of how it is
    evaluated, apply (see `utils.config.RESUMABLE_KEYS`); any other change is refused with the keys and
    both values. The run continues in the checkpoint's folder unless `run.output_dir` or `run.name` is
    overridden, so a copied run folder resumes into the copy. `checkpoint`: the file already loaded.
    """
    if checkpoint is None:
        checkpoint = load_checkpoint(checkpoint_path, require=TRAINING_KEYS)
    saved = checkpoint_config(checkpoint, checkpoint_path)
    cfg = config_from_dict(checkpoint["config"], overrides)
    refused = changes_refused_on_resume(saved, cfg)
    done, partly = checkpoint.get("epoch", 0), checkpoint.get("batches_done", 0) > 0
    if cfg.train.epochs < done or (cfg.train.epochs == done and partly):
        reached = f"{done} epochs and {checkpoint['batches_done']} batches" if partly else f"{done} epochs"
        raise ConfigError(
            f"--resume {checkpoint_path}: config key 'train.epochs' = {cfg.train.epochs}, but the checkpoint has "
            f"trained {reached}; give at least {done + 1 if partly else done}"
        )
    if refused:
        raise ConfigError(
            f"--resume {checkpoint_path}: {'; '.join(refused)}: these settings belong to the run being resumed "
            "and cannot change; start a new run (another run.name) to train with them"
        )
    # Compared as values, not override keys: a section mapping ('run={name: x}') overrides them as well.
    if (cfg.run.output_dir, cfg.run.name) == (saved.run.output_dir, saved.run.name):
        folder = Path(checkpoint_path).resolve().parent
        cfg.run.output_dir, cfg.run.name = str(folder.parent), folder.name
    return cfg


def checkpoint_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: ModelEMA | None,
    cfg: Config,
    *,
    epoch: int,
    batches_done: int,
    global_step: int,
    best_map: float,
    last_map: float | None,
    world_size: int = 1,
    data_ids: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`epoch` is the 0-based epoch in progress and `batches_done` how many of its batches are done, by
    each of the `world_size` processes. `data_ids`: the splits' image ids (`split_ids_of`), which a resume
    and eval.py compare with theirs."""
    detector = model.module if isinstance(model, DistributedDataParallel) else model
    detector = getattr(detector, "_orig_mod", detector)  # torch.compile wrapper
    return {
        "model": detector.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch,
        "batches_done": batches_done,
        "global_step": global_step,
        "best_map": best_map,
        "last_map": last_map,
        "rng": collect_rng_states(),
        "world_size": world_size,
        "config": config_to_dict(cfg),
        "class_names": list(cfg.data.classes),
        "data_ids": data_ids,
    }


def weights_checksum(model: torch.nn.Module) -> str:
    """A hash of the trainable weights (BN running statistics are per-rank until the next broadcast)."""
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def train(cfg: Config, resume: str | None = None, show_progress: bool = True,
          checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a whole training; returns a summary (best mAP, steps, wall time, checkpoint folder).

    `resume` is a checkpoint to continue from; `checkpoint` the same file already loaded (a checkpoint
    with its optimizer state can take seconds to read).
    """
    started = time.perf_counter()
    device = resolve_device(cfg.train.device)
    context = init_distributed(device.type)
    setup_logging(context.is_main)
    if device.type == "cuda" and context.enabled:
        device = torch.device("cuda", context.local_rank)
    amp_dtype = resolve_amp_dtype(cfg.train.amp, device)
    if cfg.train.compile:
        check_compile_toolchain(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    else:
        configure_cpu_training()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # A folder holding a run is only written by that run's own resume: a new run, or a resume sent there by
    # run.name / run.output_dir, would replace its checkpoints and mix its metrics.
    own_folder = resume is not None and run_dir.resolve() == Path(resume).resolve().parent
    if not own_folder and (run_dir / "last.pt").exists():
        raise ConfigError(
            f"{run_dir} already holds a run (last.pt): continue it with --resume {run_dir / 'last.pt'}, or "
            "give this one another run.name (or delete the folder)"
        )
    if own_folder and Path(resume).name != "last.pt" and (run_dir / "last.pt").exists():
        # Resuming best.pt (or a copy) in place would overwrite a last.pt that got further, and cut
        # metrics.jsonl back to the older step: the training since is lost.
        if checkpoint is None:
            checkpoint = load_checkpoint(resume, require=TRAINING_KEYS)  # kept for the state below
        resumed_step = checkpoint["global_step"]
        try:  # mmap: only the step is read, not the weights
            latest = torch.load(run_dir / "last.pt", map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # an unreadable last.pt is no further than anything: the resume may replace it
            latest = {}
        latest_step = latest.get("global_step") if isinstance(latest, dict) else None
        if isinstance(latest_step, int) and latest_step > resumed_step:
            raise ConfigError(
                f"resuming {resume} (step {resumed_step}) in its folder would overwrite {run_dir / 'last.pt'}, "
                f"which is at step {latest_step}: resume last.pt, or continue from {Path(resume).name} in a new "
                "folder with run.name=<another name>"
            )
    if context.is_main:
        prepare_output_dir(run_dir, "config keys 'run.output_dir'/'run.name': the run folder")

    torch.manual_seed(cfg.run.seed)
    # Rank 0 generates synthetic data and builds the annotation cache; the others then read it.
    if context.is_main:
        datasets = build_datasets(cfg)
    broadcast_object(None, context)
    if not context.is_main:
        datasets = build_datasets(cfg)
    train_dataset, test_dataset = datasets
    test_records = test_dataset.records
    check_countable_boxes(test_records, "test split")
    check_trainable_boxes(train_dataset.records, cfg.data.train_use_difficult)
    warn_shared_images(train_dataset.records, test_records)
    data_ids = split_ids_of(train_dataset.records, test_records)
    class_names = list(cfg.data.classes)

    # A resumed run takes every weight from its checkpoint: the ImageNet weights it started from are not
    # read again, so a moved weights file or an offline machine does not stop it.
    model_config = cfg.model if resume is None else dataclasses.replace(cfg.model, pretrained=False, weights_path=None)
    model = build_model(model_config, len(class_names), cfg.loss.classification).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg.loss, model).to(device)
    optimizer = build_optimizer(cfg.train, model)

    sampler = ResumableSampler(
        len(train_dataset),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        seed=cfg.run.seed,
        rank=context.rank,
        world_size=context.world_size,
        drop_last=True,
    )
    steps_per_epoch = sampler.batches_per_epoch()
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config key 'train.batch_size' ({cfg.train.batch_size}) is larger than the training set "
            f"share of one process ({sampler.samples_per_rank} images): no full batch"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        steps_lr_lambda(
            total_steps=steps_per_epoch * cfg.train.epochs,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=cfg.train.warmup_epochs,
            schedule=cfg.train.schedule,
            milestones=cfg.train.milestones,
            gamma=cfg.train.gamma,
            min_lr_ratio=cfg.train.min_lr_ratio,
        ),
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None

    start_epoch, skip_batches, global_step = 0, 0, 0
    best_map, last_map = -1.0, None
    if resume is not None:
        # Loaded to the CPU, where the RNG states belong; load_state_dict moves the weights and optimizer
        # state to the model's device.
        if checkpoint is None:
            checkpoint = load_checkpoint(resume, require=TRAINING_KEYS)
        saved_world_size = checkpoint.get("world_size", 1)
        if saved_world_size != context.world_size:
            # The batch of a step, the steps of an epoch (which the schedule counts in) and each process's
            # share of a partly done epoch all depend on the process count.
            raise CheckpointError(
                f"{resume} was saved by a run of {saved_world_size} processes; resume it with "
                f"{saved_world_size}, not {context.world_size}"
            )
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            # The optimizer restored the rate of the saved schedule. With another train.epochs the schedule is
            # another one: the next step takes its rate from it, as every later step does. Unchanged, this
            # recomputes the same value.
            for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                                 strict=True):
                group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
            # A run saved without fp16 has an empty scaler state; resumed under fp16 it starts a fresh scaler.
            if checkpoint["scaler"]:
                scaler.load_state_dict(checkpoint["scaler"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{resume} does not fit the model and optimizer of this config: {error}") from None
        if ema is not None:
            if checkpoint.get("ema") is None:
                raise CheckpointError(f"{resume} holds no EMA weights but train.ema_decay is set")
            ema.load_state_dict(checkpoint["ema"])
        restore_rng_states(checkpoint["rng"])
        warn_changed_splits(checkpoint, data_ids, test_records, resume, cfg.data)
        start_epoch = checkpoint["epoch"]
        skip_batches = checkpoint["batches_done"]
        global_step = checkpoint["global_step"]
        best_map = checkpoint["best_map"]
        last_map = checkpoint["last_map"]
        logger.info(
            "resumed from %s: epoch %d, %d batches into it, step %d", resume, start_epoch + 1, skip_batches,
            global_step,
        )  # fmt: skip

    if context.is_main:  # written once the resume is known to fit, so a refused one leaves the run's as it was
        save_config(cfg, run_dir / "config.yaml")

    train_model: torch.nn.Module = model
    if context.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    workers = cfg.data.num_workers
    loader = build_dataloader(
        SeededSamples(train_dataset),
        batch_size=cfg.train.batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=cfg.data.persistent_workers,
        sampler=sampler,
        drop_last=True,
    )

    metrics = MetricsLogger(
        run_dir, enabled=context.is_main, resumed_at=(start_epoch, global_step) if resume is not None else None
    )
    stop = StopRequest()
    stop.install()

    def stop_requested() -> bool:
        # Collective: ranks must leave the loop at the same step, or one would wait forever in the next
        # gradient all-reduce for a peer that has stopped.
        return any_rank(stop(), context)

    def stop_signalled() -> bool:
        # One process only: under DDP the other ranks may be inside a step's collectives, which a save after a
        # failed batch or evaluation on this rank would not match.
        return context.world_size == 1 and stop()

    def log_stopped() -> None:
        logger.warning("stopped by %s; resume with --resume %s", stop.signal_name or "another rank",
                       run_dir / "last.pt")

    state = {"epoch": start_epoch, "batches_done": skip_batches, "global_step": global_step}

    def refuse_non_finite_weights(name: str) -> None:
        # Every rank checks and stops together (a rank left behind would wait in the next collective).
        broken = non_finite_entries(model) + (non_finite_entries(ema.module) if ema is not None else [])
        if any_rank(bool(broken), context):
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {state['global_step']} "
                f"({', '.join(broken[:5]) or 'on another rank'}{', ...' if len(broken) > 5 else ''}) with a "
                f"finite loss; {name} was not written"
                + (", so it keeps the last good state" if (run_dir / name).exists() else " (there was none yet)")
                + ". Lower train.lr or enable train.grad_clip_norm"
            )

    def save(name: str) -> None:
        refuse_non_finite_weights(name)
        if context.is_main:
            atomic_save(
                checkpoint_state(
                    model, optimizer, scheduler, scaler, ema, cfg,
                    epoch=state["epoch"], batches_done=state["batches_done"], global_step=state["global_step"],
                    best_map=best_map, last_map=last_map, world_size=context.world_size, data_ids=data_ids,
                ),
                run_dir / name,
            )  # fmt: skip

    def on_step(stats: StepStats) -> None:
        state["global_step"] = stats.step
        state["batches_done"] += 1
        if context.is_main and stats.step % cfg.train.log_every_steps == 0:
            metrics.log_train(stats)
        if cfg.train.save_every_steps and stats.step % cfg.train.save_every_steps == 0:
            save("last.pt")

    def evaluate_now() -> float:
        broadcast_buffers(model, context)
        if ema is not None:
            broadcast_buffers(ema.module, context)
        detections = run_inference(
            ema.module if ema is not None else model, test_dataset, test_records, device,
            batch_size=cfg.eval.batch_size, num_workers=min(workers, 2), amp_dtype=amp_dtype,
            channels_last=cfg.train.channels_last, min_score=cfg.eval.min_score,
            max_overlap=cfg.eval.max_overlap, top_k=cfg.eval.top_k, context=context,
            activation=score_activation_for(cfg.loss.classification), box_voting_iou=cfg.eval.box_voting_iou,
            show_progress=show_progress,
        )  # fmt: skip
        if not context.is_main:
            return broadcast_object(None, context)
        result = evaluate_detections(detections, test_records, class_names, coco=False)
        metrics.log_eval(epoch=state["epoch"], step=state["global_step"], result=result)
        logger.info(
            "epoch %d: VOC07 mAP %.4f, VOC12 mAP %.4f", state["epoch"], result.voc.voc07_map, result.voc.voc12_map
        )
        return broadcast_object(result.voc.voc07_map, context)

    def save_after_load_failure(error: BaseException) -> None:
        # A batch that cannot be loaded (an unreadable image, an annotation whose size is wrong, a killed
        # worker) ends the run between two steps: the state is the last step's, so last.pt can keep it and a
        # resume goes on from there once the cause is fixed, without losing the steps since the last save.
        if context.world_size != 1:  # a save's collectives would wait for the other ranks
            return
        try:
            save("last.pt")
        except Exception as save_error:  # the loading error is the one to report
            logger.error("a batch could not be loaded and last.pt could not be saved either: %s",
                         describe_error(save_error))
            return
        logger.error("the batch after step %d could not be loaded (%s); last.pt holds step %d, and --resume %s "
                     "goes on from it once the cause is fixed", state["global_step"], describe_error(error),
                     state["global_step"], run_dir / "last.pt")

    def save_unevaluated_epoch(epoch: int, finished: int, error: Exception) -> None:
        # An evaluation that fails (a test image that cannot be read, memory) would otherwise lose the epoch
        # it evaluates, and every epoch since the last evaluation: the trained weights are saved on the
        # epoch's last step, which a resume evaluates first once the cause is fixed.
        state["epoch"], state["batches_done"] = epoch, steps_per_epoch
        try:
            save("last.pt")
        except Exception as save_error:  # the evaluation's error is the one to report
            logger.error("epoch %d's evaluation failed and last.pt could not be saved either: %s", finished,
                         describe_error(save_error))
            return
        logger.error("epoch %d's evaluation failed (%s); last.pt holds the trained epoch, and --resume %s "
                     "evaluates it first", finished, describe_error(error), run_dir / "last.pt")

    def reached_stop_map() -> bool:
        return cfg.train.stop_at_map is not None and last_map is not None and last_map >= cfg.train.stop_at_map

    interrupted = False
    # A resumed run that had stopped on stop_at_map (its checkpoint taken after that evaluation) is complete.
    if resume is not None and state["batches_done"] == 0 and reached_stop_map():
        logger.info("VOC07 mAP %.4f of %s already reached train.stop_at_map=%s: nothing to train", last_map,
                    resume, cfg.train.stop_at_map)
        start_epoch = cfg.train.epochs  # the loop below runs no epoch
    elif resume is not None and start_epoch >= cfg.train.epochs:
        logger.info("%s finished its %d epochs: nothing to train (give train.epochs above %d to train longer)",
                    resume, start_epoch, start_epoch)
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            state["epoch"] = epoch
            sampler.set_epoch(epoch, skip_batches=state["batches_done"])
            global_step, interrupted = train_one_epoch(
                train_model, criterion, loader, optimizer, scheduler, scaler, device,
                epoch=epoch + 1, global_step=state["global_step"],
                total_batches=steps_per_epoch - state["batches_done"], amp_dtype=amp_dtype,
                channels_last=cfg.train.channels_last, grad_clip_norm=cfg.train.grad_clip_norm, context=context,
                on_step=on_step, should_stop=stop_requested, show_progress=show_progress, ema=ema,
                stop_signalled=stop_signalled, on_load_failure=save_after_load_failure,
            )  # fmt: skip
            if interrupted:
                save("last.pt")
                log_stopped()
                break
            state["epoch"], state["batches_done"] = epoch + 1, 0
            finished = epoch + 1
            periodic = cfg.train.eval_every_epochs > 0 and finished >= cfg.train.eval_first_epoch and (
                finished % cfg.train.eval_every_epochs == 0
            )
            if periodic or finished == cfg.train.epochs:
                # Weights gone NaN would otherwise surface as the evaluation's error, or as a meaningless mAP.
                refuse_non_finite_weights("last.pt")
                try:
                    last_map = evaluate_now()
                except Exception as error:
                    # A SIGTERM to the whole job also kills the evaluation's loader workers. The checkpoint
                    # then ends on the epoch's last step, and the resumed run evaluates the epoch first.
                    if not stop_signalled():
                        if context.world_size == 1:  # a save's collectives would wait for the other ranks
                            save_unevaluated_epoch(epoch, finished, error)
                        raise
                    logger.warning("epoch %d's evaluation failed after the stop request (%s); a resume evaluates it",
                                   finished, describe_error(error))
                    state["epoch"], state["batches_done"] = epoch, steps_per_epoch
                    save("last.pt")
                    interrupted = True
                    log_stopped()
                    break
                if last_map > best_map:
                    best_map = last_map
                    save("best.pt")
            save("last.pt")
            # A run that reached stop_at_map is complete, also when a stop request came during that evaluation
            # or save: a resume would otherwise train on past the stop.
            if reached_stop_map():
                logger.info("VOC07 mAP %.4f reached train.stop_at_map=%s: stopping", last_map, cfg.train.stop_at_map)
                break
            # A stop that arrives during the last epoch's evaluation or save finds the run complete.
            if finished < cfg.train.epochs and stop_requested():
                interrupted = True
                log_stopped()
                break
        # What follows still runs with the stop handlers: a second SIGTERM while the run is closing is
        # reported and otherwise ignored, rather than killing the process before it exits.
        metrics.close()
        elapsed = time.perf_counter() - started
        # Every rank reports a hash of its weights: DDP must keep them bit-identical, and this proves it.
        checksums = all_gather_objects(weights_checksum(model), context)
        summary = {
            "run_dir": str(run_dir.resolve()),  # absolute, as a resumed run's is
            "world_size": context.world_size,
            "rank_weight_checksums": checksums,
            "best_voc07_map": best_map if best_map >= 0 else None,
            "last_voc07_map": last_map,
            "global_step": state["global_step"],
            "epochs_done": state["epoch"],
            "interrupted": interrupted,
            "wall_time_s": round(elapsed, 1),
        }
        if context.is_main:
            try:
                with atomic_file(run_dir / "summary.json", "w", encoding="utf-8") as handle:
                    handle.write(json.dumps(summary, indent=2))
            except OSError as error:
                raise CheckpointError(f"cannot write {run_dir / 'summary.json'}: {error.strerror or error}") from None
            logger.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "rank_weight_checksums"}))
            if len(set(checksums)) != 1:
                logger.error("ranks ended with different weights: %s", checksums)
    finally:
        metrics.close()  # after an error as well (a second call does nothing)
        stop.restore()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(True)
    try:
        checkpoint = None
        if args.resume:
            checkpoint = load_checkpoint(args.resume, require=TRAINING_KEYS)  # read once, for config and state
            cfg = config_for_resume(args.resume, args.overrides, checkpoint)
            if args.config:
                logger.info("resuming: using the config saved in %s, not %s", args.resume, args.config)
        elif args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            raise ConfigError("give --config FILE (or --resume CHECKPOINT)")
        summary = train(cfg, resume=args.resume, show_progress=not args.no_progress, checkpoint=checkpoint)
    except USER_ERRORS as error:
        logger.error("%s", user_message(error))
        return 2
    except SecondInterrupt:
        logger.error("stopped at once by a second Ctrl-C, without saving: a resume continues from the last "
                     "last.pt written before it")
        return 130
    except KeyboardInterrupt:  # before the stop handler is installed (data, model) or after the run
        logger.error("stopped by Ctrl-C while the run was starting or closing, without saving: a resume "
                     "continues from the last last.pt written before it, if any")
        return 130
    finally:
        cleanup_distributed()
    return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
