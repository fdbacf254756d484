"""Post-processing against hand-computed cases and a naive per-class NMS loop."""

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import utils.postprocess as postprocess
from model.priors import create_prior_boxes
from utils.boxes import cxcywh_to_xyxy, decode_boxes, encode_boxes
from utils.postprocess import PostprocessError, detect_objects


def naive_detect_objects(locs, scores, priors_cxcywh, *, min_score=0.01, max_overlap=0.45, top_k=200,
                         variances=(0.1, 0.2), activation="softmax", box_voting_iou=None):
    """Per image, per class, greedy NMS one box at a time, then (optionally) each kept box replaced by the
    mean of its class's candidate boxes that overlap it by >= box_voting_iou, one box at a time.
    Returns a list of (boxes, labels, scores)."""
    results = []
    for i in range(locs.shape[0]):
        if activation == "softmax":
            probs = scores[i].float().softmax(dim=-1)
        else:
            probs = torch.cat([torch.zeros_like(scores[i][:, :1]), scores[i][:, 1:].float().sigmoid()], 1)
        boxes = decode_boxes(locs[i].float(), priors_cxcywh, variances).clamp(0, 1)
        kept_boxes, kept_labels, kept_scores = [], [], []
        for c in range(1, scores.shape[2]):
            above = probs[:, c] > min_score
            if not above.any():
                continue
            class_scores, order = probs[above, c].sort(descending=True)
            class_boxes = boxes[above][order]
            overlap = box_iou(class_boxes, class_boxes)
            suppress = torch.zeros(len(class_boxes), dtype=torch.bool, device=class_boxes.device)
            for b in range(len(class_boxes)):
                if suppress[b]:
                    continue
                suppress |= overlap[b] > max_overlap
                suppress[b] = False
            survivors = class_boxes[~suppress].clone()
            if box_voting_iou is not None:
                for b in range(len(survivors)):
                    voters = box_iou(survivors[b:b + 1], class_boxes)[0] >= box_voting_iou
                    survivors[b] = class_boxes[voters].mean(dim=0)
            kept_boxes.append(survivors)
            kept_labels.append(torch.full((int((~suppress).sum()),), c, dtype=torch.long, device=boxes.device))
            kept_scores.append(class_scores[~suppress])
        if not kept_boxes:
            results.append((boxes.new_zeros(0, 4), torch.zeros(0, dtype=torch.long, device=boxes.device),
                            probs.new_zeros(0)))
            continue
        image_scores, order = torch.cat(kept_scores).sort(descending=True)
        order = order[:top_k]
        results.append((torch.cat(kept_boxes)[order], torch.cat(kept_labels)[order], image_scores[:top_k]))
    return results


def hand_case():
    # Priors 0 and 1 nearly coincide (IoU 0.9), prior 2 is elsewhere; zero offsets decode to the priors.
    priors = torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.32, 0.3, 0.4, 0.4], [0.8, 0.8, 0.2, 0.2]])
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 2.0, 0.0], [0.0, -5.0, 2.0]])
    background = torch.tensor([[10.0, 0.0, 0.0]]).expand(3, 3)
    scores = torch.stack([logits, logits, background])
    return torch.zeros(3, 3, 4), scores, priors


def test_hand_computed_nms():
    locs, scores, priors = hand_case()
    dets = detect_objects(locs, scores, priors, min_score=0.2)
    assert len(dets) == 3
    p1 = math.exp(3) / (math.exp(3) + 2)  # prior 0, class 1; prior 1 (class 1, 0.79) is suppressed
    p2 = math.exp(2) / (1 + math.exp(-5) + math.exp(2))  # prior 2, class 2
    for det in dets[:2]:  # images never suppress each other
        assert det.labels.tolist() == [1, 2]
        assert torch.allclose(det.scores, torch.tensor([p1, p2]), atol=1e-6)
        assert torch.allclose(det.boxes, cxcywh_to_xyxy(priors[[0, 2]]), atol=1e-6)
    # only background: empty tensors, not a fake background box
    assert dets[2].boxes.shape == (0, 4) and dets[2].labels.shape == (0,) and dets[2].scores.shape == (0,)
    assert dets[2].labels.dtype == torch.long


