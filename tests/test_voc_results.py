"""VOC results files (write, read, errors, round trip through evaluate_voc) and the PR-curve plot."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from utils.pr_curves import plot_pr_curves
from utils.voc_eval import ImageDetections, ImageGroundTruth, evaluate_voc
from utils.voc_results import ResultsFormatError, read_voc_results, results_file_name, write_voc_results

NAMES = ["cat", "dog", "bird"]


def det(image_id, boxes, labels, scores):
    return ImageDetections(
        image_id,
        np.asarray(boxes, float).reshape(-1, 4),
        np.asarray(labels, np.int64),
        np.asarray(scores, float),
    )


def random_data(seed, n_images=40, n_classes=3):
    """Fractional pixel boxes (as decoded network output) and float32 scores, many close in value."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_images):
        n = int(rng.integers(1, 4))
        xy = rng.integers(1, 150, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(5, 80, size=(n, 2))], axis=1).astype(float)
        labels = rng.integers(1, n_classes + 1, n)
        gts.append(ImageGroundTruth(f"{i:06d}", boxes, labels, rng.random(n) < 0.2, 300, 300))
        k = int(rng.integers(0, 12))
        src = rng.integers(0, n, k)
        det_boxes = boxes[src] + rng.normal(0, 6, size=(k, 4))
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
        # float32 scores squeezed into a narrow band: rounding to 6 decimals would create ties.
        scores = (0.5 + rng.random(k) * 1e-5).astype(np.float32).astype(np.float64)
        labels_d = np.where(rng.random(k) < 0.8, labels[src], rng.integers(1, n_classes + 1, k))
        dets.append(ImageDetections(f"{i:06d}", det_boxes, labels_d, scores))
    return dets, gts


def test_writes_one_file_per_class_with_devkit_lines(tmp_path):
    paths = write_voc_results(
        tmp_path, [det("000005", [[1, 2, 10.5, 20.25], [3, 3, 4, 4]], [1, 1], [0.9, 0.125])], ["cat", "dog"]
    )
    assert [p.name for p in paths] == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]
    assert (tmp_path / "comp4_det_test_cat.txt").read_text() == (
        "000005 0.9 1.0 2.0 10.5 20.25\n000005 0.125 3.0 3.0 4.0 4.0\n"
    )
    assert (tmp_path / "comp4_det_test_dog.txt").read_text() == ""
    assert sorted(os.listdir(tmp_path)) == ["comp4_det_test_cat.txt", "comp4_det_test_dog.txt"]


def test_numbers_round_trip_bit_exactly(tmp_path):
    dets, gts = random_data(0)
    write_voc_results(tmp_path, dets, NAMES)
    back = read_voc_results(tmp_path, NAMES, [g.image_id for g in gts])
    assert [d.image_id for d in back] == [g.image_id for g in gts]
    for original, read in zip(dets, back, strict=True):
        # Read-back order is class order, then file order: sort the original the same (stable) way.
        order = np.argsort(original.labels, kind="stable")
        assert read.labels.tolist() == original.labels[order].tolist()
        assert read.scores.tolist() == original.scores[order].tolist()
        assert read.boxes.tolist() == original.boxes[order].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluating_read_back_results_equals_in_memory(tmp_path, seed):
    dets, gts = random_data(seed)
    in_memory = evaluate_voc(dets, gts, NAMES)
    write_voc_results(tmp_path, dets, NAMES)
    from_files = evaluate_voc(read_voc_results(tmp_path, NAMES, [g.image_id for g in gts]), gts, NAMES)
    assert from_files.to_dict() == in_memory.to_dict()
    for name in NAMES:
        assert from_files.precision[name].tolist() == in_memory.precision[name].tolist()
        assert from_files.recall[name].tolist() == in_memory.recall[name].tolist()
    assert in_memory.voc12_map > 0.1  # the case has real matches, not only zeros


