"""Synthetic shapes dataset: deterministic, real VOC form, tight boxes, within the specification."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import data.synthetic as synthetic
from data.errors import DataError
from data.synthetic import SHAPES_CLASSES, _shape_mask, generate_shapes_dataset, render_image
from data.voc import load_vocdevkit

SMALL = dict(n_trainval=6, n_test=3, image_size=96)


def tree_bytes(devkit):
    return {p.relative_to(devkit).as_posix(): p.read_bytes() for p in sorted(devkit.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = tree_bytes(generate_shapes_dataset(tmp_path / "a", seed=3, **SMALL))
    b = tree_bytes(generate_shapes_dataset(tmp_path / "b", seed=3, workers=2, **SMALL))
    assert len(a) == 9 * 2 + 2 + 1  # JPEG + XML per image, two split lists, the stamp
    assert a == b
    c = tree_bytes(generate_shapes_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a["SHAPES/JPEGImages/000000.jpg"] != c["SHAPES/JPEGImages/000000.jpg"]


def test_xml_reads_back_with_the_voc_reader(tmp_path):
    devkit = generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    assert devkit == tmp_path / "VOCdevkit"
    trainval = load_vocdevkit(devkit, [("SHAPES", "trainval")], SHAPES_CLASSES, cache_dir=None)
    test = load_vocdevkit(devkit, [("SHAPES", "test")], SHAPES_CLASSES, cache_dir=None)
    assert [r.image_id for r in trainval] == [f"{i:06d}" for i in range(6)]
    assert [r.image_id for r in test] == ["000006", "000007", "000008"]
    for r in [*trainval, *test]:
        _, objects = render_image(0, int(r.image_id), 96)
        assert (r.width, r.height) == (96, 96)
        assert r.boxes.tolist() == [list(o.box) for o in objects]
        assert r.labels.tolist() == [o.class_index + 1 for o in objects]
        assert r.difficult.tolist() == [o.difficult for o in objects]
    assert trainval.stats.boxes_dropped == trainval.stats.boxes_clipped == 0


def test_existing_tree_is_reused_and_changed_parameters_regenerate(tmp_path, monkeypatch):
    devkit = generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    first = tree_bytes(devkit)

    def fail(_job):
        raise AssertionError("regenerated an up-to-date tree")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_write_one", fail)
        generate_shapes_dataset(tmp_path, seed=0, **SMALL)
        with pytest.raises(AssertionError, match="regenerated"):
            generate_shapes_dataset(tmp_path, seed=0, force=True, **SMALL)
    generate_shapes_dataset(tmp_path, seed=0, n_trainval=6, n_test=4, image_size=96)
    assert len(list((devkit / "SHAPES" / "JPEGImages").iterdir())) == 10
    (devkit / "SHAPES" / "JPEGImages" / "000001.jpg").unlink()  # an incomplete tree is rebuilt
    generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    assert tree_bytes(devkit) == first
    assert not list(devkit.glob(".SHAPES.tmp-*"))


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_box_is_the_drawn_pixel_extent(kind):
    rng = np.random.default_rng(kind)
    inside = 0
    for _ in range(80):
        w, h = (int(v) for v in rng.integers(3, 60, 2))
        left, top = (int(v) for v in rng.integers(-20, 90, 2))
        shape = _shape_mask(kind, left, top, w, h, 100, rng)
        clipped = (max(left, 0), max(top, 0), min(left + w, 100), min(top + h, 100))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            assert shape is None
            continue
        mask, region = shape
        assert region == clipped
        ys, xs = np.nonzero(mask)
        extent = (region[0] + xs.min(), region[1] + ys.min(), region[0] + xs.max() + 1, region[1] + ys.max() + 1)
        if left >= 0 and top >= 0 and left + w <= 100 and top + h <= 100:
            # Inside the frame the drawn pixels span exactly the geometric box: left..left+w-1 etc.
            assert extent == (left, top, left + w, top + h)
            inside += 1
        else:
            # Cut by the frame: within the clipped box (render_image takes the extent of the pixels).
            assert clipped[0] <= extent[0] < extent[2] <= clipped[2]
            assert clipped[1] <= extent[1] < extent[3] <= clipped[3]
    assert inside > 10


def test_generated_objects_follow_the_specification():
    size, counts, classes = 128, [], set()
    difficult = truncated = 0
    for i in range(150):
        image, objects = render_image(11, i, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        counts.append(len(objects))
        for o in objects:
            classes.add(SHAPES_CLASSES[o.class_index])
            x1, y1, x2, y2 = o.box
            w, h = x2 - x1, y2 - y1
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            if o.truncated:
                truncated += 1
                continue
            assert 0.1 * size - 1 <= w <= 0.7 * size + 1 and 0.1 * size - 1 <= h <= 0.7 * size + 1
            assert 0.5 - 0.05 <= w / h <= 2.0 + 0.1
            if math.sqrt(w * h) < 0.12 * size:
                assert o.difficult
            difficult += o.difficult
    assert set(counts) == {1, 2, 3, 4}
    assert classes == set(SHAPES_CLASSES)
    n = sum(counts)
    assert 0.02 * n < difficult < 0.3 * n and 0 < truncated < 0.5 * n


def test_shapes_contrast_with_their_surroundings():
    # Unoccluded rectangles fill their box: a flat interior, clearly different from the ring around it.
    distances = []
    for i in range(120):
        image, objects = render_image(2, i, 128)
        for k, o in enumerate(objects):
            x1, y1, x2, y2 = o.box
            later = objects[k + 1 :]
            if o.class_index != 1 or o.difficult or later or min(x1, y1) < 1 or max(x2, y2) > 127:
                continue
            interior = image[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].reshape(-1, 3).astype(float)
            assert np.ptp(interior, axis=0).max() <= 8  # one colour plus the +-4 sensor noise
            ring = np.concatenate([image[y1 - 1, x1 - 1 : x2 + 1], image[y2, x1 - 1 : x2 + 1],
                                   image[y1:y2, x1 - 1], image[y1:y2, x2]]).astype(float)
            distances.append(np.linalg.norm(interior.mean(0) - ring.mean(0)))
    assert len(distances) > 10
    assert np.mean(np.array(distances) > 40) > 0.9


def test_cli(tmp_path, capsys):
    synthetic.main(["--root", str(tmp_path), "--seed", "1", "--n-trainval", "2", "--n-test", "1",
                    "--image-size", "64"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "VOCdevkit" / "SHAPES")
    assert (tmp_path / "VOCdevkit" / "SHAPES" / "ImageSets" / "Main" / "test.txt").read_text() == "000002\n"


def test_a_folder_the_generator_did_not_write_is_never_deleted(tmp_path):
    mine = tmp_path / "VOCdevkit" / "SHAPES" / "JPEGImages" / "mine.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone's photo")
    with pytest.raises(DataError, match=r"SHAPES exists but holds no generation\.json"):
        generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    assert mine.read_bytes() == b"someone's photo"


def test_temporary_trees_of_killed_generators_are_removed(tmp_path):
    devkit = tmp_path / "VOCdevkit"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs, as a killed generator's
    abandoned = devkit / f".SHAPES.tmp-{gone.pid}"
    running = devkit / f".SHAPES.tmp-{os.getppid()}"  # a generator still at work: left alone
    for folder in (abandoned, running):
        (folder / "JPEGImages").mkdir(parents=True)
    generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    assert not abandoned.exists() and running.exists()
