"""Batched prior matching: forced best priors, competition for a prior, padding, empty images."""

import math

import pytest
import torch

from model.priors import create_prior_boxes
from utils.boxes import cxcywh_to_xyxy, pairwise_iou, xyxy_to_cxcywh
from utils.matching import PriorBoxes, TargetError, flatten_targets, match_priors, match_priors_atss

# Three priors: top-left quarter, bottom-right quarter, whole image.
PRIORS_XYXY = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
PRIORS = xyxy_to_cxcywh(PRIORS_XYXY)


def match(boxes, labels, threshold=0.5):
    return match_priors(flatten_targets(boxes, labels), PRIORS, threshold)


def test_flatten_targets_layout():
    boxes = [torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]]), torch.zeros(0, 4),
             torch.tensor([[0.5, 0.5, 0.9, 0.9]])]
    labels = [torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([3])]
    targets = flatten_targets(boxes, labels)
    assert torch.equal(targets.boxes, torch.cat(boxes))
    assert targets.labels.tolist() == [1, 2, 3]
    assert targets.image.tolist() == [0, 0, 2]
    assert targets.first_row.tolist() == [0, 2, 2]
    assert targets.counts == [2, 0, 1]
    padded, padded_labels, valid = targets.padded()
    assert padded.shape == (3, 2, 4)
    assert padded_labels.tolist() == [[1, 2], [0, 0], [3, 0]]
    assert valid.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(padded[0], boxes[0])
    assert torch.equal(padded[2, 0], boxes[2][0])
    assert torch.count_nonzero(padded[1]) == 0


def test_all_empty_targets_pad_to_one_slot():
    empty_labels = [torch.zeros(0, dtype=torch.long)] * 2
    targets = flatten_targets([torch.zeros(0, 4)] * 2, empty_labels)
    assert targets.boxes.shape == (0, 4) and targets.counts == [0, 0]
    padded, padded_labels, valid = targets.padded()
    assert padded.shape == (2, 1, 4) and padded_labels.shape == (2, 1)
    assert not valid.any()


def test_flatten_targets_errors_name_the_image():
    with pytest.raises(TargetError, match=r"boxes\[1\]"):
        flatten_targets([torch.zeros(1, 4), torch.zeros(2, 3)], [torch.ones(1, dtype=torch.long)] * 2)
    # torch.cat would skip an empty 1-D tensor: it must still be named, not read as an image without boxes
    with pytest.raises(TargetError, match=r"boxes\[1\] must be a \(n, 4\) tensor, got \(0,\)"):
        flatten_targets([torch.zeros(1, 4), torch.zeros(0)], [torch.ones(1, dtype=torch.long), torch.zeros(0)])
    # equal totals (3 boxes, 3 labels) but not per image
    with pytest.raises(TargetError, match=r"labels\[0\] must be a \(1,\) tensor to match boxes\[0\], got \(2,\)"):
        flatten_targets([torch.zeros(1, 4), torch.zeros(2, 4)], [torch.ones(2, dtype=torch.long), torch.ones(1)])
    with pytest.raises(TargetError, match=r"labels\[0\] must hold integers"):
        flatten_targets([torch.zeros(1, 4)], [torch.ones(1)])
    with pytest.raises(TargetError, match=r"labels\[0\]"):
        flatten_targets([torch.zeros(2, 4)], [torch.ones(3, dtype=torch.long)])
    with pytest.raises(TargetError, match="2 box tensors but 1 label"):
        flatten_targets([torch.zeros(1, 4)] * 2, [torch.ones(1, dtype=torch.long)])
    # tensors on two devices ("meta" stands in for a GPU) are named as such, not left to torch.cat's error
    with pytest.raises(TargetError, match="must all be on one device"):
        flatten_targets([torch.zeros(1, 4), torch.zeros(1, 4, device="meta")], [torch.ones(1, dtype=torch.long)] * 2)


def random_boxes(n, generator, spread=1.0):
    xy = torch.rand(n, 2, generator=generator) * spread - (spread - 1) / 2
    return torch.cat([xy, xy + torch.rand(n, 2, generator=generator) * 0.7 + 1e-3], 1)


