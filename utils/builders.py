"""Turn config sections into objects: records of a dataset, the model, the loss, the optimizer.

Each function takes one config section (not the whole config) and calls the constructors directly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import torch
from torch import nn

from data.coco import load_coco
from data.records import ImageRecord
from data.synthetic import SHAPES_CLASSES, generate_shapes_dataset
from data.transforms import build_train_transform
from data.voc import load_image_folder, load_vocdevkit
from model.detector import TinyDetector
from model.loss import MultiBoxLoss, score_activation_for
from utils.checkpoint import CheckpointError
from utils.config import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
    config_from_dict,
)

logger = logging.getLogger(__name__)

SYNTHETIC_FOLDER = "SHAPES"


def _existing_dir(value: str, key: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"config key '{key}': folder not found: {path}")
    return path


def _existing_file(value: str, key: str, hint: str = "") -> Path:
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {path}{hint}")
    return path


def prepare_synthetic(data: DataConfig) -> None:
    """Generate the built-in shapes dataset under `data.root` unless an identical one is already there."""
    if data.format != "synthetic":
        return
    if list(data.classes) != list(SHAPES_CLASSES):
        raise ConfigError(f"config key 'data.classes' must be {SHAPES_CLASSES} for the synthetic dataset")
    synthetic = data.synthetic
    generate_shapes_dataset(
        data.root,
        seed=synthetic.seed,
        n_trainval=synthetic.n_trainval,
        n_test=synthetic.n_test,
        image_size=synthetic.image_size,
    )


def load_split_records(data: DataConfig, split: str) -> list[ImageRecord]:
    """The records of the 'train' or 'test' split described by the data section."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    classes = list(data.classes)
    cache_dir = Path(data.cache_dir)
    if data.format in ("voc", "synthetic"):
        root = Path(data.root) / "VOCdevkit" if data.format == "synthetic" else Path(data.root)
        _existing_dir(str(root), "data.root")
        if data.format == "synthetic":
            sets = [(SYNTHETIC_FOLDER, "trainval" if split == "train" else "test")]
        else:
            sets = [tuple(pair) for pair in (data.train_sets if split == "train" else data.test_sets)]
        return load_vocdevkit(
            root, sets, classes, ignore_unknown=data.ignore_unknown_classes, cache_dir=cache_dir
        )
    if data.format == "folder":
        root = _existing_dir(data.root, "data.root")
        images_dir = _existing_dir(str(root / data.images_dir), "data.images_dir")
        annotations_dir = _existing_dir(str(root / data.annotations_dir), "data.annotations_dir")
        split_key = "data.train_split_file" if split == "train" else "data.test_split_file"
        split_value = data.train_split_file if split == "train" else data.test_split_file
        random_split = ("; set data.train_split_file and data.test_split_file to null for a random split "
                        "(data.test_fraction held out)")
        split_file = _existing_file(str(root / split_value), split_key, random_split) if split_value else None
        return load_image_folder(
            images_dir,
            annotations_dir,
            classes,
            split_file=split_file,
            split=split,
            test_fraction=data.test_fraction,
            seed=data.split_seed,
            ignore_unknown=data.ignore_unknown_classes,
            cache_dir=cache_dir,
        )
    # coco
    prefix = "train" if split == "train" else "test"
    for key in (f"{prefix}_images", f"{prefix}_annotations"):
        if not str(getattr(data, key)).strip():  # "" would be the current folder
            raise ConfigError(f"config key 'data.{key}' must be set with data.format: coco")
    images = _existing_dir(getattr(data, f"{prefix}_images"), f"data.{prefix}_images")
    annotations = _existing_file(getattr(data, f"{prefix}_annotations"), f"data.{prefix}_annotations")
    records, _ = load_coco(images, annotations, classes, ignore_unknown=data.ignore_unknown_classes)
    return records


def build_augmentation(augment: AugmentConfig, image_size: int) -> A.Compose:
    """The training augmentation the `augment` section describes."""
    return build_train_transform(
        image_size=image_size,
        photometric=augment.photometric,
        expand_max_ratio=augment.expand_max_ratio,
        expand_probability=augment.expand_probability,
        random_crop=augment.random_crop,
        horizontal_flip=augment.horizontal_flip,
    )


def build_model(model: ModelConfig, n_object_classes: int, classification: str = "hard_negative") -> TinyDetector:
    weights_path = model.weights_path
    if weights_path is not None:
        _existing_file(weights_path, "model.weights_path")
    return TinyDetector(
        n_object_classes + 1,
        width_mult=model.width_mult,
        batch_norm=model.batch_norm,
        pretrained=model.pretrained,
        weights_path=weights_path,
        image_size=model.image_size,
        scales=tuple(model.scales),
        aspect_ratios=tuple(model.aspect_ratios),
        variances=tuple(model.variances),
        # Focal losses start from "everything is background" (p = 0.01) so the first steps are not
        # swamped by the loss of thousands of easy negatives.
        head_prior_prob=0.01 if classification.startswith("focal") else None,
        score_activation=score_activation_for(classification),
    )


