"""Checkpoints: atomic writes, safe loading (`weights_only=True`) and RNG state capture for exact resume."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.atomic_file import atomic_file

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write `obj` with torch.save through :func:`utils.atomic_file.atomic_file`: a crash at any moment
    leaves either the previous file or the new one, never a truncated mix."""
    path = Path(path)
    try:
        with atomic_file(path) as handle:
            torch.save(obj, handle)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write (a full disk) as a RuntimeError of its zip writer; the OSError
        # behind it, when there is one, says why.
        cause = error if isinstance(error, OSError) else (error.__cause__ or error.__context__ or error)
        reason = getattr(cause, "strerror", None) or str(cause).strip() or type(cause).__name__
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}; the previous {path.name}, if any, is kept") \
            from None
    # A process killed in the middle of an earlier save left its temporary file behind.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


# Between the image ids of a split, stored as one string: no file name or split-file line holds it, and one
# string loads far faster than a list of a million.
_ID_SEPARATOR = "\0"


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def image_key(record: Any) -> int:
    """A 63-bit key of a record's image file, the same for the same file whatever the dataset calls the image
    (image ids repeat across sources: two COCO files both number from 1) and through whichever symbolic link
    to its folder it is reached. Folders are resolved once each, not every path: resolving 120k paths cost
    4.5 s per start."""
    path = os.path.abspath(record.image_path)
    real = os.path.join(_real_folder(os.path.dirname(path)), os.path.basename(path))
    digest = hashlib.sha256(real.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def split_ids_of(train_records: list, test_records: list) -> dict[str, Any]:
    """What train.py stores in checkpoints about its data, compactly: the image ids of the training and test
    splits in order (``train``, ``test``: one string each), the keys of the training images (``train_images``,
    :func:`image_key`, an int64 tensor) and of images trained on before a resume that its training split no
    longer holds (``trained_earlier``)."""
    return {
        "train": _ID_SEPARATOR.join(r.image_id for r in train_records),
        "test": _ID_SEPARATOR.join(r.image_id for r in test_records),
        "train_images": torch.tensor([image_key(r) for r in train_records], dtype=torch.int64),
        "trained_earlier": torch.zeros(0, dtype=torch.int64),
    }


def split_id_list(saved: dict[str, Any], part: str) -> list[str]:
    """The ids of one split as :func:`split_ids_of` stores them."""
    value = saved.get(part, "")
    if isinstance(value, str):
        return value.split(_ID_SEPARATOR) if value else []
    return list(value)


def image_keys(saved: dict[str, Any], *parts: str) -> set[int]:
    """The image keys of the ``parts`` (``train_images``, ``trained_earlier``) :func:`split_ids_of` stores."""
    keys: set[int] = set()
    for part in parts:
        value = saved.get(part)
        if isinstance(value, torch.Tensor):
            keys.update(value.tolist())
    return keys


def split_changes(saved: dict[str, Any], current: dict[str, Any], parts: tuple[str, ...] = ("train", "test"),
                  order_matters: bool = True) -> list[str]:
    """How the splits a checkpoint lists (``saved``) differ from ``current`` (stored the same way, or lists of
    ids), a sentence per changed split of ``parts``; empty when they are the same lists (the same sets,
    without ``order_matters``: an evaluation does not depend on the order)."""
    changes = []
    for part in parts:
        name = "training" if part == "train" else part
        before, now = split_id_list(saved, part), split_id_list(current, part)
        if before == now:
            continue
        before_set, now_set = set(before), set(now)
        added = [i for i in now if i not in before_set]
        gone = [i for i in before if i not in now_set]
        if not added and not gone:
            if order_matters:
                changes.append(f"the {name} split lists its {len(now)} images in another order")
            continue
        counts = [f"{len(added)} image(s) more (first: {added[0]})" if added else "",
                  f"{len(gone)} fewer (first: {gone[0]})" if gone else ""]
        changes.append(f"the {name} split has {' and '.join(c for c in counts if c)} than the checkpoint lists")
    return changes


def trained_images_among(checkpoint: dict[str, Any], records: list) -> list[str]:
    """The images of ``records`` (a test split's) that the checkpoint's run trained on, as paths; none for a
    checkpoint that does not list them."""
    saved = checkpoint.get("data_ids")
    if not isinstance(saved, dict):
        return []
    trained = image_keys(saved, "train_images", "trained_earlier")
    return [str(r.image_path) for r in records if image_key(r) in trained]


# What train.py writes; eval.py and detect.py need only the first three.
INFERENCE_KEYS = ("model", "config", "class_names")
TRAINING_KEYS = (*INFERENCE_KEYS, "optimizer", "scheduler", "scaler", "ema", "epoch", "batches_done",
                 "global_step", "best_map", "last_map", "rng")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    require: tuple[str, ...] = ("model",)) -> dict[str, Any]:
    """Load a checkpoint written by `atomic_save` without unpickling code objects.

    Raises CheckpointError naming the file when it cannot be read or lacks one of the `require` entries
    (INFERENCE_KEYS to evaluate or detect with it, TRAINING_KEYS to resume its run).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder: give its best.pt or last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        # torch's message is mostly advice about weights_only, including to turn it off, which would run any
        # code the file holds: say what the file is not instead.
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(error).__name__}): not a checkpoint written by train.py "
            "(best.pt or last.pt), or a broken copy of one; files holding pickled code are refused"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry: not a Tiny-Detector checkpoint")
    missing = [key for key in require if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {missing}: not one that train.py wrote"
            + (", or written without the state to resume a run" if "rng" in missing else "")
        )
    return checkpoint


def collect_rng_states() -> dict[str, Any]:
    """Every RNG the training loop touches, in types `torch.load(weights_only=True)` accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Undo `collect_rng_states`; also takes states loaded with a CUDA map_location (RNG states must be CPU)."""
    torch.set_rng_state(states["torch"].cpu())
    np_state = states["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = states["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