@pytest.mark.parametrize(("grid_size", "scales", "aspect_ratios"), [
    (7, (0.2, 0.4, 0.6), (1.0, 2.0, 0.5)), (1, (0.5,), (1.0,)), (4, (0.1, 1.5), (1.0, 3.0, 0.25)), (10, (0.3,), (2.0,)),
])
def test_grid_priors_give_the_iou_of_the_general_formula(grid_size, scales, aspect_ratios):
    # The separable IoU must equal the general one exactly (matching compares IoUs for equality), for
    # boxes inside the image, past its edges, and boxes that cover whole rows of priors (equal overlaps).
    g = torch.Generator().manual_seed(grid_size)
    priors = PriorBoxes(create_prior_boxes(grid_size, scales, aspect_ratios))
    assert priors.grid is not None and priors.grid[:2] == (grid_size, len(scales) * len(aspect_ratios))
    boxes = torch.cat([random_boxes(200, g), random_boxes(100, g, spread=1.6),
                       torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.3, 1.0, 0.6], [2.0, 2.0, 3.0, 3.0]])])
    expected = pairwise_iou(boxes, cxcywh_to_xyxy(priors.cxcywh))
    assert torch.equal(priors.iou(boxes), expected)
    assert priors.iou(torch.zeros(0, 4)).shape == (0, len(priors))


def test_priors_off_a_grid_use_the_general_formula():
    g = torch.Generator().manual_seed(0)
    grid = create_prior_boxes()
    shuffled = grid[torch.randperm(len(grid), generator=g)]
    moved = grid.clone()
    moved[100, 0] += 0.01  # one prior off its column
    for priors_cxcywh in (shuffled, moved, PRIORS, grid[:-1]):
        priors = PriorBoxes(priors_cxcywh)
        assert priors.grid is None
        boxes = random_boxes(50, g)
        assert torch.equal(priors.iou(boxes), pairwise_iou(boxes, cxcywh_to_xyxy(priors_cxcywh)))
    # matching is the same through either formula
    boxes = [random_boxes(n, g) for n in (5, 3, 12)]
    labels = [torch.randint(1, 21, (len(b),), generator=g) for b in boxes]
    general = PriorBoxes(grid)
    general.grid = None
    on_grid = match_priors(flatten_targets(boxes, labels), PriorBoxes(grid))
    off_grid = match_priors(flatten_targets(boxes, labels), general)
    for field, value in on_grid._asdict().items():
        assert torch.equal(value, getattr(off_grid, field)), field


def test_positive_index_and_rows_describe_the_dense_matches():
    g = torch.Generator().manual_seed(1)
    boxes = [random_boxes(n, g) for n in (4, 0, 9, 1)]
    labels = [torch.randint(1, 21, (len(b),), generator=g) for b in boxes]
    targets = flatten_targets(boxes, labels)
    m = match_priors(targets, create_prior_boxes())
    assert torch.equal(m.positive_index, m.positive.view(-1).nonzero().squeeze(1))
    assert torch.equal(m.labels.view(-1)[m.positive_index], targets.labels[m.positive_row])
    image = m.positive_index // m.positive.shape[1]
    assert torch.equal(targets.image[m.positive_row], image)  # every positive takes a box of its own image
    assert m.gt_index()[~m.positive].eq(0).all()


def test_matched_box_is_searched_within_its_own_image():
    # Image 0 has one box and image 1 three copies of it: every prior has the same best IoU in both
    # images, and image 0's rows searched past its single box run into image 1's. Each positive must
    # still take a box of its own image, the first one in image 1.
    box = torch.tensor([[0.1, 0.1, 0.7, 0.8]])
    boxes, labels = [box, box.repeat(3, 1)], [torch.tensor([1]), torch.tensor([2, 3, 4])]
    m = match_priors(flatten_targets(boxes, labels), create_prior_boxes())
    assert torch.equal(m.positive[0], m.positive[1]) and m.positive[0].sum() > 1
    assert set(m.labels[0][m.positive[0]].tolist()) == {1}
    assert set(m.labels[1][m.positive[1]].tolist()) == {2}
    assert set(m.positive_row.tolist()) == {0, 1}


def test_best_prior_below_threshold_is_still_positive():
    # IoU with prior 0 = 0.04 / 0.25 = 0.16, with prior 2 = 0.04, with prior 1 = 0: all < 0.5.
    m = match([torch.tensor([[0.0, 0.0, 0.2, 0.2]])], [torch.tensor([7])])
    assert m.labels.tolist() == [[7, 0, 0]]
    assert m.forced.tolist() == [[True, False, False]]
    assert torch.allclose(m.iou, torch.tensor([[0.16, 0.0, 0.04]]))
    assert m.gt_index()[0, 0] == 0


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
    assert m.gt_index()[0, 0] == 1
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
    assert m.gt_index()[0, 2] == 1
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
    priors = create_prior_boxes()
    boxes, labels = [], []
    for n in (0, 3, 10, 1):
        xy = torch.rand(n, 2, generator=g) * 0.6
        boxes.append(torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.4 + 0.02], 1))
        labels.append(torch.randint(1, 21, (n,), generator=g))
    targets = flatten_targets(boxes, labels)
    batched = match_priors(targets, priors)
    for i in range(len(boxes)):
        single = match_priors(flatten_targets(boxes[i:i + 1], labels[i:i + 1]), priors)
        assert torch.equal(batched.labels[i], single.labels[0])
        assert torch.equal(batched.positive[i], single.positive[0])
        # gt_index is a row of the flat targets: the image's own rows start at first_row
        assert torch.equal(batched.gt_index()[i], torch.where(single.positive[0], single.gt_index()[0]
                                                            + targets.first_row[i], 0))
    assert (batched.forced.sum(1) <= torch.tensor([len(b) for b in boxes])).all()