def test_read_returns_every_known_image_in_given_order(tmp_path):
    write_voc_results(tmp_path, [det("b", [[1, 1, 5, 5], [2, 2, 6, 6]], [2, 1], [0.3, 0.4])], NAMES)
    back = read_voc_results(tmp_path, NAMES, ["c", "b", "a"])
    assert [d.image_id for d in back] == ["c", "b", "a"]
    assert back[0].boxes.shape == (0, 4) and back[2].scores.shape == (0,)
    # Inside an image: class order (cat file first), then file order.
    assert back[1].labels.tolist() == [1, 2]
    assert back[1].scores.tolist() == [0.4, 0.3]
    assert back[1].boxes.tolist() == [[2.0, 2.0, 6.0, 6.0], [1.0, 1.0, 5.0, 5.0]]


def test_read_skips_blank_lines(tmp_path):
    write_voc_results(tmp_path, [], NAMES)
    (tmp_path / "comp4_det_test_dog.txt").write_text("\na 0.5 1 1 5 5\n   \n")
    back = read_voc_results(tmp_path, NAMES, ["a"])
    assert back[0].labels.tolist() == [2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a 0.5 1 1 5 5\na 0.5 1 1 5\n", r"comp4_det_test_dog.txt:2: expected 6 fields .* got 5"),
        ("a 0.5 1 1 5 5 7\n", r"comp4_det_test_dog.txt:1: expected 6 fields .* got 7"),
        ("\n\na 0.5 1 x1 5 5\n", r"comp4_det_test_dog.txt:3: ymin 'x1' is not a number"),
        ("a high 1 1 5 5\n", r"comp4_det_test_dog.txt:1: score 'high' is not a number"),
        ("a 0.5 1 1 5 5\na nan 1 1 5 5\n", r"comp4_det_test_dog.txt:2: NaN or infinite"),
        ("a 0.5 10 1 5 5\n", r"comp4_det_test_dog.txt:1: box .* xmax < xmin - 1"),
        ("a 0.5 1 1 5 5\n\nzz 0.5 1 1 5 5\n", r"comp4_det_test_dog.txt:3: unknown image id 'zz'"),
        ("a 0.5 1 1 5 5\nabcdef 0.5 1 1 5 5\n", r"comp4_det_test_dog.txt:2: unknown image id 'abcdef'"),
        # line numbers count newlines only, as numpy's reader does (str.splitlines also splits at \x0c)
        ("a 0.5 1 1 5 5\x0c\nb 0.5 1 1 5 5\nzz 0.5 1 1 5 5\n", r"comp4_det_test_dog.txt:3: unknown image id 'zz'"),
        # Python's float() takes 1_0, numpy's reader does not: the line is still found
        ("a 0.5 1 1 5 5\na 1_0 1 1 5 5\n", r"comp4_det_test_dog.txt:2: score '1_0' is not a number"),
    ],
)
def test_read_rejects_malformed_lines_naming_file_and_line(tmp_path, content, message):
    write_voc_results(tmp_path, [], NAMES)
    (tmp_path / "comp4_det_test_dog.txt").write_text(content)
    with pytest.raises(ResultsFormatError, match=message):
        read_voc_results(tmp_path, NAMES, ["a", "b"])


def test_read_accepts_empty_box_of_zero_width(tmp_path):
    # A clipped box of continuous width 0 is written as xmax = xmin - 1; it must read back.
    write_voc_results(tmp_path, [det("a", [[5, 5, 4, 9]], [1], [0.5])], NAMES)
    assert read_voc_results(tmp_path, NAMES, ["a"])[0].boxes.tolist() == [[5.0, 5.0, 4.0, 9.0]]


def test_read_rejects_missing_file_and_directory(tmp_path):
    write_voc_results(tmp_path, [], NAMES)
    (tmp_path / results_file_name("bird")).unlink()
    with pytest.raises(ResultsFormatError, match=r"comp4_det_test_bird.txt: results file is missing"):
        read_voc_results(tmp_path, NAMES, ["a"])
    with pytest.raises(ResultsFormatError, match="results directory does not exist"):
        read_voc_results(tmp_path / "nope", NAMES, ["a"])
    with pytest.raises(ResultsFormatError, match="'a' more than once"):
        read_voc_results(tmp_path, ["cat"], ["a", "b", "a"])


