"""VOC AP: hand-worked cases, the devkit's +1 and >= conventions, and equality with a loop transcription."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from utils.voc_eval import (
    DEVKIT_11_POINT_THRESHOLDS,
    EvaluationInputError,
    ImageDetections,
    ImageGroundTruth,
    devkit_iou,
    evaluate_voc,
    voc_ap,
)

# ---------------------------------------------------------------------------------------------------
# Reference: a line-by-line transcription of the devkit loops (VOCevaldet.m with py-faster-rcnn's
# voc_ap), sequential "claimed" flags and all. Ties: Python's sorted() is stable, so equal scores keep
# input order, the same documented order as evaluate_voc. Differences from py-faster-rcnn, matching
# the MATLAB devkit: `ovmax >= threshold`, and 11-point thresholds t=0:0.1:1 as MATLAB's colon makes them.
# ---------------------------------------------------------------------------------------------------


def _reference_ap(rec: list[float], prec: list[float], use_07_metric: bool) -> float:
    if use_07_metric:
        ap = 0.0
        for k in range(11):
            t = k * 0.1 if k <= 5 else 1.0 - (10 - k) * 0.1  # MATLAB: a + k*d to the middle, b - (n-k)*d after
            ps = [p for r, p in zip(rec, prec, strict=True) if r >= t]
            ap += (max(ps) if ps else 0.0) / 11.0
        return ap
    mrec = [0.0, *rec, 1.0]
    mpre = [0.0, *prec, 0.0]
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def reference_voc_eval(detections, ground_truth, class_names, iou_threshold=0.5):
    """Per class: (ap07, ap12, recall list, precision list, n_positives), curves without ignored rows."""
    out = {}
    for c, name in enumerate(class_names, start=1):
        records = {}
        npos = 0
        for gt in ground_truth:
            keep = gt.labels == c
            records[gt.image_id] = {
                "bb": gt.boxes[keep].tolist(),
                "difficult": gt.difficult[keep].tolist(),
                "det": [False] * int(keep.sum()),
            }
            npos += sum(1 for d in gt.difficult[keep] if not d)
        entries = [
            (det.image_id, float(score), box)
            for det in detections
            for box, label, score in zip(
                det.boxes.tolist(), det.labels.tolist(), det.scores.tolist(), strict=True
            )
            if label == c
        ]
        entries = sorted(entries, key=lambda e: -e[1])
        tp, fp = [], []
        for image_id, _, bb in entries:
            r = records[image_id]
            ovmax, jmax = -math.inf, -1
            for j, bbgt in enumerate(r["bb"]):
                iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0]) + 1.0
                ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1]) + 1.0
                if iw > 0 and ih > 0:
                    ua = (
                        (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                        + (bbgt[2] - bbgt[0] + 1.0) * (bbgt[3] - bbgt[1] + 1.0)
                        - iw * ih
                    )
                    ov = iw * ih / ua
                    if ov > ovmax:
                        ovmax, jmax = ov, j
            if ovmax >= iou_threshold:
                if r["difficult"][jmax]:
                    continue  # ignored: neither TP nor FP
                if not r["det"][jmax]:
                    r["det"][jmax] = True
                    tp.append(1)
                    fp.append(0)
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        if npos == 0:
            out[name] = (math.nan, math.nan, [], [], 0)
            continue
        ctp = np.cumsum(tp).tolist()
        cfp = np.cumsum(fp).tolist()
        rec = [t / npos for t in ctp]
        prec = [t / (t + f) for t, f in zip(ctp, cfp, strict=True)]
        out[name] = (_reference_ap(rec, prec, True), _reference_ap(rec, prec, False), rec, prec, npos)
    return out


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def gt_image(image_id, boxes, labels, difficult=None, width=100, height=100):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return ImageGroundTruth(image_id, boxes, np.asarray(labels, np.int64), difficult, width, height)


def det_image(image_id, boxes, labels, scores):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return ImageDetections(image_id, boxes, np.asarray(labels, np.int64), np.asarray(scores, np.float64))


FAR = [200, 200, 210, 210]  # overlaps nothing in the hand-worked cases


# ---------------------------------------------------------------------------------------------------
# voc_ap on a hand-computed curve
# ---------------------------------------------------------------------------------------------------

# 5 positives; ranked detections TP, FP, TP, FP, TP:
#   recall    0.2  0.2  0.4  0.4  0.6
#   precision 1    1/2  2/3  1/2  3/5
HAND_RECALL = np.array([1, 1, 2, 2, 3]) / 5
HAND_PRECISION = np.array([1 / 1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])


def test_voc_ap_area_hand_computed():
    # Envelope from the right: 1, 2/3, 2/3, 3/5, 3/5. Recall steps 0->0.2 (p 1), 0.2->0.4 (p 2/3 at the
    # third point), 0.4->0.6 (p 3/5), 0.6->1 (p 0): 0.2 + 0.2 * 2/3 + 0.2 * 3/5 = 0.453333...
    expected = 0.2 * 1 + 0.2 * (2 / 3) + 0.2 * (3 / 5)
    assert voc_ap(HAND_RECALL, HAND_PRECISION, use_07_metric=False) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.4533333333, abs=1e-9)


def test_voc_ap_11_point_hand_computed():
    # Max precision at recall >= t: t = 0, .1, .2 -> 1; t = .3, .4 -> 2/3; t = .5, .6 -> 3/5 (recall
    # 3/5 == 0.6 exactly, so t = 0.6 counts); t = .7 ... 1 -> 0. (3 + 4/3 + 6/5) / 11 = 0.503030...
    expected = (3 * 1 + 2 * (2 / 3) + 2 * (3 / 5)) / 11
    assert voc_ap(HAND_RECALL, HAND_PRECISION, use_07_metric=True) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.5030303030, abs=1e-9)


def test_voc_ap_empty_curve_is_zero():
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=False) == 0.0


def test_voc_ap_rejects_mismatched_arrays():
    with pytest.raises(EvaluationInputError, match="equal length"):
        voc_ap(np.zeros(3), np.zeros(2), use_07_metric=False)


def test_evaluate_voc_reproduces_hand_curve():
    # Same curve from boxes: 5 boxes in one image, detections TP, FP, TP, FP, TP by descending score.
    gts = [[1 + 20 * i, 1, 10 + 20 * i, 10] for i in range(5)]
    boxes = [gts[0], FAR, gts[1], FAR, gts[2]]
    result = evaluate_voc(
        [det_image("a", boxes, [1] * 5, [0.9, 0.8, 0.7, 0.6, 0.5])], [gt_image("a", gts, [1] * 5)], ["cat"]
    )
    assert result.recall["cat"].tolist() == HAND_RECALL.tolist()
    assert result.precision["cat"].tolist() == HAND_PRECISION.tolist()
    assert result.ap12["cat"] == pytest.approx(0.2 + 0.2 * 2 / 3 + 0.2 * 3 / 5, abs=1e-12)
    assert result.ap07["cat"] == pytest.approx((3 + 4 / 3 + 6 / 5) / 11, abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# matching rules
# ---------------------------------------------------------------------------------------------------


def test_duplicate_detection_is_false_positive():
    # Boxes A, B. Ranked: A (TP), A again (FP, already claimed), B (TP).
    # recall .5 .5 1, precision 1 1/2 2/3. Area: .5 * 1 + .5 * 2/3 = 0.8333.
    # 11-point: t = 0 .. .5 -> 1 (6 points), t = .6 .. 1 -> 2/3 (5 points): (6 + 10/3) / 11 = 0.8485.
    a, b = [1, 1, 10, 10], [31, 1, 40, 10]
    result = evaluate_voc(
        [det_image("x", [a, a, b], [1, 1, 1], [0.9, 0.8, 0.7])], [gt_image("x", [a, b], [1, 1])], ["cat"]
    )
    assert result.precision["cat"].tolist() == [1.0, 0.5, 2 / 3]
    assert result.recall["cat"].tolist() == [0.5, 0.5, 1.0]
    assert result.ap12["cat"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert result.ap07["cat"] == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)


def test_recall_below_one_caps_the_11_point_ap_at_ten_elevenths():
    # 9 of 10 cats found, every detection correct: precision 1 at recall 0..0.9, nothing at recall 1.0,
    # so the 11-point AP is 10/11. With 1 of 2 found: precision 1 at recall 0..0.5 -> 6/11.
    boxes = [[1 + 20 * i, 1, 10 + 20 * i, 10] for i in range(10)]
    found = evaluate_voc(
        [det_image("x", boxes[:9], [1] * 9, [0.9] * 9)], [gt_image("x", boxes, [1] * 10)], ["cat"]
    )
    assert found.max_recall("cat") == pytest.approx(0.9, abs=1e-12)
    assert found.ap07["cat"] == pytest.approx(10 / 11, abs=1e-12)
    half = evaluate_voc([det_image("x", boxes[:1], [1], [0.9])], [gt_image("x", boxes[:2], [1, 1])], ["cat"])
    assert half.max_recall("cat") == 0.5
    assert half.ap07["cat"] == pytest.approx(6 / 11, abs=1e-12)
    none = evaluate_voc([], [gt_image("x", boxes[:1], [1])], ["cat"])
    assert none.max_recall("cat") == 0.0


def test_difficult_match_is_ignored():
    # A non-difficult, D difficult. Ranked: D (ignored), A (TP), FAR (FP): curve without the ignored row
    # is recall 1 1, precision 1 1/2 -> both APs 1. Counting D as FP would give precision 0, 1/2, 1/3.
    a, d = [1, 1, 10, 10], [51, 51, 60, 60]
    result = evaluate_voc(
        [det_image("x", [d, a, FAR], [1, 1, 1], [0.9, 0.8, 0.7])],
        [gt_image("x", [a, d], [1, 1], [False, True])],
        ["cat"],
    )
    assert result.n_positives["cat"] == 1
    assert result.n_detections["cat"] == 3
    assert result.recall["cat"].tolist() == [1.0, 1.0]
    assert result.precision["cat"].tolist() == [1.0, 0.5]
    assert result.ap07["cat"] == pytest.approx(1.0, abs=1e-12)
    assert result.ap12["cat"] == pytest.approx(1.0, abs=1e-12)


def test_best_overlap_on_difficult_box_is_ignored_even_if_it_overlaps_a_positive():
    # The detection equals difficult box D (IoU 1) and overlaps positive A with IoU 90/110 >= 0.5, but
    # the devkit only looks at the best box: it is ignored, A stays unmatched, AP 0.
    a, d = [1, 1, 10, 10], [2, 1, 11, 10]
    result = evaluate_voc(
        [det_image("x", [d], [1], [0.9])], [gt_image("x", [a, d], [1, 1], [False, True])], ["cat"]
    )
    assert devkit_iou(np.array(d, float), np.array(a, float)) == pytest.approx(90 / 110)
    assert result.recall["cat"].size == 0
    assert result.ap12["cat"] == 0.0
    assert result.ap07["cat"] == 0.0


def test_class_without_detections_has_zero_ap_and_counts_in_mean():
    # cat: perfect (AP 1); dog: 1 box, no detections (AP 0). Mean (1 + 0) / 2.
    result = evaluate_voc(
        [det_image("x", [[1, 1, 10, 10]], [1], [0.9])],
        [gt_image("x", [[1, 1, 10, 10], [31, 31, 50, 50]], [1, 2])],
        ["cat", "dog"],
    )
    assert result.ap07["dog"] == 0.0
    assert result.ap12["dog"] == 0.0
    assert result.n_detections["dog"] == 0
    assert result.voc07_map == pytest.approx(0.5, abs=1e-12)
    assert result.voc12_map == pytest.approx(0.5, abs=1e-12)


def test_class_without_ground_truth_is_nan_and_left_out_of_mean():
    # bird: detections but no boxes; cow: only a difficult box. Both NaN, mean over cat alone.
    result = evaluate_voc(
        [det_image("x", [[1, 1, 10, 10], [1, 1, 10, 10], [31, 31, 50, 50]], [1, 2, 3], [0.9, 0.8, 0.7])],
        [gt_image("x", [[1, 1, 10, 10], [31, 31, 50, 50]], [1, 3], [False, True])],
        ["cat", "bird", "cow"],
    )
    assert result.ap07["cat"] == pytest.approx(1.0, abs=1e-12)
    for name in ("bird", "cow"):
        assert math.isnan(result.ap07[name]) and math.isnan(result.ap12[name])
        assert result.n_positives[name] == 0
        assert result.recall[name].size == 0
    assert result.voc07_map == pytest.approx(1.0, abs=1e-12)
    assert result.voc12_map == pytest.approx(1.0, abs=1e-12)
    summary = result.to_dict()
    json.dumps(summary, allow_nan=False)  # strict JSON: NaN became None
    assert summary["classes"]["bird"]["ap07"] is None
    assert summary["classes"]["bird"]["n_detections"] == 1
    assert summary["classes"]["bird"]["max_recall"] is None
    assert summary["classes"]["cat"]["max_recall"] == 1.0
    assert summary["voc12_map"] == pytest.approx(1.0, abs=1e-12)


def test_no_class_with_positives_gives_nan_means():
    result = evaluate_voc([], [gt_image("x", np.zeros((0, 4)), [])], ["cat"])
    assert math.isnan(result.voc07_map) and math.isnan(result.voc12_map)
    assert result.to_dict()["voc07_map"] is None


def test_detection_in_image_without_boxes_of_its_class_is_false_positive():
    a = [1, 1, 10, 10]
    result = evaluate_voc(
        [det_image("x", [a], [1], [0.5]), det_image("y", [a], [1], [0.9])],
        [gt_image("x", [a], [1]), gt_image("y", [a], [2])],
        ["cat", "dog"],
    )
    assert result.precision["cat"].tolist() == [0.0, 0.5]
    assert result.ap12["cat"] == pytest.approx(0.5, abs=1e-12)


def test_plus_one_convention_decides_match():
    # GT (1,1)-(4,4) is 4x4 = 16 pixels, detection (1,1)-(6,3) is 6x3 = 18, overlap 4x3 = 12:
    # devkit IoU 12 / (16 + 18 - 12) = 0.545 -> TP. Without +1 (3x3, 5x2, 3x2): 6 / 13 = 0.46 -> FP.
    gt, det = [1, 1, 4, 4], [1, 1, 6, 3]
    assert devkit_iou(np.array(det, float), np.array(gt, float)) == pytest.approx(12 / 22)
    result = evaluate_voc([det_image("x", [det], [1], [0.9])], [gt_image("x", [gt], [1])], ["cat"])
    assert result.ap12["cat"] == 1.0
    assert result.ap07["cat"] == pytest.approx(1.0, abs=1e-12)


def test_iou_exactly_at_threshold_is_a_match():
    # 10x10 box vs its top half 10x5: IoU 50 / 100 = 0.5 exactly; the MATLAB devkit's >= makes it a TP.
    gt, det = [1, 1, 10, 10], [1, 1, 10, 5]
    assert devkit_iou(np.array(det, float), np.array(gt, float)) == 0.5
    result = evaluate_voc([det_image("x", [det], [1], [0.9])], [gt_image("x", [gt], [1])], ["cat"])
    assert result.ap12["cat"] == 1.0
    stricter = evaluate_voc(
        [det_image("x", [det], [1], [0.9])], [gt_image("x", [gt], [1])], ["cat"], iou_threshold=0.51
    )
    assert stricter.ap12["cat"] == 0.0


def test_equal_scores_keep_input_order():
    # Same score for a miss and a hit: whichever comes first in the input ranks first.
    a = [1, 1, 10, 10]
    gts = [gt_image("x", [a], [1])]
    miss_first = evaluate_voc([det_image("x", [FAR, a], [1, 1], [0.5, 0.5])], gts, ["cat"])
    hit_first = evaluate_voc([det_image("x", [a, FAR], [1, 1], [0.5, 0.5])], gts, ["cat"])
    assert miss_first.precision["cat"].tolist() == [0.0, 0.5]
    assert miss_first.ap12["cat"] == pytest.approx(0.5, abs=1e-12)
    assert hit_first.precision["cat"].tolist() == [1.0, 0.5]
    assert hit_first.ap12["cat"] == pytest.approx(1.0, abs=1e-12)


def test_equal_overlaps_pick_the_first_box():
    # Detection (6,1)-(15,10) overlaps A (x 1..10) and B (x 11..20) equally, 50 / 150 = 1/3 >= 0.3; the
    # devkit's strict `ov > ovmax` keeps the first box, A. So the next detection, an exact copy of A, is
    # a duplicate (FP): recall .5 .5. Had the tie gone to B, both would be TPs (recall .5 1).
    a, b, mid = [1, 1, 10, 10], [11, 1, 20, 10], [6, 1, 15, 10]
    gts = [gt_image("x", [a, b], [1, 1])]
    dets = [det_image("x", [mid, a], [1, 1], [0.9, 0.8])]
    result = evaluate_voc(dets, gts, ["cat"], iou_threshold=0.3)
    assert result.recall["cat"].tolist() == [0.5, 0.5]
    assert result.precision["cat"].tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------------
# agreement with the devkit loop on random data
# ---------------------------------------------------------------------------------------------------


def random_case(seed, n_images=12, n_classes=3, max_gt=4, max_det=15):
    """Integer pixel boxes (so exact IoU ties and 0.5 boundaries occur), scores on a coarse grid (ties)."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for i in range(n_images):
        n = int(rng.integers(0, max_gt + 1))
        xy = rng.integers(1, 60, size=(n, 2))
        wh = rng.integers(0, 30, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(float)
        labels = rng.integers(1, n_classes + 1, size=n)
        gts.append(gt_image(f"img{i}", boxes, labels, rng.random(n) < 0.25))
        k = int(rng.integers(0, max_det + 1))
        if n:
            src = rng.integers(0, n, size=k)
            near = boxes[src] + rng.integers(-4, 5, size=(k, 4))
            near[:, 2:] = np.maximum(near[:, 2:], near[:, :2])
            near_labels = np.where(rng.random(k) < 0.8, labels[src], rng.integers(1, n_classes + 1, k))
        else:
            near, near_labels = np.zeros((k, 4)), rng.integers(1, n_classes + 1, k)
        xy = rng.integers(1, 60, size=(k, 2))
        far = np.concatenate([xy, xy + rng.integers(0, 30, size=(k, 2))], axis=1).astype(float)
        use_near = rng.random(k) < 0.7
        det_boxes = np.where(use_near[:, None], near, far)
        det_labels = np.where(use_near, near_labels, rng.integers(1, n_classes + 1, k))
        if rng.random() < 0.9:  # some images without any detection entry
            dets.append(det_image(f"img{i}", det_boxes, det_labels, rng.integers(0, 8, k) / 8))
    return dets, gts


@pytest.mark.parametrize("seed", range(40))
def test_matches_devkit_loop_on_random_data(seed):
    names = ["a", "b", "c"]
    dets, gts = random_case(seed)
    threshold = [0.5, 0.3, 0.7][seed % 3]
    result = evaluate_voc(dets, gts, names, iou_threshold=threshold)
    expected = reference_voc_eval(dets, gts, names, iou_threshold=threshold)
    for name in names:
        ap07, ap12, rec, prec, npos = expected[name]
        assert result.n_positives[name] == npos
        assert result.recall[name].tolist() == rec
        assert result.precision[name].tolist() == prec
        if npos == 0:
            assert math.isnan(result.ap07[name]) and math.isnan(result.ap12[name])
        else:
            assert abs(result.ap07[name] - ap07) < 1e-12
            assert abs(result.ap12[name] - ap12) < 1e-12


def test_matches_devkit_loop_with_small_padded_blocks(monkeypatch):
    # Force many chunks in the padded IoU computation; results must not depend on the block size.
    import utils.voc_eval as voc_eval

    monkeypatch.setattr(voc_eval, "_MAX_BLOCK_ELEMENTS", 7)
    names = ["a", "b", "c"]
    dets, gts = random_case(123, n_images=30, max_gt=6)
    result = evaluate_voc(dets, gts, names)
    expected = reference_voc_eval(dets, gts, names)
    for name in names:
        assert result.precision[name].tolist() == expected[name][3]
        assert result.recall[name].tolist() == expected[name][2]


# ---------------------------------------------------------------------------------------------------
# inputs and outputs
# ---------------------------------------------------------------------------------------------------


def test_format_table_lists_classes_and_means():
    result = evaluate_voc(
        [det_image("x", [[1, 1, 10, 10]], [1], [0.9])],
        [gt_image("x", [[1, 1, 10, 10], [31, 31, 50, 50]], [1, 2])],
        ["cat", "dog", "bird"],
    )
    table = result.format_table()
    lines = table.splitlines()
    assert lines[0].split() == ["class", "n_gt", "n_det", "recall", "AP07", "AP12"]
    assert lines[2].split() == ["cat", "1", "1", "1.0000", "1.0000", "1.0000"]
    assert lines[3].split() == ["dog", "1", "0", "0.0000", "0.0000", "0.0000"]
    assert lines[4].split() == ["bird", "0", "0", "n/a", "n/a", "n/a"]
    assert lines[-1].split() == ["mean", "0.5000", "0.5000"]


def test_rejects_unknown_and_duplicate_images():
    gts = [gt_image("x", [[1, 1, 10, 10]], [1])]
    with pytest.raises(EvaluationInputError, match="'nope'.*no ground-truth entry"):
        evaluate_voc([det_image("nope", [[1, 1, 2, 2]], [1], [0.5])], gts, ["cat"])
    with pytest.raises(EvaluationInputError, match="'x' appears twice in the detections"):
        evaluate_voc([det_image("x", [], [], []), det_image("x", [], [], [])], gts, ["cat"])
    with pytest.raises(EvaluationInputError, match="'x' appears twice in the ground truth"):
        evaluate_voc([], gts + gts, ["cat"])


def test_rejects_labels_out_of_range():
    gts = [gt_image("x", [[1, 1, 10, 10]], [1])]
    with pytest.raises(EvaluationInputError, match="'x': detection label 3 is outside 1..2"):
        evaluate_voc([det_image("x", [[1, 1, 2, 2]], [3], [0.5])], gts, ["cat", "dog"])
    with pytest.raises(EvaluationInputError, match="'y': ground-truth label 0 is outside 1..2"):
        evaluate_voc([], [gt_image("y", [[1, 1, 10, 10]], [0])], ["cat", "dog"])


def test_rejects_bad_arrays_and_threshold():
    with pytest.raises(EvaluationInputError, match=r"'x': detection boxes must have shape \(n, 4\)"):
        ImageDetections("x", np.zeros((2, 3)), np.ones(2, np.int64), np.ones(2))
    with pytest.raises(EvaluationInputError, match=r"'x': detection scores must have shape \(2,\)"):
        ImageDetections("x", np.ones((2, 4)), np.ones(2, np.int64), np.ones(3))
    with pytest.raises(EvaluationInputError, match="'x': detection scores contain NaN"):
        ImageDetections("x", np.ones((1, 4)), np.ones(1, np.int64), np.array([np.nan]))
    with pytest.raises(EvaluationInputError, match="'x': ground-truth labels must be integers"):
        ImageGroundTruth("x", np.ones((1, 4)), np.array([1.5]), np.zeros(1, bool), 10, 10)
    with pytest.raises(EvaluationInputError, match="'x': ground-truth box 0 .* xmax < xmin - 1"):
        ImageGroundTruth("x", np.array([[10.0, 1, 5, 5]]), np.ones(1, np.int64), np.zeros(1, bool), 10, 10)
    # An empty box (continuous width 0, xmax == xmin - 1) is legal and overlaps nothing.
    empty = ImageDetections("x", np.array([[5.0, 5, 4, 4]]), np.ones(1, np.int64), np.ones(1))
    result = evaluate_voc([empty], [gt_image("x", [[1, 1, 10, 10]], [1])], ["cat"])
    assert result.precision["cat"].tolist() == [0.0]
    with pytest.raises(EvaluationInputError, match="iou_threshold must be in"):
        evaluate_voc([], [], ["cat"], iou_threshold=0.0)
    with pytest.raises(EvaluationInputError, match="class_names is empty"):
        evaluate_voc([], [], [])


def test_voc_ap_11_point_thresholds_are_matlabs_so_a_recall_of_exactly_three_tenths_misses_the_fourth():
    # MATLAB's 0:0.1:1 holds 0.30000000000000004, which a recall of 3/10 (0.3) does not reach: for the
    # devkit no point counts from that threshold on, where exact tenths would count the precision 1.0.
    recall, precision = [0.1, 0.2, 0.3, 0.3, 0.3], [1.0, 1.0, 1.0, 0.75, 0.6]
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx(3 / 11, abs=1e-15)
    assert DEVKIT_11_POINT_THRESHOLDS[3] > 3 / 10 and DEVKIT_11_POINT_THRESHOLDS[6:8] == (0.6, 0.7)


def test_voc_ap_11_point_of_a_perfect_curve_is_exactly_one():
    # Eleven additions of 1/11 make 1.0000000000000002, which a metrics file would then report.
    assert voc_ap(np.array([1.0]), np.array([1.0]), use_07_metric=True) == 1.0


def test_tie_break_orders_equal_scores_within_a_class():
    ground_truth = [gt_image("1", [[11, 11, 40, 40]], [1]), gt_image("2", [[11, 11, 40, 40]], [1])]
    hit, miss = [[11, 11, 40, 40]], [[60, 60, 90, 90]]
    # The same two equal-scored detections: a miss in image 1, a hit in image 2.
    def detections(tie_breaks):
        return [ImageDetections("1", np.array(miss, float), np.array([1]), np.array([0.5]), tie_breaks[0]),
                ImageDetections("2", np.array(hit, float), np.array([1]), np.array([0.5]), tie_breaks[1])]

    # Input order: the miss ranks first, precision 1/2 at recall 1/2.
    assert evaluate_voc(detections([None, None]), ground_truth, ["a"]).voc12_map == pytest.approx(0.25)
    # A tie-break that puts the hit first (as its line would in a results file): precision 1 at recall 1/2.
    ranked = detections([np.array([1]), np.array([0])])
    assert evaluate_voc(ranked, ground_truth, ["a"]).voc12_map == pytest.approx(0.5)
    with pytest.raises(EvaluationInputError, match="either every ImageDetections has a tie_break or none"):
        evaluate_voc(detections([np.array([1]), None]), ground_truth, ["a"])


def test_a_perfect_detection_of_a_box_under_one_pixel_wide_scores_one():
    from pathlib import Path

    from data.records import ImageRecord
    from utils.engine import ground_truth_from_records, to_devkit_boxes

    # COCO boxes keep any positive width, and clipping at the border leaves slivers like the first one.
    boxes = np.array([[99.6, 10, 100, 40], [20, 10, 20.5, 40], [50, 50, 70, 70]], np.float32)
    record = ImageRecord("1", Path("1.jpg"), 100, 100, boxes, np.array([1, 1, 1]), np.zeros(3, bool))
    (truth,) = ground_truth_from_records([record])
    detected = to_devkit_boxes(boxes / np.float32(100), 100, 100)
    np.testing.assert_allclose(detected, truth.boxes, atol=1e-4)
    result = evaluate_voc([det_image("1", detected, [1, 1, 1], [0.9, 0.8, 0.7])], [truth], ["a"])
    assert result.voc07_map == 1.0 and result.voc12_map == 1.0