def test_other_classes_do_not_suppress():
    locs, scores, priors = hand_case()
    # at min_score 0.1 prior 1's class 2 score (1 / (e^2 + 2) = 0.106) passes; it overlaps prior 0's
    # class 1 box but belongs to another class, so it stays
    dets = detect_objects(locs, scores, priors, min_score=0.1)
    assert dets[0].labels.tolist() == [1, 2, 2]
    assert math.isclose(dets[0].scores[2].item(), 1 / (math.exp(2) + 2), rel_tol=1e-5)


def test_nothing_above_threshold_gives_empty_batch():
    locs, scores, priors = hand_case()
    dets = detect_objects(locs, scores, priors, min_score=0.99)
    assert [d.boxes.shape[0] for d in dets] == [0, 0, 0]


def test_boxes_clipped_to_unit_square():
    priors = torch.tensor([[0.05, 0.95, 0.2, 0.2]])
    locs = torch.tensor([[[0.0, 0.0, 5.0, 5.0]]])  # 0.2 * e^1 = 0.54 wide, past the image corner
    dets = detect_objects(locs, torch.tensor([[[0.0, 5.0]]]), priors)
    box = dets[0].boxes[0]
    assert box.min() >= 0 and box.max() <= 1
    assert box[0] == 0 and box[3] == 1


def test_hand_computed_box_voting():
    locs, scores, priors = hand_case()
    # Class 1: prior 0 (kept) and prior 1 (suppressed, IoU 0.905) both vote, so the box is centred at
    # x = (0.3 + 0.32) / 2 = 0.31. Class 2 at prior 2 has no other candidate of its class near it.
    dets = detect_objects(locs, scores, priors, min_score=0.2, box_voting_iou=0.5)
    for det in dets[:2]:
        assert det.labels.tolist() == [1, 2]
        assert torch.allclose(det.boxes, torch.tensor([[0.11, 0.1, 0.51, 0.5], [0.7, 0.7, 0.9, 0.9]]), atol=1e-6)
        assert torch.allclose(det.scores, detect_objects(locs, scores, priors, min_score=0.2)[0].scores)
    # above the pair's IoU of 0.905, prior 1 no longer votes
    dets = detect_objects(locs, scores, priors, min_score=0.2, box_voting_iou=0.95)
    assert torch.allclose(dets[0].boxes, cxcywh_to_xyxy(priors[[0, 2]]), atol=1e-6)
    # at min_score 0.1, prior 1's class 2 candidate is a detection of its own; prior 0 overlaps it by 0.905
    # but votes only for class 1 (its class 2 score, 0.045, is below min_score)
    dets = detect_objects(locs, scores, priors, min_score=0.1, box_voting_iou=0.5)
    assert dets[0].labels.tolist() == [1, 2, 2]
    assert torch.allclose(dets[0].boxes[2], cxcywh_to_xyxy(priors[1]), atol=1e-6)


@pytest.mark.parametrize("box_voting_iou", [None, 0.5])
def test_a_box_clipped_to_zero_area_is_no_detection(box_voting_iou):
    # The first prior lies right of the image: its box clips to a line, which can match no object, and whose
    # IoU with a copy of itself is 0 / 0, so NMS would never suppress its copies.
    priors = torch.tensor([[1.2, 0.5, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]])
    dets = detect_objects(torch.zeros(1, 2, 4), torch.tensor([[[0.0, 5.0], [0.0, 4.0]]]), priors,
                          box_voting_iou=box_voting_iou)
    assert dets[0].boxes.tolist() == [pytest.approx([0.4, 0.4, 0.6, 0.6])]
    # offsets that throw every box off the image: nothing, rather than top_k copies of one corner point
    locs = torch.full((2, 441, 4), 1e4)
    dets = detect_objects(locs, torch.randn(2, 441, 21), create_prior_boxes(), box_voting_iou=box_voting_iou)
    assert [len(d.boxes) for d in dets] == [0, 0]


def test_bad_parameters_are_refused_by_name():
    locs, scores, priors = torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)
    for kwargs, message in [({"min_score": math.nan}, "min_score must be a number in"),
                            ({"min_score": -0.1}, "min_score"), ({"min_score": 1.5}, "min_score"),
                            ({"max_overlap": math.nan}, "max_overlap must be a number in"),
                            ({"max_overlap": -1}, "max_overlap"), ({"top_k": 2.5}, "top_k must be an integer"),
                            ({"top_k": 0}, "top_k"), ({"top_k": True}, "top_k"),
                            ({"candidates_per_image": 3.0}, "candidates_per_image must be an integer"),
                            ({"box_voting_iou": math.nan}, "box_voting_iou")]:
        with pytest.raises(PostprocessError, match=message):
            detect_objects(locs, scores, priors, **kwargs)
    assert len(detect_objects(locs, scores, priors, top_k=np.int64(3), min_score=0, max_overlap=1)) == 1


