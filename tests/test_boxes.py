"""Box conversions and prior-relative coding."""

import math

import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from utils.boxes import aligned_iou, cxcywh_to_xyxy, decode_boxes, encode_boxes, pairwise_iou, xyxy_to_cxcywh


def random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 0.7
    wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.01
    return torch.cat([xy, xy + wh], dim=1)


def test_format_conversions_hand_computed():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.8]])
    cxcywh = torch.tensor([[0.3, 0.5, 0.4, 0.6]])
    assert torch.allclose(xyxy_to_cxcywh(xyxy), cxcywh)
    assert torch.allclose(cxcywh_to_xyxy(cxcywh), xyxy)


def test_encode_hand_computed():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    box = torch.tensor([[0.4, 0.4, 0.8, 0.6]])  # centre (0.6, 0.5), size (0.4, 0.2)
    expected = torch.tensor([[0.1 / (0.1 * 0.2), 0.0, math.log(2.0) / 0.2, 0.0]])
    assert torch.allclose(encode_boxes(box, prior), expected, atol=1e-5)
    assert torch.allclose(decode_boxes(expected, prior), box, atol=1e-6)


def test_round_trip_batched():
    g = torch.Generator().manual_seed(0)
    priors = xyxy_to_cxcywh(random_boxes(50, g))
    boxes = random_boxes(3 * 50, g).view(3, 50, 4)
    offsets = encode_boxes(boxes, priors)
    assert offsets.shape == (3, 50, 4)
    assert torch.allclose(decode_boxes(offsets, priors), boxes, atol=1e-5)


def test_matches_torchvision_boxcoder():
    # Variances (0.1, 0.2) are BoxCoder weights (10, 10, 5, 5).
    g = torch.Generator().manual_seed(1)
    priors_xyxy, boxes = random_boxes(20, g), random_boxes(20, g)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    expected = coder.encode_single(boxes, priors_xyxy)
    assert torch.allclose(encode_boxes(boxes, xyxy_to_cxcywh(priors_xyxy)), expected, atol=1e-4)


def test_decode_never_overflows():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    offsets = torch.tensor([[[0.0, 0.0, 1e4, -1e4]]])
    boxes = decode_boxes(offsets, priors)
    assert torch.isfinite(boxes).all()
    # width clamped at 0.2 * 1000 / 16 = 12.5; height underflows to 0
    assert math.isclose(float(boxes[0, 0, 2] - boxes[0, 0, 0]), 12.5, rel_tol=1e-5)
    assert float(boxes[0, 0, 3] - boxes[0, 0, 1]) == 0.0


def test_pairwise_iou_equals_torchvision():
    g = torch.Generator().manual_seed(2)
    a, b = random_boxes(37, g), random_boxes(23, g)
    a[0] = b[0]  # one identical pair: IoU exactly 1
    iou = pairwise_iou(a, b)
    assert iou.shape == (37, 23)
    assert torch.allclose(iou, box_iou(a, b), atol=1e-6)
    assert iou[0, 0] == 1.0
    # hand-computed: half-overlapping unit squares -> 0.5 / 1.5; disjoint -> 0
    squares = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    others = torch.tensor([[0.5, 0.0, 1.5, 1.0], [2.0, 2.0, 3.0, 3.0]])
    assert torch.allclose(pairwise_iou(squares, others), torch.tensor([[1 / 3, 0.0]]))
    assert pairwise_iou(torch.zeros(0, 4), b).shape == (0, 23)


def test_aligned_iou_pairs_boxes_position_by_position():
    g = torch.Generator().manual_seed(3)
    a, b = random_boxes(5, g), random_boxes(5, g)
    assert torch.allclose(aligned_iou(a, b), box_iou(a, b).diagonal(), atol=1e-6)
    # each of 5 boxes against its own 7 boxes
    own = torch.stack([random_boxes(7, g) for _ in range(5)])  # (5, 7, 4)
    iou = aligned_iou(a[:, None, :], own)
    assert iou.shape == (5, 7)
    for k in range(5):
        assert torch.allclose(iou[k], box_iou(a[k:k + 1], own[k])[0], atol=1e-6)
    # hand-computed: a unit square against itself, a half-overlapping one and a disjoint one
    square = torch.tensor([0.0, 0.0, 1.0, 1.0])
    others = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0], [2.0, 2.0, 3.0, 3.0]])
    assert torch.allclose(aligned_iou(square, others), torch.tensor([1.0, 1 / 3, 0.0]))
