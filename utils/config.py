"""Typed, validated configuration: YAML file + dotted `key=value` overrides on top of dataclass defaults.

The dataclasses below are the single source of truth for every key, its type and its default; the
configuration reference in docs/CONFIG.md describes the same fields. Only train.py, eval.py and detect.py
see the whole config; modules receive explicit arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from model.priors import boxes_per_cell, grid_size_for
from utils.atomic_file import atomic_file

logger = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class RunConfig:
    name: str = ""  # empty: the config file's stem
    output_dir: str = "checkpoints"
    seed: int = 0


@dataclass
class SyntheticConfig:
    n_trainval: int = 2000
    n_test: int = 500
    image_size: int = 256
    seed: int = 0


@dataclass
class DataConfig:
    # voc: a VOCdevkit tree; folder: images + VOC XML folders (labelImg); coco: instances JSON;
    # synthetic: the built-in shapes dataset, generated under `root` on first use.
    format: str = "voc"
    root: str = "data/VOCdevkit"
    train_sets: list[list[str]] = field(
        default_factory=lambda: [["VOC2007", "trainval"], ["VOC2012", "trainval"]]
    )
    test_sets: list[list[str]] = field(default_factory=lambda: [["VOC2007", "test"]])
    classes: list[str] = field(default_factory=lambda: list(VOC_CLASSES))
    ignore_unknown_classes: bool = False
    train_use_difficult: bool = False
    # format: folder
    images_dir: str = "images"
    annotations_dir: str = "annotations"
    train_split_file: str | None = None
    test_split_file: str | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    # format: coco
    train_images: str = ""
    train_annotations: str = ""
    test_images: str = ""
    test_annotations: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    cache_dir: str = "data/cache"
    cache_images: bool = False
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True


@dataclass
class AugmentConfig:
    photometric: bool = True
    expand_max_ratio: float = 4.0  # 1.0 disables zoom-out
    expand_probability: float = 0.5
    random_crop: bool = True
    horizontal_flip: bool = True


@dataclass
class ModelConfig:
    image_size: int = 224
    width_mult: float = 1.0
    batch_norm: bool = False
    pretrained: bool = True
    weights_path: str | None = None
    scales: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6])
    aspect_ratios: list[float] = field(default_factory=lambda: [1.0, 2.0, 0.5])
    variances: list[float] = field(default_factory=lambda: [0.1, 0.2])


@dataclass
class LossConfig:
    classification: str = "hard_negative"  # hard_negative | focal_sigmoid | focal_softmax
    threshold: float = 0.5
    neg_pos_ratio: int = 3
    alpha: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    ignore_threshold: float | None = None  # near misses left out of the classification loss
    matching: str = "iou"  # iou (SSD: every prior with IoU >= threshold) | atss (adaptive threshold per box)
    atss_candidates: int = 36  # atss: priors nearest each box's centre that it may match


@dataclass
class TrainConfig:
    epochs: int = 230
    batch_size: int = 32  # per process
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine
    milestones: list[int] = field(default_factory=lambda: [150, 190])  # epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip_norm: float | None = None
    ema_decay: float | None = None  # e.g. 0.998: evaluate and save an average of the weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (CUDA: bf16, or fp16 without it; CPU: bf16 with AVX-512 BF16/AMX, else fp32) | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    save_every_steps: int = 0  # 0: only at the end of each epoch
    eval_every_epochs: int = 10  # 0: only after the last epoch
    eval_first_epoch: int = 1  # no periodic evaluation before this epoch
    log_every_steps: int = 10
    stop_at_map: float | None = None  # stop early once VOC07 mAP reaches this


@dataclass
class EvalConfig:
    min_score: float = 0.01
    max_overlap: float = 0.45
    top_k: int = 200
    box_voting_iou: float | None = None
    batch_size: int = 32
    coco_metrics: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("voc", "folder", "coco", "synthetic"),
    "loss.classification": ("hard_negative", "focal_sigmoid", "focal_softmax"),
    "loss.matching": ("iou", "atss"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("multistep", "cosine"),
    "train.amp": ("auto", "fp32", "bf16", "fp16"),
}


_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            # YAML 1.1 reads `1e-3` (no dot) as a string; it is unambiguous as a number here.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {tp!r}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from a (partial) mapping, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"unknown config key '{key}' (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
            if key in CHOICES and kwargs[name] not in CHOICES[key]:
                raise ConfigError(f"config key '{key}' must be one of {CHOICES[key]}, got {value!r}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # absent, or an empty section in the file (which means its defaults)
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted_key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)  # `train={epochs: 2}` changes epochs, not the whole section
    else:
        node[parts[-1]] = value


def _merge(section: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(section.get(key), dict):
            _merge(section[key], value)
        else:
            section[key] = value


def _field_type(dotted_key: str) -> Any:
    """The declared type of a config key, or None when the key names no field."""
    tp: Any = Config
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
    return tp


# YAML 1.1 reads 010 as octal 8, 0x10 as 16, 1_000 as 1000 and 1:30 as 90 (base 60).
_NON_DECIMAL_INT = re.compile(r"[-+]?(0[0-9_]+|0[xXoObB].*|[0-9][0-9_]*(:[0-5]?[0-9])+|[0-9]+_[0-9_]*)")


def _override_value(key: str, value: Any, raw: str) -> Any:
    """An override's value read for its key's type: text for a text key (`run.name=2024` is the name
    "2024", not a number), and an integer only in plain decimal (`train.epochs=010` is refused, not 8)."""
    tp = _field_type(key)
    options = set(typing.get_args(tp)) - {type(None)} if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if options == {str} and isinstance(value, (bool, int, float)):
        return raw.strip()
    if options == {int} and isinstance(value, int) and not isinstance(value, bool) \
            and _NON_DECIMAL_INT.fullmatch(raw.strip()):
        raise ConfigError(f"override '{key}={raw}': write the integer in plain decimal digits")
    return value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `key=value` strings; values are read as YAML scalars/lists (`lr=1e-3`, `x=[1,2]`, `y=null`),
    then for the key's type (see _override_value)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override '{item}': cannot parse value {raw!r}: {error}") from None
        parsed.append((key, _override_value(key, value, raw)))
    return parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping, where YAML keeps the last silently: a
    second `train:` section appended to a file dropped the whole first one."""