# ---------------------------------------------------------------------------------------------------
# ATSS: adaptive threshold per box
# ---------------------------------------------------------------------------------------------------


def reference_atss_assign(boxes, priors_cxcywh, n_candidates=36):
    """ATSS for one image, one box at a time. Returns (positive (P,) bool, assigned box index (P,) long)."""
    from torchvision.ops import box_iou

    n_priors = priors_cxcywh.shape[0]
    priors_xyxy = torch.cat([priors_cxcywh[:, :2] - priors_cxcywh[:, 2:] / 2,
                             priors_cxcywh[:, :2] + priors_cxcywh[:, 2:] / 2], dim=1)
    best_iou = torch.full((n_priors,), -2.0)
    assigned = torch.zeros(n_priors, dtype=torch.long)
    for m, box in enumerate(boxes):
        iou = box_iou(box[None], priors_xyxy)[0]
        centre = (box[:2] + box[2:]) / 2
        distance = ((priors_cxcywh[:, :2] - centre) ** 2).sum(dim=1)
        candidates = torch.argsort(distance, stable=True)[:n_candidates].tolist()
        values = iou[candidates]
        mean = sum(values.tolist()) / len(candidates)
        std = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / (len(candidates) - 1))
        claimed = [int(iou.argmax())]
        for p in candidates:
            cx, cy = priors_cxcywh[p, :2].tolist()
            inside = box[0] < cx < box[2] and box[1] < cy < box[3]
            if iou[p] >= mean + std and inside:
                claimed.append(p)
        for p in claimed:
            if iou[p] > best_iou[p]:  # strictly higher: the first box keeps a tie
                best_iou[p], assigned[p] = iou[p], m
    return best_iou > -2.0, assigned


# Box G = [0.4, 0.4, 0.6, 0.6]. P0 and P1 are G shifted left / right by 0.05: IoU 0.03 / 0.05 = 0.6 each,
# centres inside G. P2-P5 sit 0.4 away, no overlap. P6 lies far in the corner.
ATSS_PRIORS = torch.tensor([
    [0.45, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2],
    [0.5, 0.9, 0.1, 0.1], [0.5, 0.1, 0.1, 0.1], [0.1, 0.5, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1],
    [0.95, 0.95, 0.1, 0.1],
])
BOX_G = torch.tensor([[0.4, 0.4, 0.6, 0.6]])


def atss(boxes, labels, priors=ATSS_PRIORS, n_candidates=6):
    return match_priors_atss(flatten_targets(boxes, labels), priors, n_candidates)


def test_atss_threshold_is_mean_plus_std_of_the_candidates():
    # Candidates (6 nearest): P0-P5, IoUs 0.6, 0.6, 0, 0, 0, 0. Mean 0.2; unbiased std
    # sqrt((2 * 0.4**2 + 4 * 0.2**2) / 5) = sqrt(0.096) = 0.3098; threshold 0.5098 -> P0 and P1.
    # SSD's rule at IoU 0.7 keeps only the best prior (P0, the first of the two).
    result = atss([BOX_G], [torch.tensor([2])])
    assert result.labels[0].tolist() == [2, 2, 0, 0, 0, 0, 0]
    assert result.forced[0].tolist() == [True] + [False] * 6
    ssd = match_priors(flatten_targets([BOX_G], [torch.tensor([2])]), ATSS_PRIORS, 0.7)
    assert ssd.labels[0].tolist() == [2, 0, 0, 0, 0, 0, 0]
    # With all 7 priors as candidates: mean 1.2 / 7 = 0.1714, std sqrt((2 * 0.4286**2 + 5 * 0.1714**2) / 6)
    # = 0.2928, threshold 0.4642: still P0 and P1.
    assert atss([BOX_G], [torch.tensor([2])], n_candidates=7).labels[0].tolist() == [2, 2, 0, 0, 0, 0, 0]
    # With 3 candidates (P0, P1 and the first prior 0.4 away): mean 0.4, std sqrt((2 * 0.04 + 0.16) / 2)
    # = 0.3464, threshold 0.7464 -> only the forced P0.
    assert atss([BOX_G], [torch.tensor([2])], n_candidates=3).labels[0].tolist() == [2, 0, 0, 0, 0, 0, 0]


