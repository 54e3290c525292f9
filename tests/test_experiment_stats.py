"""Across seeds: the mean and its 95% Student-t interval, checked by hand."""

import pytest

from swarm_supervisor.experiments import mean_interval


def test_mean_interval_by_hand():
    mean, half = mean_interval([1.0, 2.0, 3.0])           # sd 1, t(0.975, 2) = 4.30
    assert mean == 2.0 and half == pytest.approx(4.30 / 3 ** 0.5)
    assert mean_interval([0.5]) == (0.5, None)            # one run: no interval
