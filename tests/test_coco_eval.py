"""COCO metrics through pycocotools: hand-reasoned values, difficult boxes as crowd, empty detections."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from data.coco import load_coco
from utils.coco_eval import COCO_METRIC_NAMES, devkit_to_coco_xywh, evaluate_coco
from utils.engine import ground_truth_from_records
from utils.voc_eval import EvaluationInputError, ImageDetections, ImageGroundTruth


def gt_image(image_id, boxes, labels, difficult=None, width=500, height=500):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageGroundTruth(image_id, boxes, np.asarray(labels, np.int64), difficult, width, height)


def det_image(image_id, boxes, labels, scores):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    return ImageDetections(image_id, boxes, np.asarray(labels, np.int64), np.asarray(scores, float))


# Devkit boxes: 10x10 (area 100, small), 50x50 (2500, medium), 200x200 (40000, large).
SMALL = [1, 1, 10, 10]
MEDIUM = [101, 101, 150, 150]
LARGE = [201, 201, 400, 400]


def test_devkit_boxes_convert_to_continuous_xywh():
    # Continuous box (10, 20)-(40, 60) is devkit (11, 21, 40, 60); COCO wants x 10, y 20, w 30, h 40.
    assert devkit_to_coco_xywh(np.array([[11, 21, 40, 60]])).tolist() == [[10.0, 20.0, 30.0, 40.0]]
    assert devkit_to_coco_xywh(np.array([SMALL])).tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_perfect_detections_score_one():
    gts = [gt_image("a", [SMALL, MEDIUM], [1, 2]), gt_image("b", [LARGE], [1])]
    dets = [det_image("a", [SMALL, MEDIUM], [1, 2], [0.9, 0.8]), det_image("b", [LARGE], [1], [0.7])]
    metrics = evaluate_coco(dets, gts, ["cat", "dog"])
    assert set(metrics) == set(COCO_METRIC_NAMES)
    for name in COCO_METRIC_NAMES:
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name


def test_one_shifted_box_hand_reasoned():
    # Two small boxes A, B of one class. A is found exactly (score .9); B's detection is shifted by one
    # pixel (score .8): overlap 9 x 10 = 90, union 110, IoU 0.818.
    #   IoU thresholds .50 ... .80 (7 of 10): both TPs -> AP 1.
    #   .85, .90, .95: ranked TP, FP -> recall .5 .5, precision 1 .5; the 101 recall points 0.00 ... 0.50
    #   (51 of them) get precision 1, the 50 above .5 get 0 -> 51 / 101.
    # AP = (7 + 3 * 51/101) / 10 = 0.8515; AP50 = AP75 = 1. AR100 = (7 * 1 + 3 * 0.5) / 10 = 0.85.
    # AR1 keeps one detection per image and class -> recall .5 at every threshold.
    b = [21, 1, 30, 10]
    shifted = [22, 1, 31, 10]
    metrics = evaluate_coco(
        [det_image("a", [SMALL, shifted], [1, 1], [0.9, 0.8])], [gt_image("a", [SMALL, b], [1, 1])], ["cat"]
    )
    assert metrics["AP"] == pytest.approx((7 + 3 * 51 / 101) / 10, abs=1e-9)
    assert metrics["AP50"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["APs"] == pytest.approx(metrics["AP"], abs=1e-12)
    assert metrics["APm"] is None and metrics["APl"] is None  # no medium or large ground truth
    assert metrics["AR100"] == pytest.approx(0.85, abs=1e-9)
    assert metrics["AR1"] == pytest.approx(0.5, abs=1e-9)


def test_difficult_box_is_crowd_and_ignored():
    # A normal, D difficult. Ranked: D (matches the crowd box: ignored), FAR (FP), A (TP): recall 0 1,
    # precision 0 .5 -> envelope .5 everywhere -> AP 0.5 at every threshold.
    # (D as a normal box would give 0.835; dropping D and counting its detection as FP gives 1/3.)
    a, d, far = SMALL, [101, 101, 110, 110], [301, 301, 310, 310]
    metrics = evaluate_coco(
        [det_image("x", [d, far, a], [1, 1, 1], [0.9, 0.85, 0.8])],
        [gt_image("x", [a, d], [1, 1], [False, True])],
        ["cat"],
    )
    assert metrics["AP"] == pytest.approx(0.5, abs=1e-9)
    assert metrics["AP50"] == pytest.approx(0.5, abs=1e-9)
    assert metrics["AR100"] == pytest.approx(1.0, abs=1e-12)


def test_empty_detections_score_zero():
    gts = [gt_image("a", [SMALL], [1]), gt_image("b", [SMALL, [41, 41, 50, 50]], [2, 2])]
    metrics = evaluate_coco([], gts, ["cat", "dog"])
    for name in ("AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs"):
        assert metrics[name] == 0.0, name
    for name in ("APm", "APl", "ARm", "ARl"):  # no ground truth in these area ranges
        assert metrics[name] is None, name
    assert evaluate_coco([det_image("a", [], [], [])], gts, ["cat", "dog"]) == metrics
    json.dumps(metrics, allow_nan=False)


def test_matches_pycocotools_load_res_path():
    # The result set is built by hand (no loadRes); check it against the standard loadRes route.
    rng = np.random.default_rng(0)
    gts, dets = [], []
    for i in range(15):
        n = int(rng.integers(1, 4))
        xy = rng.integers(1, 300, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.integers(5, 150, size=(n, 2))], axis=1)
        labels = rng.integers(1, 3, n)
        gts.append(gt_image(f"i{i}", boxes, labels, rng.random(n) < 0.2))
        k = int(rng.integers(1, 8))
        src = rng.integers(0, n, k)
        det_boxes = boxes[src] + rng.normal(0, 5, size=(k, 4))
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
        dets.append(det_image(f"i{i}", det_boxes, labels[src], rng.random(k)))
    ours = evaluate_coco(dets, gts, ["cat", "dog"])

    images = [{"id": i + 1, "width": 500, "height": 500} for i in range(len(gts))]
    annotations = []
    for i, gt in enumerate(gts):
        for box, label, difficult in zip(
            devkit_to_coco_xywh(gt.boxes).tolist(), gt.labels, gt.difficult, strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": int(difficult),
                }
            )
    results = [
        {"image_id": i + 1, "category_id": int(label), "bbox": box, "score": float(score)}
        for i, d in enumerate(dets)
        for box, label, score in zip(devkit_to_coco_xywh(d.boxes).tolist(), d.labels, d.scores, strict=True)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        }
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = {
        n: (None if v < 0 else v) for n, v in zip(COCO_METRIC_NAMES, evaluator.stats.tolist(), strict=True)
    }
    assert ours == expected
    assert 0.1 < ours["AP50"] < 1.0  # a non-trivial case


def test_rejects_unknown_images_and_bad_labels():
    gts = [gt_image("a", [SMALL], [1])]
    with pytest.raises(EvaluationInputError, match="'zz', which has no ground-truth entry"):
        evaluate_coco([det_image("zz", [SMALL], [1], [0.5])], gts, ["cat"])
    with pytest.raises(EvaluationInputError, match="'a': detection label 2 is outside 1..1"):
        evaluate_coco([det_image("a", [SMALL], [2], [0.5])], gts, ["cat"])
    with pytest.raises(EvaluationInputError, match="'a' appears twice in the ground truth"):
        evaluate_coco([], gts + gts, ["cat"])


def test_size_ranges_go_by_the_objects_own_areas_as_pycocotools_on_the_json(tmp_path):
    # A 40x40 box whose segmentation covers 900 px (found) and a 30x30 one of 850 px (missed): by their own
    # areas both are small; by their boxes one (1600 px) would be medium.
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 900,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "area": 850,
                             "iscrowd": 0}]}
    (tmp_path / "a.jpg").write_bytes(b"")  # the loader checks the file exists; nothing reads it here
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    records, _ = load_coco(tmp_path, path, ["thing"])
    assert records[0].areas.tolist() == [900.0, 850.0]
    ground_truth = ground_truth_from_records(records)
    found = det_image("1", [[11.0, 11.0, 50.0, 50.0]], [1], [0.9])  # devkit pixels of [10, 10, 40, 40]
    ours = evaluate_coco([found], ground_truth, ["thing"])

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        results = coco.loadRes([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9}])
        evaluator = COCOeval(coco, results, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for name, value in zip(COCO_METRIC_NAMES, evaluator.stats, strict=False):
        assert ours[name] == (None if value < 0 else pytest.approx(value, abs=1e-12)), name
    assert ours["APs"] == pytest.approx(0.505, abs=1e-3) and ours["APm"] is None