def build_criterion(loss: LossConfig, detector: TinyDetector) -> MultiBoxLoss:
    return MultiBoxLoss(
        detector.priors_cxcywh,
        threshold=loss.threshold,
        neg_pos_ratio=loss.neg_pos_ratio,
        alpha=loss.alpha,
        variances=tuple(detector.variances),
        classification=loss.classification,
        focal_gamma=loss.focal_gamma,
        focal_alpha=loss.focal_alpha,
        ignore_threshold=loss.ignore_threshold,
        matching=loss.matching,
        atss_candidates=loss.atss_candidates,
    )


def build_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; biases and norm parameters get no weight decay (decaying them only hurts)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # torch picks the multi-tensor (foreach) update only for CUDA tensors. On the CPU it gives the same
    # weights as the per-parameter loop, bit for bit, in fewer ops (AdamW step of the demo model: 2.1 against
    # 2.9 ms); the fused kernels are faster still but round differently.
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=train.lr, foreach=True)


def checkpoint_config(checkpoint: dict, path: str | Path) -> Config:
    """The config a checkpoint was trained with, defaults filled in; CheckpointError naming the file when it
    cannot be read."""
    try:
        return config_from_dict(checkpoint["config"])
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path}: its saved config cannot be read: {error}") from None


def settings_the_checkpoint_decides(cfg: Config, saved: Config) -> list[str]:
    """The settings of ``cfg`` that a script rebuilding the model from a checkpoint does not use because the
    checkpoint's config ``saved`` differs: ``model.*`` (the architecture, priors included) and
    ``loss.classification`` (how the logits become scores). As ``"key=value (checkpoint: value)"``."""
    keys = [f"model.{key}" for key in dataclasses.asdict(cfg.model)
            if key not in ("pretrained", "weights_path")]  # the checkpoint holds every weight
    return _differences(cfg, saved, [*keys, "loss.classification"], "checkpoint")


def unlisted_random_split(data: DataConfig, checkpoint: dict) -> str | None:
    """Why the split of a checkpoint whose run did not list its splits from the start (written before
    checkpoints did, or resumed from such a one) may not be the one it trained with, when ``data`` splits at
    random: such splits are drawn per image since; else None."""
    saved = checkpoint.get("data_ids")
    listed = isinstance(saved, dict) and not saved.get("earlier_unknown", False)
    if listed or data.format != "folder" or data.train_split_file is not None:
        return None
    return ("its run did not list its splits from the start (checkpoints before split lists), and a random split "
            "(no split files) is now drawn per image from a hash of its id, so its test images may include images "
            "it trained on; a run started with split files (data.train_split_file, data.test_split_file) avoids "
            "this")


# What an evaluation of a checkpoint takes from its config rather than from the checkpoint, and that changes
# its mAP: detections are filtered, suppressed and voted by the first four, computed in the precision of the
# last.
EVALUATION_SETTINGS = ("eval.min_score", "eval.max_overlap", "eval.top_k", "eval.box_voting_iou", "train.amp")


def settings_unlike_the_run(cfg: Config, saved: Config) -> list[str]:
    """The :data:`EVALUATION_SETTINGS` of ``cfg`` that differ from those a checkpoint's run (config ``saved``)
    evaluated with, as ``"key=value (run: value)"``: the mAP is then not the one the run logged."""
    return _differences(cfg, saved, EVALUATION_SETTINGS, "run")


def _differences(cfg: Config, saved: Config, keys: Sequence[str], whose: str) -> list[str]:
    """``"key=value (whose: value)"`` for each dotted ``key`` whose value in ``cfg`` is not the one in ``saved``."""
    differences = []
    for key in keys:
        section, name = key.split(".")
        value, other = getattr(getattr(cfg, section), name), getattr(getattr(saved, section), name)
        if value != other:
            differences.append(f"{key}={value!r} ({whose}: {other!r})")
    return differences


def detector_from_checkpoint(checkpoint: dict, path: str | Path, class_names: list[str] | None = None) -> TinyDetector:
    """Rebuild the model a checkpoint was trained with and load its weights.

    The architecture comes from the checkpoint's own config, so a checkpoint always loads into the model
    that wrote it; `class_names`, when given, must equal the checkpoint's classes.
    """
    saved_classes = checkpoint.get("class_names")
    if not (isinstance(saved_classes, (list, tuple)) and saved_classes
            and all(isinstance(name, str) for name in saved_classes)):
        raise CheckpointError(f"checkpoint {path}: 'class_names' must be a list of class names, got {saved_classes!r}")
    saved_classes = list(saved_classes)
    if class_names is not None and saved_classes != list(class_names):
        raise CheckpointError(
            f"checkpoint {path} was trained for {len(saved_classes)} classes {saved_classes}, but the config "
            f"lists {len(class_names)}: {list(class_names)}"
        )
    saved = checkpoint_config(checkpoint, path)
    saved_model = saved.model
    saved_model.pretrained = False  # the checkpoint holds every weight
    saved_model.weights_path = None
    detector = build_model(saved_model, len(saved_classes), saved.loss.classification)
    # The weight average is what training evaluated and selected best.pt by, so it is what gets used.
    if checkpoint.get("ema"):
        ema = checkpoint["ema"]
        weights, entry = (ema.get("module") if isinstance(ema, dict) else None), "ema.module"
    else:
        weights, entry = checkpoint.get("model"), "model"
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {path}: '{entry}' is not a state dict (got {type(weights).__name__})")
    try:
        detector.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {path} does not fit the model it describes: {error}") from None
    return detector