def test_box_voting_in_chunks_equals_all_at_once():
    g = torch.Generator().manual_seed(2)
    priors = create_prior_boxes()
    boxes = decode_boxes(torch.randn(3, 441, 4, generator=g) * 0.3, priors).clamp(0, 1)
    class_scores = torch.rand(3, 441, 4, generator=g)
    image_idx = torch.tensor([0, 0, 1, 2, 2, 2])
    prior_idx = torch.tensor([5, 200, 17, 0, 440, 100])
    class_idx = torch.tensor([0, 3, 1, 2, 2, 0])
    args = (boxes, class_scores, image_idx, prior_idx, class_idx, 0.3, 0.5)
    whole = postprocess.vote_boxes(*args)
    assert torch.allclose(postprocess.vote_boxes(*args, max_pairs=441), whole)  # one detection per chunk
    assert torch.allclose(postprocess.vote_boxes(*args, max_pairs=3 * 441), whole)
    assert not torch.allclose(whole, boxes[image_idx, prior_idx])  # the vote moved the boxes


@pytest.mark.parametrize(("activation", "top_k", "box_voting_iou"),
                         [("softmax", 200, None), ("softmax", 7, None), ("sigmoid", 50, None),
                          ("softmax", 200, 0.5), ("sigmoid", 50, 0.7)])  # fmt: skip
def test_equals_naive_nms_on_random_boxes(activation, top_k, box_voting_iou):
    g = torch.Generator().manual_seed(0)
    priors = create_prior_boxes()
    locs = torch.randn(3, 441, 4, generator=g) * 0.5
    scores = torch.randn(3, 441, 5, generator=g) * 2
    scores[1, :, 0], scores[1, :, 1:] = 20.0, -20.0  # one image with nothing above min_score
    dets = detect_objects(locs, scores, priors, min_score=0.05, max_overlap=0.45, top_k=top_k,
                          activation=activation, box_voting_iou=box_voting_iou)
    expected = naive_detect_objects(locs, scores, priors, min_score=0.05, max_overlap=0.45, top_k=top_k,
                                    activation=activation, box_voting_iou=box_voting_iou)
    assert dets[1].boxes.shape[0] == 0
    for det, (boxes, labels, scores_) in zip(dets, expected, strict=True):
        assert det.labels.tolist() == labels.tolist()
        assert torch.allclose(det.scores, scores_, atol=1e-6)
        assert torch.allclose(det.boxes, boxes, atol=1e-6)
    assert max(d.boxes.shape[0] for d in dets) <= top_k
    assert dets[0].boxes.shape[0] > 0


@pytest.fixture(scope="module")
def six_images():
    """Six random images with 3 classes and their naive top-7 detections (computed once: slow loop)."""
    g = torch.Generator().manual_seed(4)
    priors = create_prior_boxes()
    locs = torch.randn(6, 441, 4, generator=g) * 0.3
    scores = torch.randn(6, 441, 4, generator=g)
    return locs, scores, priors, naive_detect_objects(locs, scores, priors, top_k=7)


@pytest.mark.parametrize(("candidates_per_image", "nms_calls"), [(7, 2), (9, 1), (30, 1), (100_000, 1)])
def test_candidate_limit_never_changes_the_result(monkeypatch, six_images, candidates_per_image, nms_calls):
    # top_k 7: with a limit of 7, two of the six images keep fewer than 7 survivors and are rerun on all
    # their candidates (a second NMS pass); 9 and 30 are enough; 100 000 is no limit at all.
    calls = []
    original = postprocess._batched_class_nms

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(postprocess, "_batched_class_nms", counting)
    locs, scores, priors, expected = six_images
    dets = detect_objects(locs, scores, priors, top_k=7, candidates_per_image=candidates_per_image)
    assert len(calls) == nms_calls
    for det, (boxes, labels, scores_) in zip(dets, expected, strict=True):
        assert det.labels.tolist() == labels.tolist()
        assert torch.allclose(det.scores, scores_, atol=1e-6)
        assert torch.allclose(det.boxes, boxes, atol=1e-6)
        assert len(det.labels) == 7


