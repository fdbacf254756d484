"""Batched prior matching: forced best priors, competition for a prior, padding, empty images."""

import pytest
import torch

from utils.boxes import xyxy_to_cxcywh
from utils.matching import TargetError, match_priors, pad_targets

# Three priors: top-left quarter, bottom-right quarter, whole image.
PRIORS_XYXY = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
PRIORS = xyxy_to_cxcywh(PRIORS_XYXY)


def match(boxes, labels, threshold=0.5):
    padded = pad_targets(boxes, labels)
    return match_priors(*padded, PRIORS, threshold)


def test_pad_targets_layout():
    boxes = [torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]]), torch.zeros(0, 4),
             torch.tensor([[0.5, 0.5, 0.9, 0.9]])]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([3])]
    padded, padded_labels, valid = pad_targets(boxes, labels)
    assert padded.shape == (3, 2, 4)
    assert padded_labels.tolist() == [[1, 2], [0, 0], [3, 0]]
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(padded[0], boxes[0])
    assert torch.equal(padded[2, 0], boxes[2][0])
    assert torch.count_nonzero(padded[1]) == 0


def test_pad_targets_all_empty_keeps_one_slot():
    empty_labels = [torch.zeros(0, dtype=torch.long)] * 2
    padded, padded_labels, valid = pad_targets([torch.zeros(0, 4)] * 2, empty_labels)
    assert padded.shape == (2, 1, 4) and padded_labels.shape == (2, 1)
    assert not valid.any()


def test_pad_targets_errors_name_the_image():
    with pytest.raises(TargetError, match=r"boxes\[1\]"):
        pad_targets([torch.zeros(1, 4), torch.zeros(2, 3)], [torch.ones(1, dtype=torch.long)] * 2)
    with pytest.raises(TargetError, match=r"labels\[0\] must hold integers"):
        pad_targets([torch.zeros(1, 4)], [torch.ones(1)])
    with pytest.raises(TargetError, match=r"labels\[0\]"):
        pad_targets([torch.zeros(2, 4)], [torch.ones(3, dtype=torch.long)])
    with pytest.raises(TargetError, match="2 box tensors but 1 label"):
        pad_targets([torch.zeros(1, 4)] * 2, [torch.ones(1, dtype=torch.long)])


def test_best_prior_below_threshold_is_still_positive():
    # IoU with prior 0 = 0.04 / 0.25 = 0.16, with prior 2 = 0.04, with prior 1 = 0: all < 0.5.
    m = match([torch.tensor([[0.0, 0.0, 0.2, 0.2]])], [torch.tensor([7])])
    assert m.labels.tolist() == [[7, 0, 0]]
    assert m.forced.tolist() == [[True, False, False]]
    assert torch.allclose(m.iou, torch.tensor([[0.16, 0.0, 0.04]]))
    assert m.gt_index[0, 0] == 0


def test_threshold_match_besides_forced():
    # Box covers the top-left quarter plus a bit: IoU prior 0 = 0.25 / 0.3 = 0.833 (forced),
    # prior 2 = 0.3 (< 0.5, background); with threshold 0.25 prior 2 becomes positive too.
    box = [torch.tensor([[0.0, 0.0, 0.6, 0.5]])]
    assert match(box, [torch.tensor([1])]).labels.tolist() == [[1, 0, 0]]
    m = match(box, [torch.tensor([1])], threshold=0.25)
    assert m.labels.tolist() == [[1, 0, 1]]
    assert m.forced.tolist() == [[True, False, False]]


def test_two_boxes_compete_for_one_prior():
    # Both boxes' best prior is prior 0: box A has IoU 1.0 with it, box B 0.2 / 0.25 = 0.8.
    # A wins (higher IoU). B's next choice, prior 2, has IoU 0.2 < 0.5: B gets no prior.
    boxes = [torch.tensor([[0.0, 0.0, 0.4, 0.5], [0.0, 0.0, 0.5, 0.5]])]
    m = match(boxes, [torch.tensor([4, 9])])
    assert m.labels.tolist() == [[9, 0, 0]]
    assert m.gt_index[0, 0] == 1
    assert m.forced.tolist() == [[True, False, False]]


def test_equal_claims_go_to_the_first_box():
    same = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]])
    m = match([same], [torch.tensor([5, 6])])
    assert m.labels.tolist() == [[5, 0, 0]]
    m = match([same.flip(0)], [torch.tensor([6, 5])])
    assert m.labels.tolist() == [[6, 0, 0]]
    # equal IoUs above the threshold (prior 2: 0.3 for both boxes) also go to the first box
    wide = torch.tensor([[0.0, 0.0, 0.6, 0.5], [0.0, 0.0, 0.6, 0.5]])
    m = match([wide], [torch.tensor([5, 6])], threshold=0.25)
    assert m.labels.tolist() == [[5, 0, 5]]
    assert m.forced.tolist() == [[True, False, False]]


def test_competition_decided_by_iou_not_by_order():
    # Both boxes' best prior is prior 2 (whole image): A with IoU 0.81, C with IoU 0.9. C wins although
    # it comes second. Priors 0 and 1 overlap both boxes by < 0.3: background.
    a = [0.05, 0.05, 0.95, 0.95]
    c = [0.0, 0.0, 1.0, 0.9]
    m = match([torch.tensor([a, c])], [torch.tensor([1, 2])])
    assert m.labels.tolist() == [[0, 0, 2]]
    assert m.gt_index[0, 2] == 1
    assert torch.allclose(m.iou[0, 2], torch.tensor(0.9))


def test_batch_with_empty_images():
    boxes = [torch.zeros(0, 4), torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.zeros(0, 4)]
    labels = [torch.zeros(0, dtype=torch.long), torch.tensor([3]), torch.zeros(0, dtype=torch.long)]
    m = match(boxes, labels)
    assert m.labels.tolist() == [[0, 0, 0], [0, 3, 0], [0, 0, 0]]
    assert not m.forced[0].any() and not m.forced[2].any()
    assert (m.iou[0] == -1).all()


def test_batch_of_only_empty_images():
    m = match([torch.zeros(0, 4)] * 3, [torch.zeros(0, dtype=torch.long)] * 3)
    assert m.labels.shape == (3, 3)
    assert not m.positive.any()


def test_batched_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(0)
    from model.priors import create_prior_boxes

    priors = create_prior_boxes()
    boxes, labels = [], []
    for n in (0, 3, 10, 1):
        xy = torch.rand(n, 2, generator=g) * 0.6
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.4 + 0.02], 1))
        labels.append(torch.randint(1, 21, (n,), generator=g))
    batched = match_priors(*pad_targets(boxes, labels), priors)
    for i in range(len(boxes)):
        single = match_priors(*pad_targets(boxes[i:i + 1], labels[i:i + 1]), priors)
        assert torch.equal(batched.labels[i], single.labels[0])
        assert torch.equal(batched.positive[i], single.positive[0])
    assert (batched.forced.sum(1) <= torch.tensor([len(b) for b in boxes])).all()
