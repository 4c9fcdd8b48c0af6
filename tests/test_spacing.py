"""``spacing_mm``: the opt-in in-plane resampling of train.json, inference.json and evaluate.json (MONAI's
``Spacingd``), an input setting recorded with the weights like ``contralateral_channels``."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, bundle_workflow, inference_network
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import DivisiblePadd, Spacingd

from custom.data.datalist import IMAGE_DIGEST
from custom.training_record import TRAINING_RECORD, check_record
from custom.transforms import NormalizeWithinBraind

LESION = (slice(20, 40), slice(10, 30), 1)  # 20 x 20 voxels of the middle slice


def _study(folder: Path, affine: np.ndarray, shape=(70, 50, 3)) -> dict:
    """A 5-channel image (zero background on the first rows) and a label of ``LESION``, with ``affine``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.uniform(1, 100, shape + (5,)).astype(np.float32)
    image[:5] = 0
    label = np.zeros(shape, np.uint8)
    label[LESION] = 1
    nib.save(nib.Nifti1Image(image, affine), folder / "case.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "case_label.nii.gz")
    return {"image": str(folder / "case.nii.gz"), "label": str(folder / "case_label.nii.gz")}


def _affine(*spacing) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-30.0, 20.0, 7.0)
    return affine


def _transforms(config_files, list_id, spacing_mm):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in config_files])
    parser["spacing_mm"] = spacing_mm
    return parser, parser.get_parsed_content(list_id)


@pytest.mark.parametrize("config_files, list_id", [
    (["train.json"], "train#deterministic_transforms"),
    (["train.json", "evaluate.json"], "validate#preprocessing#transforms"),
    (["inference.json"], "preprocessing#transforms"),
])  # fmt: skip
def test_spacing_mm_null_leaves_the_transforms_unchanged_and_a_value_resamples_after_normalising(config_files, list_id):
    """Off by default (no Spacingd at all: each image's own grid, as before); set, one Spacingd to spacing_mm in-plane
    (0: the slice axis keeps its spacing) between the normalisation and the padding."""
    _, off = _transforms(config_files, list_id, None)
    assert not any(isinstance(t, Spacingd) for t in off)
    _, on = _transforms(config_files, list_id, 0.9)
    assert [type(t) for t in on if not isinstance(t, Spacingd)] == [type(t) for t in off]
    index = next(i for i, t in enumerate(on) if isinstance(t, Spacingd))
    assert isinstance(on[index - 1], NormalizeWithinBraind) and isinstance(on[index + 1], DivisiblePadd)
    assert on[index].spacing_transform.pixdim.tolist() == [0.9, 0.9, 0.0]


def test_training_resamples_image_and_label_in_plane_and_keeps_the_slices(tmp_path):
    """0.8 x 0.8 x 5 mm to 1 mm: 70 x 50 pixels become 56 x 40 (padded to 64 x 48), the 3 slices of 5 mm stay; the
    label is resampled by nearest neighbour: still 0/1, its 16 x 16 mm lesion 256 voxels of 1 mm. The entry holds
    the image digest of fold_datalist's entries, whose name Spacingd took for a metadata dict of 'image'."""
    _, transforms = _transforms(["train.json"], "train#deterministic_transforms", 1.0)
    item = {**_study(tmp_path, _affine(0.8, 0.8, 5.0)), IMAGE_DIGEST: "0" * 64}  # as fold_datalist gives it
    for transform in transforms:
        item = transform(item)
    image, label = item["image"], item["label"]
    assert image.shape == (5, 64, 48, 3) and label.shape == (1, 64, 48, 3)
    for tensor in (image, label):
        assert np.allclose(tensor.pixdim[:3], [1.0, 1.0, 5.0])
    assert label.dtype == torch.uint8 and set(label.unique().tolist()) == {0, 1} and int(label.sum()) == 256
    assert int(label[0, :, :, 1].sum()) == 256  # the lesion's slice is the lesion's slice


def test_inference_writes_the_mask_on_the_input_grid(tmp_path):
    """An input of 0.8 x 0.7 mm pixels (x flipped, 70 x 50) is segmented on a 0.9 mm grid; Invertd returns the
    probabilities to the input's grid, so the mask has its exact shape and affine (and the brain mask, taken before
    resampling, fits it)."""
    affine = _affine(-0.8, 0.7, 5.0)
    image = _study(tmp_path / "in", affine)["image"]
    checkpoint = tmp_path / "random.pt"
    torch.manual_seed(0)
    torch.save(inference_network().state_dict(), checkpoint)
    workflow = bundle_workflow(["inference.json"], "infer", datalist=[image], ckpt_path=str(checkpoint),
                               output_dir=str(tmp_path / "out"), num_workers=0, spacing_mm=0.9)  # fmt: skip
    workflow.initialize()
    resampled = workflow.parser.get_parsed_content("preprocessing")({"image": image})["image"]
    assert np.allclose(resampled.pixdim[:3], [0.9, 0.9, 5.0])
    workflow.run()
    mask = nib.load(tmp_path / "out" / "case_seg.nii.gz")
    assert mask.shape == (70, 50, 3) and np.allclose(mask.affine, affine)
    assert set(np.unique(mask.get_fdata())) <= {0.0, 1.0}


def test_evaluation_scores_on_the_original_grid_and_label(tmp_path):
    """evaluate.json resamples the image only: the prediction goes back to the input's grid (the image's inverse) and
    the label, never resampled, is scored as stored (a nearest-neighbour round trip moved its border)."""
    parser, preprocessing = _transforms(["train.json", "evaluate.json"], "validate#preprocessing", 0.9)
    case = _study(tmp_path, _affine(0.8, 0.8, 5.0))
    striped = np.zeros((70, 50, 3), np.uint8)
    striped[20:40:2, 10:30, 1] = 1  # one-voxel stripes: a 0.9 mm grid cannot hold them
    nib.save(nib.Nifti1Image(striped, _affine(0.8, 0.8, 5.0)), case["label"])
    item = preprocessing(case)
    image = item["image"]
    assert np.allclose(image.pixdim[:3], [0.9, 0.9, 5.0])
    item["pred"] = MetaTensor(torch.stack([-image[0], image[0]]), meta=image.meta)
    scored = parser.get_parsed_content("validate#postprocessing")(item)
    stored = nib.load(tmp_path / "case_label.nii.gz")
    assert scored["pred"].shape == scored["label"].shape == (2, 70, 50, 3)
    assert np.allclose(scored["pred"].affine, stored.affine) and np.allclose(scored["label"].affine, stored.affine)
    assert np.array_equal(scored["label"][1].numpy(), stored.get_fdata())


def test_a_record_without_spacing_mm_is_that_of_weights_trained_without_it(tmp_path):
    """Records up to 0.3.16 have no spacing_mm: their weights were trained on each image's own grid, so a run with
    spacing_mm is refused by name and one without it passes."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"")
    (tmp_path / TRAINING_RECORD).write_text(json.dumps({"contralateral_channels": None, "adjacent_slices": 0}))
    settings = {"contralateral_channels": None, "adjacent_slices": 0}
    with pytest.raises(ValueError, match=r"spacing_mm: trained with None, this run 0.9 \(--spacing_mm None\)"):
        check_record(checkpoint, {**settings, "spacing_mm": 0.9})
    check_record(checkpoint, {**settings, "spacing_mm": None})