def _mapping_with_unique_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_unique_keys)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or only defaults when `path` is None) and apply dotted overrides.

    Raises ConfigError naming the file or key for a missing file, bad YAML, unknown key or wrong type.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    parse_overrides(overrides or [])  # a malformed override is named as it is, not as part of the file
    try:
        cfg = config_from_dict(tree, overrides)
    except ConfigError as error:
        if path is None:
            raise
        # Say where the bad value came from: the file, or an override on the command line.
        try:
            config_from_dict(tree)
        except ConfigError:
            where = str(path)
        else:
            where = f"overrides of {path}"
        raise ConfigError(f"{error} ({where})") from None
    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path is not None else "run"
    return cfg


def _check_model_and_loss(model: ModelConfig, loss: LossConfig) -> None:
    """What the model and loss would refuse (or take silently and train badly with) once the data is
    loaded, checked when the config is read instead."""
    if not math.isfinite(model.width_mult):
        raise ConfigError(f"config key 'model.width_mult' must be a finite number, got {model.width_mult}")
    if (model.pretrained or model.weights_path is not None) and model.width_mult != 1.0:
        given = "model.weights_path" if model.weights_path is not None else "model.pretrained"
        raise ConfigError(
            f"config key '{given}': ImageNet weights only fit model.width_mult=1.0, got width_mult="
            f"{model.width_mult}; set model.pretrained=false (and model.weights_path=null) for a narrower model"
        )
    if len(model.variances) != 2 or not all(math.isfinite(v) and v > 0 for v in model.variances):
        raise ConfigError(f"config key 'model.variances' must hold 2 finite numbers > 0, got {model.variances}")
    for key, values in (("model.scales", model.scales), ("model.aspect_ratios", model.aspect_ratios)):
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise ConfigError(f"config key '{key}' must hold one or more finite numbers > 0, got {values}")
    if max(model.scales) > 1:  # a prior wider than the image is clipped to it: several would coincide
        raise ConfigError(f"config key 'model.scales' must be at most 1 (fractions of the image), got {model.scales}")
    for key, value in (("loss.alpha", loss.alpha), ("loss.focal_gamma", loss.focal_gamma),
                       ("loss.neg_pos_ratio", loss.neg_pos_ratio)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {value}")
    if not 0.0 <= loss.focal_alpha <= 1.0:
        raise ConfigError(f"config key 'loss.focal_alpha' must be in [0, 1], got {loss.focal_alpha}")
    n_priors = grid_size_for(model.image_size) ** 2 * boxes_per_cell(model.scales, model.aspect_ratios)
    if loss.matching == "atss" and loss.atss_candidates > n_priors:
        raise ConfigError(
            f"config key 'loss.atss_candidates' ({loss.atss_candidates}) exceeds the {n_priors} priors of "
            f"model.image_size={model.image_size} with {len(model.scales)} scales x "
            f"{len(model.aspect_ratios)} aspect ratios"
        )


# The data keys each format reads. Another format's key set to other than its default says something the
# run does not do (split files given with format voc, VOC sets with format folder, ...): a warning, not an
# error, so that the checkpoints of such configs still load.
_FORMAT_KEYS = {
    "voc": ("train_sets", "test_sets"),
    "folder": ("images_dir", "annotations_dir", "train_split_file", "test_split_file", "test_fraction", "split_seed"),
    "coco": ("train_images", "train_annotations", "test_images", "test_annotations"),
    "synthetic": ("synthetic",),
}


def _check_format_keys(data: DataConfig) -> None:
    defaults = DataConfig()
    for data_format, keys in _FORMAT_KEYS.items():
        if data_format == data.format:
            continue
        for key in keys:
            if getattr(data, key) != getattr(defaults, key):
                logger.warning("config key 'data.%s' is only read with data.format: %s, and this config's format "
                               "is %s: it is ignored", key, data_format, data.format)


def _check_values(cfg: Config) -> None:
    """Semantic checks that types alone cannot express."""
    positive = {
        "model.image_size": cfg.model.image_size,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.lr": cfg.train.lr,
        "eval.batch_size": cfg.eval.batch_size,
        "model.width_mult": cfg.model.width_mult,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if cfg.model.image_size % 32 != 0:
        raise ConfigError(f"config key 'model.image_size' must be a multiple of 32, got {cfg.model.image_size}")
    if not cfg.data.classes:
        raise ConfigError("config key 'data.classes' must list at least one class")
    if len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError(f"config key 'data.classes' has duplicates: {cfg.data.classes}")
    for key in ("data.train_sets", "data.test_sets"):
        for pair in getattr(cfg.data, key.split(".")[1]):
            if len(pair) != 2:
                raise ConfigError(f"config key '{key}' must hold [folder, split] pairs, got {pair}")
    if not 0.0 < cfg.loss.threshold <= 1.0:
        raise ConfigError(f"config key 'loss.threshold' must be in (0, 1], got {cfg.loss.threshold}")
    ignore = cfg.loss.ignore_threshold
    # 0 would leave out every prior of an image with a box, overlapping it or not: no background trained.
    if ignore is not None and not 0.0 < ignore <= cfg.loss.threshold:
        raise ConfigError(
            f"config key 'loss.ignore_threshold' must be in (0, loss.threshold={cfg.loss.threshold}], got {ignore}"
        )
    if cfg.loss.atss_candidates < 2:
        raise ConfigError(
            f"config key 'loss.atss_candidates' must be at least 2, got {cfg.loss.atss_candidates}"
        )
    voting = cfg.eval.box_voting_iou
    if voting is not None and not 0.0 < voting <= 1.0:
        raise ConfigError(f"config key 'eval.box_voting_iou' must be null or in (0, 1], got {voting}")
    if not 0.0 <= cfg.data.test_fraction < 1.0:
        raise ConfigError(f"config key 'data.test_fraction' must be in [0, 1), got {cfg.data.test_fraction}")
    train, evaluation, model, loss = cfg.train, cfg.eval, cfg.model, cfg.loss
    _check_model_and_loss(model, loss)
    if not math.isfinite(train.lr):
        raise ConfigError(f"config key 'train.lr' must be a finite number, got {train.lr}")
    at_least = {
        "train.log_every_steps": (train.log_every_steps, 1),
        "eval.top_k": (evaluation.top_k, 1),
        "data.num_workers": (cfg.data.num_workers, 0),
        "train.save_every_steps": (train.save_every_steps, 0),
        "train.eval_every_epochs": (train.eval_every_epochs, 0),
        "train.warmup_epochs": (train.warmup_epochs, 0),
        "train.weight_decay": (train.weight_decay, 0),
        "data.synthetic.n_trainval": (cfg.data.synthetic.n_trainval, 1),
        "data.synthetic.n_test": (cfg.data.synthetic.n_test, 1),
    }
    for key, (value, minimum) in at_least.items():
        if not value >= minimum:  # also refuses NaN
            raise ConfigError(f"config key '{key}' must be at least {minimum}, got {value}")
    for key, value in (("train.warmup_epochs", train.warmup_epochs), ("train.weight_decay", train.weight_decay)):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    # A clip norm <= 0 zeroes or reverses every gradient; a gamma <= 0 makes the rate 0 or negative.
    if train.grad_clip_norm is not None and not (math.isfinite(train.grad_clip_norm) and train.grad_clip_norm > 0):
        raise ConfigError(f"config key 'train.grad_clip_norm' must be null or a finite number > 0, "
                          f"got {train.grad_clip_norm}")
    if not (math.isfinite(train.gamma) and train.gamma > 0):
        raise ConfigError(f"config key 'train.gamma' must be a finite number > 0, got {train.gamma}")
    if any(not milestone >= 0 for milestone in train.milestones):
        raise ConfigError(f"config key 'train.milestones' must hold epochs >= 0, got {train.milestones}")
    augment = cfg.augment
    if not (math.isfinite(augment.expand_max_ratio) and augment.expand_max_ratio >= 1):
        raise ConfigError(f"config key 'augment.expand_max_ratio' must be a finite number >= 1 (1 turns zoom-out "
                          f"off), got {augment.expand_max_ratio}")
    if cfg.data.synthetic.image_size < 32:
        raise ConfigError(f"config key 'data.synthetic.image_size' must be at least 32, got {cfg.data.synthetic.image_size}")
    in_range = {  # key: (value, low, high, low included, high included)
        "train.momentum": (train.momentum, 0.0, 1.0, True, False),
        "train.min_lr_ratio": (train.min_lr_ratio, 0.0, 1.0, True, True),
        "eval.min_score": (evaluation.min_score, 0.0, 1.0, True, False),
        "eval.max_overlap": (evaluation.max_overlap, 0.0, 1.0, False, True),
        "augment.expand_probability": (cfg.augment.expand_probability, 0.0, 1.0, True, True),
    }
    if train.stop_at_map is not None:  # a mAP is a fraction: 90 would never be reached
        in_range["train.stop_at_map"] = (train.stop_at_map, 0.0, 1.0, False, True)
    if train.ema_decay is not None:
        in_range["train.ema_decay"] = (train.ema_decay, 0.0, 1.0, False, False)
    for key, (value, low, high, low_in, high_in) in in_range.items():
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            interval = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ConfigError(f"config key '{key}' must be in {interval}, got {value}")
    # numpy's seed sequences, which derive every random stream, take non-negative seeds only, and
    # torch.manual_seed 64-bit ones.
    for key, seed in (("run.seed", cfg.run.seed), ("data.split_seed", cfg.data.split_seed),
                      ("data.synthetic.seed", cfg.data.synthetic.seed)):
        if not 0 <= seed < 2**64:
            raise ConfigError(f"config key '{key}' must be an integer in [0, 2**64 - 1], got {seed}")
    train_split, test_split = cfg.data.train_split_file, cfg.data.test_split_file
    if cfg.data.format == "folder" and (train_split is None) != (test_split is None):
        given, missing = (("data.train_split_file", "data.test_split_file") if test_split is None
                          else ("data.test_split_file", "data.train_split_file"))
        raise ConfigError(
            f"config key '{given}' is set but '{missing}' is not: set both, or neither for a random split of "
            "all the XML files (one split file and a random split of the other could share images)"
        )
    if cfg.data.format in _FORMAT_KEYS:
        _check_format_keys(cfg.data)


# What a resumed run may change: where it writes and reads its files, the hardware and precision it runs
# on, how long it trains, how often it evaluates, saves and logs, and how it evaluates. The rest (model,
# loss, data and classes, augmentation, batch size, seed, optimizer and schedule) is the run the checkpoint
# continues; with another value the weights, optimizer state or position in the epoch would not fit.
RESUMABLE_KEYS = frozenset({
    "run.output_dir", "run.name",
    "data.root", "data.train_images", "data.train_annotations", "data.test_images", "data.test_annotations",
    "data.cache_dir", "data.cache_images", "data.num_workers", "data.pin_memory", "data.persistent_workers",
    "train.epochs", "train.device", "train.amp", "train.channels_last", "train.compile", "train.cudnn_benchmark",
    "train.save_every_steps", "train.eval_every_epochs", "train.eval_first_epoch", "train.log_every_steps",
    "train.stop_at_map",
    "eval.min_score", "eval.max_overlap", "eval.top_k", "eval.box_voting_iou", "eval.batch_size",
    "eval.coco_metrics",
})  # fmt: skip


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes_refused_on_resume(saved: Config, new: Config) -> list[str]:
    """``"key: saved -> new"`` for every setting outside RESUMABLE_KEYS that differs between the configs."""
    before, after = _flat(config_to_dict(saved)), _flat(config_to_dict(new))
    return [f"{key}: {before[key]!r} -> {after[key]!r}" for key in before
            if key not in RESUMABLE_KEYS and before[key] != after[key]]


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(tree: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a Config from a mapping (a parsed file or one saved in a checkpoint) plus dotted overrides."""
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    _check_values(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the config as YAML, through a temporary file renamed over `path`: never half a file."""
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