def test_reruns_grow_until_every_candidate_is_seen(monkeypatch):
    # 100 identical priors: one survivor per class, so 3 < top_k survivors whatever the limit. The limit
    # grows 7 -> 28 -> 112 -> 300 (all pairs): four NMS passes, and the best box of each class comes out.
    calls = []
    original = postprocess._batched_class_nms
    monkeypatch.setattr(postprocess, "_batched_class_nms", lambda *a: calls.append(a[2]) or original(*a))
    g = torch.Generator().manual_seed(5)
    priors = torch.tensor([[0.5, 0.5, 0.3, 0.3]]).expand(100, 4)
    scores = torch.randn(2, 100, 4, generator=g)
    dets = detect_objects(torch.zeros(2, 100, 4), scores, priors, top_k=7, candidates_per_image=7)
    assert calls == [7, 28, 112, 300]
    expected = naive_detect_objects(torch.zeros(2, 100, 4), scores, priors, top_k=7)
    for det, (_, labels, scores_) in zip(dets, expected, strict=True):
        assert sorted(det.labels.tolist()) == [1, 2, 3]
        assert det.labels.tolist() == labels.tolist()
        assert torch.allclose(det.scores, scores_)


def test_bad_inputs():
    locs, scores, priors = hand_case()
    with pytest.raises(PostprocessError, match="priors_cxcywh"):
        detect_objects(locs, scores, priors[:2])
    with pytest.raises(PostprocessError, match="activation"):
        detect_objects(locs, scores, priors, activation="relu")
    with pytest.raises(PostprocessError, match="top_k"):
        detect_objects(locs, scores, priors, top_k=0)
    with pytest.raises(PostprocessError, match="candidates_per_image"):
        detect_objects(locs, scores, priors, top_k=5, candidates_per_image=4)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(PostprocessError, match="box_voting_iou"):
            detect_objects(locs, scores, priors, box_voting_iou=bad)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("field", ["locs", "scores"])
def test_non_finite_model_outputs_are_named(field, value):
    locs, scores, priors = hand_case()  # 3 images
    # A NaN box survives the clamp to [0, 1]; a NaN score drops out of every comparison, unseen.
    (locs if field == "locs" else scores)[1, 0, 0] = value
    with pytest.raises(PostprocessError, match=r"NaN or infinite values for images \[1\] of the batch \(1 of 3\)"):
        detect_objects(locs, scores, priors)


def test_an_image_is_suppressed_the_same_wherever_it_sits_in_the_batch():
    # Two class-20 boxes 0.02 wide overlapping by IoU 0.45008, just above max_overlap 0.45: NMS keeps one.
    # batched_nms shifts each (image, class) group by its index; in float32, image 15's shift of ~670 blurred
    # the IoU below the threshold and both boxes were kept.
    priors = create_prior_boxes()
    first = torch.tensor([0.5, 0.5, 0.52, 0.52])
    low, high = 0.0, 0.006
    for _ in range(60):  # the shift of a copy that overlaps it by IoU just above 0.45008
        mid = (low + high) / 2
        low, high = (mid, high) if float(box_iou(first[None], (first + mid)[None])) > 0.45008 else (low, mid)
    locs = torch.zeros(1, 441, 4)
    scores = torch.full((1, 441, 21), -10.0)
    locs[0, 0] = encode_boxes(first[None], priors[:1])[0]
    locs[0, 1] = encode_boxes((first + low)[None], priors[1:2])[0]
    scores[0, 0, 20], scores[0, 1, 20] = 10.0, 9.0
    assert len(detect_objects(locs, scores, priors, min_score=0.5)[0].scores) == 1
    batch = detect_objects(locs.expand(16, -1, -1).contiguous(), scores.expand(16, -1, -1).contiguous(), priors,
                           min_score=0.5)
    assert [len(d.scores) for d in batch] == [1] * 16


def test_an_empty_batch_gives_no_detections():
    # reshape(n, -1, ...) cannot infer a size from 0 elements: the model and post-processing failed deep inside.
    from model.detector import TinyDetector

    model = TinyDetector(4, width_mult=0.125).eval()
    with torch.no_grad():
        locs, scores = model(torch.zeros(0, 3, 224, 224))
    assert locs.shape == (0, 441, 4) and scores.shape == (0, 441, 4)
    assert model.detect_objects(locs, scores) == []
    assert detect_objects(torch.zeros(0, 441, 4), torch.zeros(0, 441, 21), create_prior_boxes()) == []