def test_atss_candidate_centre_must_lie_inside_the_box():
    # Box G. A = [0.35, 0.35, 0.65, 0.65] contains G: IoU 0.04 / 0.09 = 0.4444, centre inside.
    # B and C are 0.25 x 0.2 with centres at x = 0.62 and 0.38, just outside G: overlap 0.105 x 0.2,
    # IoU 0.021 / 0.069 = 0.3043 each. Six more priors do not overlap G. All 9 are candidates:
    # mean 1.0531 / 9 = 0.1170, unbiased std 0.1801, threshold 0.2971. B and C pass it but stay background
    # because their centres lie outside G; A is positive.
    zero = [[0.5, 0.9], [0.5, 0.1], [0.1, 0.5], [0.9, 0.5], [0.15, 0.15], [0.85, 0.85]]
    priors = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.62, 0.5, 0.25, 0.2], [0.38, 0.5, 0.25, 0.2]]
                          + [[x, y, 0.1, 0.1] for x, y in zero])
    result = atss([BOX_G], [torch.tensor([1])], priors=priors, n_candidates=9)
    iou = result.iou[0]
    assert iou[:3].tolist() == pytest.approx([0.04 / 0.09, 0.021 / 0.069, 0.021 / 0.069], abs=1e-6)
    assert (iou[3:] == 0).all()
    threshold = iou.mean() + iou.std()
    assert threshold.item() == pytest.approx(0.2971, abs=1e-4)
    assert (iou[1:3] >= threshold).all()
    assert result.labels[0].tolist() == [1] + [0] * 8


def test_atss_contested_prior_goes_to_the_box_it_overlaps_most():
    # G (IoU 0.6 with P0 and P1) and H = P1 exactly (IoU 1 with P1): P1 goes to H; P0 stays with G.
    h = torch.tensor([[0.45, 0.4, 0.65, 0.6]])
    result = atss([torch.cat([BOX_G, h])], [torch.tensor([1, 3])])
    assert result.labels[0, :2].tolist() == [1, 3]
    assert result.gt_index()[0, :2].tolist() == [0, 1]


def test_atss_empty_images_and_padding():
    boxes = [torch.zeros(0, 4), BOX_G, torch.zeros(0, 4)]
    labels = [torch.zeros(0, dtype=torch.long), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    result = atss(boxes, labels)
    assert not result.positive[0].any() and not result.positive[2].any()
    assert result.labels[1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert (result.iou[0] == -1).all()
    with pytest.raises(ValueError, match="n_candidates must be in \\[2, 7\\], got 8"):
        atss([BOX_G], [torch.tensor([1])], n_candidates=8)


def test_atss_batched_equals_per_box_reference():

    g = torch.Generator().manual_seed(0)
    priors = create_prior_boxes()
    for _ in range(5):
        boxes, labels = [], []
        for _ in range(6):
            n = int(torch.randint(0, 11, (), generator=g))
            xy = torch.rand(n, 2, generator=g) * 0.8
            boxes.append(torch.cat([xy, (xy + torch.rand(n, 2, generator=g) * 0.6 + 0.02).clamp(max=1.0)], 1))
            labels.append(torch.randint(1, 21, (n,), generator=g))
        targets = flatten_targets(boxes, labels)
        result = match_priors_atss(targets, priors, 36)
        for i in range(len(boxes)):
            positive, assigned = reference_atss_assign(boxes[i], priors, 36)
            assert torch.equal(result.positive[i], positive)
            assert torch.equal(result.gt_index()[i][positive], targets.first_row[i] + assigned[positive])
            expected_labels = torch.where(positive, labels[i][assigned] if len(labels[i]) else 0, 0)
            assert torch.equal(result.labels[i], expected_labels)


def test_integer_boxes_of_one_image_do_not_truncate_the_others():
    targets = flatten_targets([torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0.1, 0.1, 0.6, 0.6]])],
                              [torch.tensor([1]), torch.tensor([2])])
    assert targets.boxes.dtype == torch.float32
    assert targets.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0], pytest.approx([0.1, 0.1, 0.6, 0.6])]
