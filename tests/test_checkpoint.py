"""Atomic checkpoint writes and RNG state round trips."""

import random

import numpy as np
import pytest
import torch

from data.records import ImageRecord
from utils import checkpoint as checkpoint_module
from utils.checkpoint import (
    CheckpointError,
    atomic_save,
    collect_rng_states,
    image_key,
    load_checkpoint,
    restore_rng_states,
    split_changes,
    split_ids_of,
    trained_images_among,
)


def test_save_load_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, 2]}}
    atomic_save(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_crash_during_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.zeros(2)}, "epoch": 1}, path)

    def crashing_save(obj, handle):
        handle.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last\.pt: disk full; the previous last\.pt"):
        atomic_save({"model": {"w": torch.ones(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.zeros(2))
    assert not list(tmp_path.glob("*.tmp")), "the temporary file must be cleaned up"


def test_broken_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder: give its best.pt or last.pt"):
        load_checkpoint(tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*broken.pt \(\w+\): not a checkpoint written"):
        load_checkpoint(broken)
    config = tmp_path / "run.yaml"  # passed by mistake: torch's message advised turning weights_only off
    config.write_text("train:\n  epochs: 2\n")
    with pytest.raises(CheckpointError, match="not a checkpoint written by train.py") as error:
        load_checkpoint(config)
    assert "weights_only" not in str(error.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(foreign)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "fn": random.Random}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_rng_states_survive_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    atomic_save({"model": {}, "rng": collect_rng_states()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_saved_checkpoints_get_the_mode_of_the_run_s_other_files(tmp_path):
    other = tmp_path / "config.yaml"
    other.write_text("x: 1\n")  # created under the process umask, like every other file of a run
    atomic_save({"model": {}}, tmp_path / "last.pt")
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == other.stat().st_mode & 0o777


def test_a_save_removes_temporary_files_left_by_a_killed_one(tmp_path):
    left = tmp_path / ".last.pt.abc123.tmp"  # what a process killed inside torch.save leaves
    left.write_bytes(b"half a checkpoint")
    other = tmp_path / ".best.pt.def456.tmp"  # another file's save may be in flight: not touched
    other.write_bytes(b"")
    atomic_save({"model": {}}, tmp_path / "last.pt")
    assert not left.exists() and other.exists()


def test_missing_entries_are_named(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}, "config": {}}, path)
    assert load_checkpoint(path, require=("model", "config"))["config"] == {}
    with pytest.raises(CheckpointError, match=r"weights\.pt lacks \['class_names'\]: not one that train\.py wrote$"):
        load_checkpoint(path, require=checkpoint_module.INFERENCE_KEYS)
    with pytest.raises(CheckpointError, match=r"lacks \['class_names', 'optimizer'.*without the state to resume"):
        load_checkpoint(path, require=checkpoint_module.TRAINING_KEYS)


def test_split_changes_name_what_was_added_removed_or_reordered():
    saved = {"train": "a\0b\0c", "test": "x\0y"}  # as split_ids_of stores them
    assert split_changes(saved, {"train": ["a", "b", "c"], "test": ["x", "y"]}) == []
    assert split_changes(saved, {"train": ["c", "b", "a"], "test": ["x", "y"]}) == [
        "the training split lists its 3 images in another order"]
    assert split_changes(saved, {"train": ["a", "d", "e"], "test": ["y"]}) == [
        "the training split has 2 image(s) more (first: d) and 2 fewer (first: b) than the checkpoint lists",
        "the test split has 1 fewer (first: x) than the checkpoint lists"]
    assert split_changes(saved, {"test": ["y"]}, parts=("test",)) == [
        "the test split has 1 fewer (first: x) than the checkpoint lists"]


def test_trained_images_are_told_by_their_files_not_their_ids(tmp_path):
    def record(image_id, name):
        return ImageRecord(image_id, tmp_path / name, 10, 10, np.zeros((0, 4), np.float32),
                           np.zeros(0, np.int64), np.zeros(0, bool))

    train, test = [record("1", "a.jpg"), record("2", "b.jpg")], [record("1", "x.jpg"), record("9", "b.jpg")]
    stored = split_ids_of(train, test)
    assert stored["train"] == "1\x002" and stored["train_images"].dtype == torch.int64
    checkpoint = {"data_ids": stored | {"trained_earlier": torch.tensor([image_key(record("7", "c.jpg"))])}}
    # ids repeat across sources (two COCO files both start at 1): the same id "1" is another file here
    assert trained_images_among(checkpoint, [*test, record("3", "c.jpg")]) == [str(tmp_path / "b.jpg"),
                                                                                str(tmp_path / "c.jpg")]
    assert trained_images_among({"model": {}}, test) == []  # a checkpoint that does not list its splits


def test_an_image_reached_through_a_symlinked_folder_has_the_same_key(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    record = ImageRecord("1", tmp_path / "real" / "a.jpg", 10, 10, np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    linked = ImageRecord("1", tmp_path / "link" / "a.jpg", 10, 10, np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert image_key(record) == image_key(linked)
