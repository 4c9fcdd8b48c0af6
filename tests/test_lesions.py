"""The lesion mask from class probabilities (custom.lesions, custom.transforms.LesionMaskd) and the removal of small
predicted lesions (RemoveSmallLesionsd), shared by the bundle's inference and evaluation and the MONAI-free runner."""

import json

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from monai.data import MetaTensor

from custom.deploy import LESION_THRESHOLD, MIN_LESION_ML
from custom.lesions import lesion_from_probabilities, remove_small_lesions
from custom.transforms import LesionMaskd, RemoveSmallLesionsd

AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # 2 mm3 per voxel: 500 voxels are 1 mL


def _mask() -> np.ndarray:
    """Three lesions on a (40, 40, 10) grid: 200 voxels (0.4 mL), 300 voxels (0.6 mL), and two 150-voxel blocks
    that touch at one corner only (one 26-connected lesion of 0.6 mL, two 6-connected ones of 0.3 mL)."""
    mask = np.zeros((40, 40, 10), dtype=np.uint8)
    mask[0:10, 0:10, 0:2] = 1  # 200
    mask[20:30, 0:10, 0:3] = 1  # 300
    mask[0:5, 20:30, 0:3] = 1  # 150 ...
    mask[5:10, 30:40, 3:6] = 1  # ... and 150, sharing the corner voxel pair (4, 29, 2) / (5, 30, 3)
    return mask


def test_lesions_under_the_volume_are_removed_with_26_connectivity():
    mask = _mask()
    kept = remove_small_lesions(mask, AFFINE, 0.5)
    assert kept.dtype == np.uint8 and kept.shape == mask.shape
    assert kept[0:10, 0:10].sum() == 0  # 0.4 mL removed
    assert kept[20:30, 0:10].sum() == 300  # 0.6 mL kept
    assert kept[0:10, 20:40].sum() == 300  # corner-connected: one lesion of 0.6 mL, kept
    assert remove_small_lesions(mask, AFFINE, 0.6).sum() == 600  # exactly the threshold is kept
    assert remove_small_lesions(mask, AFFINE, 0.61).sum() == 0
    assert remove_small_lesions(mask, np.eye(4), 0.5).sum() == 0  # 1 mm3 voxels: every lesion under 0.5 mL
    np.testing.assert_array_equal(remove_small_lesions(mask, AFFINE, 0), mask)
    assert remove_small_lesions(np.zeros_like(mask), AFFINE, 0.5).sum() == 0


@pytest.mark.parametrize("value", [-0.1, True, "0.5", None, float("nan")])
def test_bad_minimum_volume_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="min_lesion_ml must be a number >= 0"):
        remove_small_lesions(_mask(), AFFINE, value)
    with pytest.raises(ValueError, match="min_lesion_ml must be a number >= 0"):
        RemoveSmallLesionsd("pred", value)


def test_transform_takes_the_voxel_volume_from_the_affine():
    mask = _mask()
    affine = AFFINE.copy()
    affine[:3, :3] = affine[:3, :3] @ np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # rotated: same voxel volume
    pred = MetaTensor(torch.as_tensor(mask[None]), affine=torch.as_tensor(affine))
    out = RemoveSmallLesionsd("pred", 0.5)({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == (1, *mask.shape)
    np.testing.assert_allclose(out.affine.numpy(), affine)
    np.testing.assert_array_equal(out.numpy()[0], remove_small_lesions(mask, AFFINE, 0.5))
    with pytest.raises(ValueError, match="'pred' as a \\(1, H, W, D\\) MetaTensor"):
        RemoveSmallLesionsd("pred", 0.5)({"pred": torch.as_tensor(mask[None])})


def _probabilities(seed: int = 0) -> torch.Tensor:
    logits = torch.randn((2, 30, 20, 6), generator=torch.Generator().manual_seed(seed)) * 3
    return torch.softmax(logits, dim=0)


def test_lesion_mask_at_one_half_is_the_argmax_and_the_threshold_moves_it():
    probabilities = _probabilities()
    at_half = lesion_from_probabilities(probabilities.numpy(), 0.5)
    assert at_half.dtype == np.uint8 and at_half.shape == probabilities.shape[1:]
    np.testing.assert_array_equal(at_half, torch.argmax(probabilities, dim=0).numpy())
    lesion = probabilities[1].numpy()
    np.testing.assert_array_equal(lesion_from_probabilities(probabilities.numpy(), 0.7), lesion > 0.7)
    assert 0 < lesion_from_probabilities(probabilities.numpy(), 0.7).sum() < at_half.sum()
    with pytest.raises(ValueError, match="expected \\(2, ...\\) class probabilities"):
        lesion_from_probabilities(probabilities[1:].numpy(), 0.5)


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, True, "0.5", None, float("nan")])
def test_bad_lesion_threshold_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="lesion_threshold must be a number between 0 and 1"):
        lesion_from_probabilities(_probabilities().numpy(), value)
    with pytest.raises(ValueError, match="lesion_threshold must be a number between 0 and 1"):
        LesionMaskd("pred", value)


def test_lesion_mask_transform_keeps_the_metadata():
    affine = torch.diag(torch.tensor([0.9, 0.9, 5.0, 1.0], dtype=torch.float64))
    pred = MetaTensor(_probabilities(), affine=affine, meta={"filename_or_obj": "case_1.nii.gz"})
    out = LesionMaskd("pred", 0.7)({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == (1, *pred.shape[1:]) and out.dtype == pred.dtype
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "case_1.nii.gz"
    np.testing.assert_array_equal(out.numpy()[0], lesion_from_probabilities(pred.numpy(), 0.7))


def test_bundle_and_runner_share_the_post_processing_settings():
    inference = json.loads((CONFIGS / "inference.json").read_text())
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    assert inference["min_lesion_ml"] == evaluate["min_lesion_ml"] == MIN_LESION_ML
    assert inference["lesion_threshold"] == evaluate["lesion_threshold"] == LESION_THRESHOLD