def test_read_rejects_binary_file(tmp_path):
    write_voc_results(tmp_path, [], NAMES)
    (tmp_path / "comp4_det_test_cat.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResultsFormatError, match="comp4_det_test_cat.txt: not a UTF-8 text file"):
        read_voc_results(tmp_path, NAMES, ["a"])


def test_write_rejects_bad_input_before_writing_anything(tmp_path):
    with pytest.raises(ResultsFormatError, match="image 'a': label 4 is outside 1..3"):
        write_voc_results(tmp_path / "out", [det("a", [[1, 1, 2, 2]], [4], [0.5])], NAMES)
    with pytest.raises(ResultsFormatError, match="image id 'a b' is empty or contains whitespace"):
        write_voc_results(tmp_path / "out", [det("a b", [[1, 1, 2, 2]], [1], [0.5])], NAMES)
    with pytest.raises(ResultsFormatError, match="class name 'pot/plant' cannot be used"):
        write_voc_results(tmp_path / "out", [], ["pot/plant"])
    assert not (tmp_path / "out").exists()


def test_class_names_with_spaces_round_trip(tmp_path):
    # COCO's category names include "traffic light": a space is fine in a file name.
    names = ["traffic light", "stop sign"]
    written = [det("a", [[1, 1, 5, 5], [2, 2, 8, 9]], [1, 2], [0.5, 0.25])]
    paths = write_voc_results(tmp_path, written, names)
    assert [p.name for p in paths] == ["comp4_det_test_traffic light.txt", "comp4_det_test_stop sign.txt"]
    (read,) = read_voc_results(tmp_path, names, ["a"])
    assert read.labels.tolist() == [1, 2] and read.scores.tolist() == [0.5, 0.25]


def test_read_names_an_evaluated_id_no_results_file_can_list(tmp_path):
    write_voc_results(tmp_path, [], NAMES)
    with pytest.raises(ResultsFormatError, match="image id 'raccoon 143' is empty or contains whitespace"):
        read_voc_results(tmp_path, NAMES, ["a", "raccoon 143"])


def test_write_failure_leaves_no_partial_files(tmp_path, monkeypatch):
    write_voc_results(tmp_path, [det("a", [[1, 1, 2, 2]], [1], [0.5])], NAMES)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_voc_results(tmp_path, [det("b", [[1, 1, 3, 3]], [1], [0.7])], NAMES)
    # The previous files are untouched and no temporary file is left behind.
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_pr_curves_writes_grid_png(tmp_path):
    dets, gts = random_data(0, n_classes=7)
    names = [f"c{i}" for i in range(1, 8)] + ["empty"]  # 'empty' has no ground truth -> NaN AP
    result = evaluate_voc(dets, gts, names)
    out = plot_pr_curves(result, tmp_path / "plots" / "pr.png", columns=3)
    assert out == tmp_path / "plots" / "pr.png"
    # 8 classes in 3 columns -> 3 rows of 300 x 260-pixel panels.
    assert _png_size(out) == (3 * 300, 3 * 260)
    assert os.listdir(tmp_path / "plots") == ["pr.png"]
    one_gt = ImageGroundTruth("x", np.array([[1.0, 1, 5, 5]]), np.array([1]), np.array([False]), 10, 10)
    small = plot_pr_curves(evaluate_voc([], [one_gt], ["only"]), tmp_path / "one.png")
    assert _png_size(small) == (300, 260)


def test_equal_scores_rank_in_file_order_as_in_the_devkit(tmp_path):
    # Lines as another detector might write them, scores rounded to 3 decimals: image 2's hit first.
    (tmp_path / results_file_name("a")).write_text("000002 0.500 11 11 40 40\n000001 0.500 60 60 90 90\n")
    ground_truth = [
        ImageGroundTruth(i, np.array([[11.0, 11, 40, 40]]), np.array([1]), np.array([False]), 100, 100)
        for i in ("000001", "000002")
    ]
    detections = read_voc_results(tmp_path, ["a"], ["000001", "000002"])
    result = evaluate_voc(detections, ground_truth, ["a"])
    assert result.voc12_map == pytest.approx(0.5) and result.voc07_map == pytest.approx(6 / 11)
