"""The lesion mask from class probabilities within the brain (custom.lesions, custom.transforms.BrainMaskd and
LesionMaskd) and the removal of small predicted lesions (RemoveSmallLesionsd), shared by the bundle's inference and
evaluation and the MONAI-free runner."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from custom.clinical import brain_mask
from custom.deploy import LESION_THRESHOLD, MIN_LESION_ML, lesion_mask, symmetric_padding
from custom.lesions import lesion_from_probabilities, remove_small_lesions
from custom.transforms import BrainMaskd, LesionMaskd, RemoveSmallLesionsd

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


def _whole_brain(probabilities) -> np.ndarray:
    return np.ones(probabilities.shape[1:], dtype=bool)


def test_lesion_mask_at_one_half_is_the_argmax_and_the_threshold_moves_it():
    probabilities = _probabilities()
    brain = _whole_brain(probabilities)
    at_half = lesion_from_probabilities(probabilities.numpy(), 0.5, brain)
    assert at_half.dtype == np.uint8 and at_half.shape == probabilities.shape[1:]
    np.testing.assert_array_equal(at_half, torch.argmax(probabilities, dim=0).numpy())
    lesion = probabilities[1].numpy()
    np.testing.assert_array_equal(lesion_from_probabilities(probabilities.numpy(), 0.7, brain), lesion > 0.7)
    assert 0 < lesion_from_probabilities(probabilities.numpy(), 0.7, brain).sum() < at_half.sum()
    with pytest.raises(ValueError, match="expected \\(2, ...\\) class probabilities"):
        lesion_from_probabilities(probabilities[1:].numpy(), 0.5, brain)


@pytest.mark.parametrize("value", [0, 1, -0.1, 1.5, True, "0.5", None, float("nan")])
def test_bad_lesion_threshold_is_refused_naming_the_setting(value):
    with pytest.raises(ValueError, match="lesion_threshold must be a number between 0 and 1"):
        lesion_from_probabilities(_probabilities().numpy(), value, _whole_brain(_probabilities()))
    with pytest.raises(ValueError, match="lesion_threshold must be a number between 0 and 1"):
        LesionMaskd("pred", value)


def test_lesion_mask_transform_keeps_the_metadata():
    affine = torch.diag(torch.tensor([0.9, 0.9, 5.0, 1.0], dtype=torch.float64))
    pred = MetaTensor(_probabilities(), affine=affine, meta={"filename_or_obj": "case_1.nii.gz"})
    brain = _whole_brain(pred)
    out = LesionMaskd("pred", 0.7)({"pred": pred, "brain": brain})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == (1, *pred.shape[1:]) and out.dtype == pred.dtype
    assert torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "case_1.nii.gz"
    np.testing.assert_array_equal(out.numpy()[0], lesion_from_probabilities(pred.numpy(), 0.7, brain))


def test_bundle_and_runner_share_the_post_processing_settings():
    inference = json.loads((CONFIGS / "inference.json").read_text())
    evaluate = json.loads((CONFIGS / "evaluate.json").read_text())
    assert inference["min_lesion_ml"] == evaluate["min_lesion_ml"] == MIN_LESION_ML
    assert inference["lesion_threshold"] == evaluate["lesion_threshold"] == LESION_THRESHOLD


def _lesion_over_the_brain_edge(tmp_path):
    """A (30, 20, 3) case of 5 mm slices (0.005 mL voxels) whose brain (perfusion maps non-zero) is [5:25, 4:16], and
    a predicted lesion over all the background that enters the brain by 0.36 mL (rows 5-6), plus a 0.96 mL lesion
    inside it. Returns the image file, its volume and affine, the predicted lesion and the expected mask: the inner
    lesion only (the edge lesion is 0.36 mL within the brain, under ``min_lesion_ml`` 0.5 mL)."""
    affine = np.diag([1.0, 1.0, 5.0, 1.0])
    volume = np.zeros((30, 20, 3, 5), dtype=np.float32)
    volume[..., 0] = -1000.0  # CT air everywhere: the brain comes from the perfusion maps only
    volume[5:25, 4:16, :, 1:] = 1.0 + np.random.default_rng(0).random((20, 12, 3, 4), dtype=np.float32)
    brain = brain_mask(volume)
    inner = np.zeros(brain.shape, dtype=bool)
    inner[12:20, 6:14] = True
    predicted = ~brain | inner
    predicted[5:7] = True
    path = tmp_path / "case_1.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path, volume, affine, predicted, inner


def _padded_logits(lesion: np.ndarray) -> torch.Tensor:
    """(2, H', W', D) logits, 5 for the lesion where ``lesion`` is, on the grid padded as the bundle and runner pad."""
    (top, bottom), (left, right) = (symmetric_padding(size) for size in lesion.shape[:2])
    padded = torch.nn.functional.pad(torch.from_numpy(lesion).permute(2, 0, 1), (left, right, top, bottom))
    lesion_logit = padded.permute(1, 2, 0).float() * 5.0
    return torch.stack([torch.zeros_like(lesion_logit), lesion_logit])


def test_lesion_outside_the_brain_is_removed_and_a_wrong_grid_refused():
    probabilities = np.full((2, 4, 4, 2), 0.5, dtype=np.float32)
    probabilities[1] = 0.9
    brain = np.zeros((4, 4, 2), dtype=bool)
    brain[1:3, 1:3] = True
    np.testing.assert_array_equal(lesion_from_probabilities(probabilities, 0.5, brain), brain)
    with pytest.raises(ValueError, match="the brain must be on the probabilities' grid"):
        lesion_from_probabilities(probabilities, 0.5, np.ones((4, 4, 3), dtype=bool))
    with pytest.raises(ValueError, match="brain mask under 'brain'"):
        LesionMaskd("pred", 0.5)({"pred": MetaTensor(torch.from_numpy(probabilities))})


def test_inference_chain_removes_lesion_outside_the_brain_before_small_lesions(tmp_path):
    """inference.json's preprocessing and postprocessing on a network output with lesion over the background: the mask
    is the lesion inside the brain (of the maps as read, on the input grid), without the part of the background lesion
    that enters the brain, now a small lesion."""
    path, _, _, predicted, expected = _lesion_over_the_brain_edge(tmp_path)
    parser = ConfigParser()
    parser.read_config(CONFIGS / "inference.json")
    parser["output_dir"] = str(tmp_path / "out")
    data = parser.get_parsed_content("preprocessing")({"image": str(path)})
    assert data["image"].shape[1:3] != predicted.shape[:2]  # the network sees a padded grid
    data["pred"] = MetaTensor(_padded_logits(predicted), meta=data["image"].meta)
    mask = parser.get_parsed_content("postprocessing")(data)["pred"]
    np.testing.assert_array_equal(mask.numpy()[0], expected)


def test_runner_removes_lesion_outside_the_brain_before_small_lesions(tmp_path):
    """The MONAI-free runner on the same network output gives the same mask."""
    _, volume, affine, predicted, expected = _lesion_over_the_brain_edge(tmp_path)
    logits = _padded_logits(predicted).permute(3, 0, 1, 2)  # (D, 2, H', W'): slice by slice

    def network(batch):  # all slices come in one batch (batch_size >= D)
        assert batch.shape[0] == logits.shape[0]
        return logits

    np.testing.assert_array_equal(lesion_mask(network, volume, affine), expected)


def test_brain_mask_transform_takes_the_maps_as_read_only(tmp_path):
    path, volume, _, _, _ = _lesion_over_the_brain_edge(tmp_path)
    brain = BrainMaskd("image")({"image": volume})["brain"]
    np.testing.assert_array_equal(brain, brain_mask(volume))
    with pytest.raises(ValueError, match="place it right after ValidateStudyd"):
        BrainMaskd("image")({"image": np.moveaxis(volume, -1, 0)})


@pytest.mark.parametrize("config_files, key", [(["inference.json"], "preprocessing"),
                                               (["train.json", "evaluate.json"], "validate#preprocessing")])
def test_inference_and_evaluation_take_the_brain_from_the_maps_as_read(config_files, key):
    """BrainMaskd comes right after the load and its check, before the normalisation and the padding."""
    parser = ConfigParser()
    parser.read_config([CONFIGS / name for name in config_files])
    names = [type(t).__name__ for t in parser.get_parsed_content(key).transforms]
    assert names[:4] == ["LoadImaged", "ValidateStudyd", "BrainMaskd", "EnsureChannelFirstd"]
