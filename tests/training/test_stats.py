"""The paired bootstrap: exact on constant differences, wider with fewer tasks, refuses unpaired shapes."""

import numpy as np
import pytest

from training.experiments.stats import bootstrap, paired


def test_a_constant_difference_has_a_zero_width_interval():
    a = np.ones((3, 3, 4, 5))
    interval = paired(a, a * 0.75)
    assert interval.mean == interval.low == interval.high == pytest.approx(0.25)
    assert interval.excludes_zero() and interval.half_width == pytest.approx(0.0)


def test_the_interval_covers_the_mean_and_shrinks_with_more_tasks():
    rng = np.random.default_rng(1)
    few = bootstrap(rng.normal(0.1, 0.3, size=(3, 2, 4, 16)))
    many = bootstrap(rng.normal(0.1, 0.3, size=(3, 2, 64, 16)))
    for interval in (few, many):
        assert interval.low < interval.mean < interval.high
    assert many.half_width < few.half_width
    assert abs(many.mean - 0.1) < 3 * many.half_width


def test_task_effects_widen_the_interval():
    """Differences that hold on some tasks only are less certain than the same mean spread evenly."""
    even = np.full((3, 1, 8, 16), 0.5)
    uneven = np.zeros((3, 1, 8, 16))
    uneven[:, :, :4] = 1.0
    assert bootstrap(even).half_width == 0 < bootstrap(uneven).half_width


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="same shape"):
        paired(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3)))
    with pytest.raises(ValueError, match="instances"):
        bootstrap(np.zeros((2, 2)))
