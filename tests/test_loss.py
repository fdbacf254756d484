"""MultiBoxLoss against hand-computed values and a straightforward per-image reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from model.loss import LossInputError, MultiBoxLoss, hard_negative_mask, score_activation_for
from model.priors import create_prior_boxes
from tests.test_matching import reference_atss_assign
from utils.boxes import xyxy_to_cxcywh
from utils.matching import TargetError

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
# Three priors: top-left quarter, bottom-right quarter, whole image.
PRIORS = xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))


def reference_multibox_loss(locs, scores, boxes, labels, priors_cxcywh, *, threshold=0.5, neg_pos_ratio=3,
                            alpha=1.0, variances=(0.1, 0.2), classification="hard_negative",
                            focal_gamma=2.0, focal_alpha=0.25, ignore_threshold=None, matching="iou",
                            atss_candidates=36):
    """One image and one box at a time, every formula written out. Returns (total, loc, conf, n_pos)."""
    priors_xyxy = torch.cat([priors_cxcywh[:, :2] - priors_cxcywh[:, 2:] / 2,
                             priors_cxcywh[:, :2] + priors_cxcywh[:, 2:] / 2], dim=1)
    n_priors, n_classes = scores.shape[1], scores.shape[2]
    if ignore_threshold is None:
        ignore_threshold = math.inf if classification == "hard_negative" else min(0.4, threshold)  # inf: no band
    loc_sum, conf_sum, n_pos_total = torch.zeros(()), torch.zeros(()), 0
    for i in range(locs.shape[0]):
        target = torch.zeros(n_priors, dtype=torch.long)
        target_boxes = priors_xyxy.clone()
        best_iou = torch.full((n_priors,), -1.0)
        positive = torch.zeros(n_priors, dtype=torch.bool)
        if len(boxes[i]):
            iou = box_iou(boxes[i], priors_xyxy)
            best_iou, assigned = iou.max(dim=0)
            if matching == "atss":
                positive, assigned = reference_atss_assign(boxes[i], priors_cxcywh, atss_candidates)
            else:
                positive = best_iou >= threshold
                claimed = {}  # prior -> box; the highest IoU wins, the first box on equal IoU
                for m in range(len(boxes[i])):
                    p = int(iou[m].argmax())
                    if p not in claimed or iou[m, p] > iou[claimed[p], p]:
                        claimed[p] = m
                for p, m in claimed.items():
                    assigned[p] = m
                    positive[p] = True
            target = torch.where(positive, labels[i][assigned], 0)
            target_boxes[positive] = boxes[i][assigned[positive]]
        n_pos = int(positive.sum())
        n_pos_total += n_pos

        pb, pp = target_boxes[positive], priors_cxcywh[positive]
        centre, size = (pb[:, :2] + pb[:, 2:]) / 2, pb[:, 2:] - pb[:, :2]
        g = torch.cat([(centre - pp[:, :2]) / (variances[0] * pp[:, 2:]),
                       torch.log(size / pp[:, 2:]) / variances[1]], dim=1)
        d = (locs[i][positive] - g).abs()
        loc_sum = loc_sum + torch.where(d < 1, 0.5 * d**2, d - 0.5).sum()

        log_probs = F.log_softmax(scores[i], dim=-1)
        keep = positive | (best_iou < ignore_threshold)
        if classification == "hard_negative":
            ce = -log_probs[torch.arange(n_priors), target]
            neg_ce = ce[~positive & keep]
            k = min(int(neg_pos_ratio * n_pos), neg_ce.numel())
            conf_sum = conf_sum + ce[positive].sum() + neg_ce.sort(descending=True).values[:k].sum()
        elif classification == "focal_sigmoid":
            x = scores[i][:, 1:]
            t = F.one_hot(target, n_classes)[:, 1:].float()
            p = torch.sigmoid(x)
            ce = -(t * F.logsigmoid(x) + (1 - t) * F.logsigmoid(-x))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = focal_alpha * t + (1 - focal_alpha) * (1 - t)
            conf_sum = conf_sum + (a_t * (1 - p_t) ** focal_gamma * ce).sum(dim=1)[keep].sum()
        else:
            log_p = log_probs[torch.arange(n_priors), target]
            a_t = torch.where(target > 0, focal_alpha, 1 - focal_alpha)
            conf_sum = conf_sum + (-a_t * (1 - log_p.exp()) ** focal_gamma * log_p)[keep].sum()
    denominator = max(n_pos_total, 1)
    loc, conf = loc_sum / denominator, conf_sum / denominator
    return conf + alpha * loc, loc, conf, n_pos_total


def random_batch(n_images, max_boxes, n_classes, generator, min_boxes=0, n_priors=441):
    boxes, labels = [], []
    for _ in range(n_images):
        n = int(torch.randint(min_boxes, max_boxes + 1, (), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * 0.8
        wh = torch.rand(n, 2, generator=generator) * 0.6 + 0.02
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1))
        labels.append(torch.randint(1, n_classes, (n,), generator=generator))
    locs = torch.randn(n_images, n_priors, 4, generator=generator)
    scores = torch.randn(n_images, n_priors, n_classes, generator=generator) * 2
    return locs, scores, boxes, labels


def one_box_case():
    """Box = prior 0 exactly: prior 0 positive (target offsets 0), priors 1 and 2 negative (IoU 0, 0.25)."""
    boxes, labels = [torch.tensor([[0.0, 0.0, 0.5, 0.5]])], [torch.tensor([1])]
    # logits (background, class 1): prior 0 (0, 0), prior 1 (0, ln 3), prior 2 (0, 0)
    scores = torch.tensor([[[0.0, 0.0], [0.0, LN3], [0.0, 0.0]]])
    return boxes, labels, scores


@pytest.mark.parametrize(("classification", "ignore_threshold", "matching"), [
    ("hard_negative", None, "iou"), ("hard_negative", 0.4, "iou"), ("focal_sigmoid", None, "iou"),
    ("focal_softmax", None, "iou"), ("hard_negative", None, "atss"), ("focal_sigmoid", None, "atss"),
])
def test_equals_reference_on_random_batches(classification, ignore_threshold, matching):
    g = torch.Generator().manual_seed(0)
    priors = create_prior_boxes()
    loss_fn = MultiBoxLoss(priors, classification=classification, ignore_threshold=ignore_threshold,
                           matching=matching)
    for _ in range(4):
        locs, scores, boxes, labels = random_batch(6, 10, 21, g)
        locs.requires_grad_(True)
        scores.requires_grad_(True)
        out = loss_fn(locs, scores, boxes, labels)
        total, loc, conf, n_pos = reference_multibox_loss(locs, scores, boxes, labels, priors,
                                                          classification=classification,
                                                          ignore_threshold=ignore_threshold,
                                                          matching=matching)
        assert out.n_positives == n_pos
        assert torch.allclose(out.localization, loc, rtol=1e-5, atol=1e-5), (out.localization, loc)
        assert torch.allclose(out.confidence, conf, rtol=1e-5, atol=1e-5), (out.confidence, conf)
        assert torch.allclose(out.total, total, rtol=1e-5, atol=1e-5)
        # the gradients too: the hard-negative loss computes its own backward
        grads = torch.autograd.grad(out.total, (locs, scores))
        reference_grads = torch.autograd.grad(total, (locs, scores))
        for grad, reference_grad in zip(grads, reference_grads, strict=True):
            assert torch.allclose(grad, reference_grad, rtol=1e-5, atol=1e-7)


def test_smooth_l1_hand_computed():
    boxes, labels, scores = one_box_case()
    locs = torch.zeros(1, 3, 4)
    locs[0, 0] = torch.tensor([0.5, -2.0, 0.0, 0.0])  # target is 0: 0.5 * 0.5**2 + (2 - 0.5)
    locs[0, 1] = 7.0  # negatives carry no localization loss
    out = MultiBoxLoss(PRIORS, alpha=2.0)(locs, scores, boxes, labels)
    assert out.n_positives == 1
    assert math.isclose(out.localization.item(), 1.625, rel_tol=1e-6)
    assert math.isclose(out.total.item(), out.confidence.item() + 2.0 * 1.625, rel_tol=1e-6)


def test_hard_negatives_hand_computed():
    boxes, labels, scores = one_box_case()
    locs = torch.zeros(1, 3, 4)
    # positive CE ln 2; negative CEs: prior 1 ln 4, prior 2 ln 2
    out = MultiBoxLoss(PRIORS, neg_pos_ratio=1)(locs, scores, boxes, labels)
    assert math.isclose(out.confidence.item(), LN2 + LN4, rel_tol=1e-6)
    # 3 negatives wanted, only 2 exist
    out = MultiBoxLoss(PRIORS, neg_pos_ratio=3)(locs, scores, boxes, labels)
    assert math.isclose(out.confidence.item(), LN2 + LN4 + LN2, rel_tol=1e-6)


def test_hard_negative_count_is_three_to_one_and_capped():
    g = torch.Generator().manual_seed(3)
    neg_loss = torch.rand(3, 441, generator=g)
    positive = torch.zeros(3, 441, dtype=torch.bool)
    positive[0, :2] = True  # 2 positives -> 6 negatives
    positive[2, 100:300] = True  # 200 positives -> 600 wanted, 241 available
    mask = hard_negative_mask(neg_loss, positive, 3)
    assert mask.sum(dim=1).tolist() == [6, 0, 241]
    assert not (mask & positive).any()
    # the chosen negatives are the hardest ones
    negatives = ~positive[0]
    assert neg_loss[0][mask[0]].min() > neg_loss[0][negatives & ~mask[0]].max()
    # a ratio beyond any image's negatives takes them all (n_pos * 1e20 would overflow int64)
    assert hard_negative_mask(neg_loss, positive, 1e20).sum(dim=1).tolist() == [439, 0, 241]


@pytest.mark.parametrize(("neg_pos_ratio", "with_ignored"), [(3, True), (3, False), (2.5, True), (0.5, False)])
def test_hard_negatives_equal_a_per_image_sort(neg_pos_ratio, with_ignored):
    # Every image wants a different count, so each row of the batched selection holds a different number
    # of placeholders; the chosen set must still be exactly each image's n_neg_i largest losses.
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        neg_loss = torch.rand(8, 441, generator=g) * 5
        positive = torch.rand(8, 441, generator=g) < torch.rand(8, 1, generator=g) * 0.4
        ignored = (torch.rand(8, 441, generator=g) < 0.1) & ~positive
        if not with_ignored:
            ignored[:] = False
        mask = hard_negative_mask(neg_loss, positive, neg_pos_ratio, ignored if with_ignored else None)
        for image in range(8):
            candidates = (~positive[image] & ~ignored[image]).nonzero().squeeze(1)
            n_neg = min(math.floor(neg_pos_ratio * int(positive[image].sum())), len(candidates))
            hardest = candidates[neg_loss[image, candidates].argsort(descending=True)[:n_neg]]
            expected = torch.zeros(441, dtype=torch.bool)
            expected[hardest] = True
            assert torch.equal(mask[image], expected)


def test_hard_negatives_skip_ignored_priors():
    neg_loss = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.1]])
    positive = torch.tensor([[False, False, False, False, False, True]])
    ignored = torch.tensor([[True, False, True, False, False, False]])  # the two hardest: near misses
    assert hard_negative_mask(neg_loss, positive, 2, ignored).tolist() == [[False, True, False, True, False,
                                                                            False]]
    positive[0, :] = False
    positive[0, 3:] = True  # 3 positives -> 6 wanted, 1 left (priors 0 and 2 ignored)
    assert hard_negative_mask(neg_loss, positive, 2, ignored).sum().item() == 1


def test_focal_sigmoid_hand_computed():
    boxes, labels, scores = one_box_case()
    locs = torch.zeros(1, 3, 4)
    pos = 0.25 * 0.5**2 * LN2  # t = 1, p = 0.5
    neg1 = 0.75 * 0.75**2 * LN4  # t = 0, p = sigmoid(ln 3) = 0.75
    neg2 = 0.75 * 0.5**2 * LN2  # t = 0, p = 0.5
    out = MultiBoxLoss(PRIORS, classification="focal_sigmoid")(locs, scores, boxes, labels)
    assert math.isclose(out.confidence.item(), pos + neg1 + neg2, rel_tol=1e-5)
    # prior 2 has IoU 0.25 with the box: ignored from ignore_threshold 0.2
    loss_fn = MultiBoxLoss(PRIORS, classification="focal_sigmoid", ignore_threshold=0.2)
    out = loss_fn(locs, scores, boxes, labels)
    assert math.isclose(out.confidence.item(), pos + neg1, rel_tol=1e-5)


def test_focal_softmax_hand_computed():
    boxes, labels, scores = one_box_case()
    locs = torch.zeros(1, 3, 4)
    pos = 0.25 * 0.5**2 * LN2  # p(class 1) = 0.5
    neg1 = 0.75 * 0.75**2 * LN4  # p(background) = 1 / (1 + 3)
    neg2 = 0.75 * 0.5**2 * LN2
    out = MultiBoxLoss(PRIORS, classification="focal_softmax")(locs, scores, boxes, labels)
    assert math.isclose(out.confidence.item(), pos + neg1 + neg2, rel_tol=1e-5)


@pytest.mark.parametrize("classification", ["focal_sigmoid", "focal_softmax"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_stay_finite_when_a_probability_saturates(classification, gamma):
    # Logits of 30 and more make p, or 1 - p, round to exactly 1 in float32; for gamma < 1 the
    # derivative of (1 - p)^gamma written as a power is infinite there.
    g = torch.Generator().manual_seed(2)
    locs, scores, boxes, labels = random_batch(4, 6, 21, g, min_boxes=1)
    scores[:, ::2] *= 15.0  # logits of +-30 and beyond: sigmoids and softmaxes of 0 or 1
    locs.requires_grad_(True)
    scores.requires_grad_(True)
    priors = create_prior_boxes()
    out = MultiBoxLoss(priors, classification=classification, focal_gamma=gamma)(locs, scores, boxes, labels)
    out.total.backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(locs.grad).all()
    expected = reference_multibox_loss(locs.detach(), scores.detach(), boxes, labels, priors,
                                       classification=classification, focal_gamma=gamma)
    assert torch.allclose(out.total, expected[0], rtol=1e-5, atol=1e-6)


def test_focal_sigmoid_equals_torchvisions_on_moderate_logits():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 441, 21, generator=g) * 3
    loss_fn = MultiBoxLoss(create_prior_boxes(), classification="focal_sigmoid")
    target = torch.randint(0, 21, (3, 441), generator=g)
    one_hot = F.one_hot(target, 21)[..., 1:].float()
    expected = sigmoid_focal_loss(scores[..., 1:], one_hot, alpha=0.25, gamma=2.0, reduction="none").sum(-1)
    assert torch.allclose(loss_fn._sigmoid_focal(scores, target), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("classification", ["hard_negative", "focal_sigmoid", "focal_softmax"])
def test_no_positives_is_finite(classification):
    priors = create_prior_boxes()
    locs = torch.randn(2, 441, 4, requires_grad=True)
    scores = torch.randn(2, 441, 21, requires_grad=True)
    empty = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    out = MultiBoxLoss(priors, classification=classification)(locs, scores, *empty)
    assert out.n_positives == 0
    assert out.localization.item() == 0.0
    assert torch.isfinite(out.total)
    if classification == "hard_negative":
        assert out.confidence.item() == 0.0
    out.total.backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("classification", ["hard_negative", "focal_sigmoid", "focal_softmax"])
def test_gradients_finite_with_empty_images(classification):
    g = torch.Generator().manual_seed(1)
    locs, scores, boxes, labels = random_batch(4, 10, 21, g)
    boxes[1], labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    locs.requires_grad_(True)
    scores.requires_grad_(True)
    out = MultiBoxLoss(create_prior_boxes(), classification=classification)(locs, scores, boxes, labels)
    out.total.backward()
    assert out.n_positives > 0
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()
    assert locs.grad.abs().sum() > 0 and scores.grad.abs().sum() > 0
    if classification == "hard_negative":
        # the empty image has no positives, so none of its priors are mined as negatives
        assert scores.grad[1].abs().sum() == 0


def test_non_contiguous_logits_give_the_same_loss_and_gradients():
    # A head may hand over permuted views; the loss and its backward must not assume a layout.
    g = torch.Generator().manual_seed(5)
    locs, scores, boxes, labels = random_batch(3, 6, 21, g, min_boxes=1)
    loss_fn = MultiBoxLoss(create_prior_boxes())
    results = []
    for layout in ("contiguous", "permuted"):
        leaf_locs, leaf_scores = locs.clone().requires_grad_(), scores.clone().requires_grad_()
        if layout == "permuted":
            view_locs = leaf_locs.transpose(1, 2).contiguous().transpose(1, 2)
            view_scores = leaf_scores.permute(2, 0, 1).contiguous().permute(1, 2, 0)
            assert not view_scores.is_contiguous() and not view_locs.is_contiguous()
        else:
            view_locs, view_scores = leaf_locs, leaf_scores
        out = loss_fn(view_locs, view_scores, boxes, labels)
        out.total.backward()
        results.append((out.total.detach(), leaf_locs.grad, leaf_scores.grad))
    for first, second in zip(*results, strict=True):
        assert torch.allclose(first, second, atol=1e-6)


def test_new_priors_buffer_is_used():
    # The loss caches what matching derives from its priors; a replaced buffer (as Module.to() does)
    # must not leave the old priors in use.
    g = torch.Generator().manual_seed(6)
    locs, scores, boxes, labels = random_batch(2, 5, 21, g, min_boxes=1)
    grid, other = create_prior_boxes(), create_prior_boxes(7, (0.3, 0.5, 0.7))
    loss_fn = MultiBoxLoss(grid)
    loss_fn(locs, scores, boxes, labels)
    loss_fn.priors_cxcywh = other
    moved = loss_fn(locs, scores, boxes, labels)
    fresh = MultiBoxLoss(other)(locs, scores, boxes, labels)
    assert torch.equal(moved.total, fresh.total) and moved.n_positives == fresh.n_positives


def test_bf16_inputs_give_float32_loss():
    g = torch.Generator().manual_seed(2)
    locs, scores, boxes, labels = random_batch(2, 5, 21, g, min_boxes=1)
    out = MultiBoxLoss(create_prior_boxes())(locs.bfloat16(), scores.bfloat16(), boxes, labels)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)


def test_bad_targets_name_the_entry():
    loss_fn = MultiBoxLoss(PRIORS)
    locs, scores = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    good = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    with pytest.raises(TargetError, match=r"labels\[1\]\[0\] = 5 is outside 1..4"):
        loss_fn(locs, scores, [good, good], [torch.tensor([1]), torch.tensor([5])])
    with pytest.raises(TargetError, match=r"labels\[0\]\[0\] = 0"):
        loss_fn(locs, scores, [good, good], [torch.tensor([0]), torch.tensor([1])])
    flat = torch.tensor([[0.2, 0.2, 0.2, 0.5]])
    with pytest.raises(TargetError, match=r"boxes\[1\]\[0\]"):
        loss_fn(locs, scores, [good, flat], [torch.tensor([1]), torch.tensor([1])])
    # non-finite coordinates, wherever they sit: the batch check reads only the boxes' sides
    two = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.6, 0.6]])
    for row, column, value in [(1, 2, math.inf), (0, 0, -math.inf), (1, 3, math.nan), (0, 1, math.nan)]:
        bad = two.clone()
        bad[row, column] = value
        with pytest.raises(TargetError, match=rf"boxes\[1\]\[{row}\] = .* is not a finite box"):
            loss_fn(locs, scores, [good, bad], [torch.tensor([1]), torch.tensor([1, 2])])
    both_infinite = two.clone()
    both_infinite[0, [0, 2]] = math.inf  # inf - inf: the side is NaN
    with pytest.raises(TargetError, match=r"boxes\[0\]\[0\]"):
        loss_fn(locs, scores, [both_infinite, good], [torch.tensor([1, 2]), torch.tensor([1])])


def test_boxes_in_pixels_or_off_the_image_are_refused_and_boxes_reaching_out_of_it_are_not():
    loss_fn = MultiBoxLoss(create_prior_boxes())
    locs, scores = torch.zeros(2, 441, 4), torch.zeros(2, 441, 21)
    good = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    pixels = torch.tensor([[48.0, 240.0, 195.0, 371.0], [8.0, 12.0, 352.0, 498.0]])
    with pytest.raises(TargetError, match=r"boxes\[1\]\[0\] = \[48.0, 240.0, 195.0, 371.0\] has a coordinate "
                                          r"outside \[-1.0, 2.0\]: .*not pixels"):
        loss_fn(locs, scores, [good, pixels], [torch.tensor([1]), torch.tensor([1, 2])])
    # one corner in pixels, the rest fractional: still out of range
    with pytest.raises(TargetError, match=r"boxes\[0\]\[0\] .* outside \[-1.0, 2.0\]"):
        loss_fn(locs, scores, [torch.tensor([[0.0, 0.0, 50.0, 0.5]]), good], [torch.tensor([1]), torch.tensor([1])])
    for off in ([1.2, 0.2, 1.5, 0.4], [0.2, 1.0, 0.4, 1.5], [-0.5, 0.2, 0.0, 0.4], [0.2, -0.9, 0.4, -0.1]):
        with pytest.raises(TargetError, match=r"boxes\[1\]\[1\] = .* lies outside the image"):
            loss_fn(locs, scores, [good, torch.tensor([[0.3, 0.3, 0.6, 0.6], off])],
                    [torch.tensor([1]), torch.tensor([1, 2])])
    # reaching out of the image is legal (unclipped boxes); such a box is matched as the reference matches it
    reaching = [torch.tensor([[-0.2, 0.5, 1.3, 1.1]]), torch.tensor([[0.9, -0.4, 1.9, 0.3], [0.0, 0.0, 1.0, 1.0]])]
    labels = [torch.tensor([3]), torch.tensor([1, 2])]
    out = loss_fn(locs, scores, reaching, labels)
    expected = reference_multibox_loss(locs, scores, reaching, labels, create_prior_boxes())
    assert out.n_positives == expected[3] > 0
    assert torch.allclose(out.total, expected[0], rtol=1e-5)


def test_bad_shapes_and_options():
    loss_fn = MultiBoxLoss(PRIORS)
    with pytest.raises(LossInputError, match="predicted_locs"):
        loss_fn(torch.zeros(1, 4, 4), torch.zeros(1, 4, 3), [torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(LossInputError, match="1 box tensors for a batch of 2"):
        loss_fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 3), [torch.zeros(0, 4)], [torch.zeros(0)])
    with pytest.raises(LossInputError, match="classification"):
        MultiBoxLoss(PRIORS, classification="focal")
    with pytest.raises(LossInputError, match="ignore_threshold"):
        MultiBoxLoss(PRIORS, ignore_threshold=0.6)
    with pytest.raises(LossInputError, match="matching must be one of"):
        MultiBoxLoss(PRIORS, matching="nearest")
    with pytest.raises(LossInputError, match=r"atss_candidates must be in \[2, 3\]"):
        MultiBoxLoss(PRIORS, matching="atss", atss_candidates=4)
    # NaN passes a `< 0` test; an infinite gamma makes the focal loss 0; 0 ignores every prior of an image.
    for options, message in [({"alpha": math.nan}, "alpha must be a finite number"),
                             ({"focal_gamma": math.inf}, "finite focal_gamma"),
                             ({"neg_pos_ratio": math.nan}, "neg_pos_ratio must be a finite number"),
                             ({"variances": (math.nan, 0.2)}, "variances must be two finite numbers"),
                             ({"ignore_threshold": 0.0}, r"ignore_threshold must be in \(0, threshold")]:
        with pytest.raises(LossInputError, match=message):
            MultiBoxLoss(PRIORS, **options)


def test_atss_gives_small_boxes_more_than_their_best_prior():
    # A box with sides of 13 % of the image overlaps no 0.2 x 0.2 prior by 0.5: the IoU rule trains only its
    # best prior, ATSS also the neighbours that overlap it well for a box of that size. Both losses stay
    # finite with gradients, and an image without boxes still has no positive.
    priors = create_prior_boxes()
    boxes = [torch.tensor([[0.40, 0.42, 0.53, 0.55]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    locs = torch.zeros(2, 441, 4, requires_grad=True)
    scores = torch.zeros(2, 441, 4, requires_grad=True)
    iou_rule = MultiBoxLoss(priors)(locs, scores, boxes, labels)
    atss = MultiBoxLoss(priors, matching="atss")(locs, scores, boxes, labels)
    assert iou_rule.n_positives == 1
    assert atss.n_positives > 1
    atss.total.backward()
    assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()
    assert locs.grad[1].abs().sum() == 0


def test_ignore_threshold_defaults_below_a_low_matching_threshold():
    # RetinaNet's ignore band starts at 0.4; a matching threshold under it leaves no band, not an error.
    assert MultiBoxLoss(PRIORS, classification="focal_sigmoid").ignore_threshold == 0.4
    assert MultiBoxLoss(PRIORS, threshold=0.3, classification="focal_sigmoid").ignore_threshold == 0.3
    assert MultiBoxLoss(PRIORS).ignore_threshold is None  # hard negatives: SSD has no band


def test_score_activation():
    assert score_activation_for("focal_sigmoid") == "sigmoid"
    assert MultiBoxLoss(PRIORS, classification="focal_softmax").score_activation == "softmax"
    assert MultiBoxLoss(PRIORS).score_activation == "softmax"
