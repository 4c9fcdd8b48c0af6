"""Expected calibration error and probabilistic lesion volume on hand-computed cases (custom.calibration)."""

import math

import numpy as np
import pytest

from custom.calibration import calibration_bins, ece_from_bins, probabilistic_volume_ml


def _ece(probability, label, mask=None):
    return ece_from_bins(calibration_bins(probability, label, mask=mask))


def test_ece_by_hand():
    # bins of width 0.1: 0.05 -> bin 0 (no lesion), 0.15 -> bin 1 (no lesion), 0.95 and 1.0 -> bin 9 (both lesion)
    p = np.array([0.05, 0.15, 0.95, 1.0])
    y = np.array([0, 0, 1, 1])
    assert _ece(p, y) == pytest.approx((0.05 + 0.15 + abs(1.95 - 2)) / 4)


def test_calibrated_and_maximally_wrong():
    assert _ece(np.full(4, 0.5), np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    assert _ece(np.array([0.0, 1.0]), np.array([1, 0])) == pytest.approx(1.0)


def test_bin_edges_belong_to_the_upper_bin_and_one_to_the_last():
    table = calibration_bins(np.array([0.0, 0.1, 0.5, 1.0]), np.array([0, 0, 0, 0]), bins=2)
    np.testing.assert_array_equal(table[:, 0], [2, 2])  # 0.0, 0.1 | 0.5, 1.0
    np.testing.assert_allclose(table[:, 1], [0.1, 1.5])
    table = calibration_bins(np.array([0.1]), np.array([0]), bins=10)
    assert table[1, 0] == 1


def test_mask_and_pooling():
    p = np.array([[0.9, 0.9], [0.2, 0.0]])
    y = np.array([[1, 0], [0, 0]])
    mask = np.array([[1, 1], [1, 0]])
    # within the mask: bin 9 holds 0.9, 0.9 with one lesion voxel (|1.8 - 1|), bin 2 holds 0.2 (|0.2 - 0|); N = 3
    assert _ece(p, y, mask=mask) == pytest.approx((0.8 + 0.2) / 3)
    pooled = calibration_bins(p, y) + calibration_bins(np.array([0.95]), np.array([1]))
    assert ece_from_bins(pooled) == pytest.approx((abs(1.8 + 0.95 - 2) + 0.2 + 0.0) / 5)
    assert math.isnan(ece_from_bins(np.zeros((10, 3))))


def test_probabilistic_volume():
    assert probabilistic_volume_ml(np.full((2, 2, 1), 0.5), 0.002) == pytest.approx(4 * 0.5 * 0.002)
    assert probabilistic_volume_ml(np.zeros((3, 3, 3)), 0.001) == 0.0


@pytest.mark.parametrize(
    "p, y, message",
    [
        (np.array([1.2]), np.array([1]), "from 0 to 1"),
        (np.array([np.nan]), np.array([1]), "finite"),
        (np.array([0.5]), np.array([2]), "binary"),
        (np.array([0.5, 0.5]), np.array([1]), "shape"),
    ],
)
def test_bad_inputs_are_refused(p, y, message):
    with pytest.raises(ValueError, match=message):
        _ece(p, y)
    with pytest.raises(ValueError, match="voxel_ml"):
        probabilistic_volume_ml(np.zeros((1, 1, 1)), 0.0)
