"""Prior boxes: count, order and hand-computed values."""

import math

import pytest
import torch

from model.priors import PriorConfigError, boxes_per_cell, create_prior_boxes, grid_size_for

SQRT2 = math.sqrt(2.0)


def test_default_count_is_441():
    priors = create_prior_boxes()
    assert priors.shape == (441, 4)
    assert priors.dtype == torch.float32
    assert boxes_per_cell() == 9
    assert grid_size_for(224) == 7


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        # cell (row 0, col 0), scale 0.2: ratio 1, 2, 0.5
        (0, (1 / 14, 1 / 14, 0.2, 0.2)),
        (1, (1 / 14, 1 / 14, 0.2 * SQRT2, 0.2 / SQRT2)),
        (2, (1 / 14, 1 / 14, 0.2 / SQRT2, 0.2 * SQRT2)),
        # same cell, scale 0.4 ratio 1 and scale 0.6 ratio 0.5
        (3, (1 / 14, 1 / 14, 0.4, 0.4)),
        (8, (1 / 14, 1 / 14, 0.6 / SQRT2, 0.6 * SQRT2)),
        # next cell to the right (row 0, col 1): x moves, y stays
        (9, (3 / 14, 1 / 14, 0.2, 0.2)),
        # first cell of the second row (row 1, col 0): y moves
        (63, (1 / 14, 3 / 14, 0.2, 0.2)),
        # cell (row 2, col 5), scale 0.4, ratio 2: index (2*7 + 5)*9 + 1*3 + 1 = 175
        (175, (11 / 14, 5 / 14, 0.4 * SQRT2, 0.4 / SQRT2)),
        # last prior: cell (6, 6), scale 0.6, ratio 0.5
        (440, (13 / 14, 13 / 14, 0.6 / SQRT2, 0.6 * SQRT2)),
    ],
)
def test_values_at_indices(index, expected):
    priors = create_prior_boxes()
    assert torch.allclose(priors[index], torch.tensor(expected), atol=1e-6), (index, priors[index])


def test_clamped_to_unit_interval():
    priors = create_prior_boxes(grid_size=2, scales=(1.5,), aspect_ratios=(1.0, 4.0))
    assert priors.shape == (8, 4)
    assert priors.min() >= 0 and priors.max() <= 1
    # scale 1.5 ratio 4: w = 3.0 -> 1, h = 0.75 stays
    assert torch.allclose(priors[1], torch.tensor([0.25, 0.25, 1.0, 0.75]))


def test_other_grid_and_shapes():
    priors = create_prior_boxes(grid_size=grid_size_for(300), scales=(0.3, 0.7), aspect_ratios=(1.0,))
    assert grid_size_for(300) == 9
    assert priors.shape == (9 * 9 * 2, 4)
    assert boxes_per_cell((0.3, 0.7), (1.0,)) == 2


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"grid_size": 0}, "grid_size"),
        ({"scales": ()}, "scales"),
        ({"scales": (0.2, -0.1)}, "scales"),
        ({"aspect_ratios": (0.0,)}, "aspect_ratios"),
    ],
)
def test_bad_config_names_the_key(kwargs, word):
    with pytest.raises(PriorConfigError, match=word):
        create_prior_boxes(**kwargs)


def test_image_too_small():
    with pytest.raises(PriorConfigError, match="image_size"):
        grid_size_for(16)
