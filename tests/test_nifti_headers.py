"""NIfTI headers whose qform is not their sform: the bundle reads nibabel's affine, as the runner does."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS
from monai.bundle import ConfigParser
from monai.transforms import LoadImage
from test_bad_inputs import store_in_meters, store_voxel_size
from test_deploy import _bundle_inference, _table
from test_deploy import exported_model  # noqa: F401  (a fixture: seeded random weights, model.pt and model.ts)

from custom.data.check import check_dataset
from custom.data.datalist import fold_datalist, screen_inference_images
from custom.data.studies import require_voxel_size_in_mm
from custom.deploy import deploy, read_stacked_image
from custom.readers import HeaderPreservingNibabelReader


def _mismatched_headers(source: Path, folder: Path) -> dict[str, Path]:
    """Copies of the NIfTI ``source`` whose qform differs from the sform nibabel reads (``img.affine``):
    ``qorigin0``, the qform of the sform without its translation (both codes 1); ``qident``, an identity qform
    (code 1) under the sform (code 2). MONAI's ``NibabelReader`` read the first at the origin and the second
    with 1 mm voxels."""
    image = nib.load(source)
    data, affine = np.asanyarray(image.dataobj), image.affine
    at_origin = affine.copy()
    at_origin[:3, 3] = 0
    paths = {}
    for name, qform, sform_code in (("qorigin0", at_origin, 1), ("qident", np.eye(4), 2)):
        copy = nib.Nifti1Image(data, affine)
        copy.set_qform(qform, code=1)
        copy.set_sform(affine, code=sform_code)
        paths[name] = folder / f"{name}{''.join(source.suffixes)}"
        nib.save(copy, paths[name])
        assert np.array_equal(nib.load(paths[name]).affine, affine)  # nibabel reads the sform
    return paths


@pytest.fixture(scope="module")
def dataset(tiny_phantom_dataset) -> dict:
    return json.loads((tiny_phantom_dataset / "dataset.json").read_text())


@pytest.mark.integration
def test_bundle_inference_keeps_the_input_affine_as_the_runner_does(
    tiny_phantom_dataset, dataset, exported_model, tmp_path  # noqa: F811
):
    ckpt, torchscript = exported_model
    images = _mismatched_headers(tiny_phantom_dataset / dataset["testing"][0]["image"], tmp_path)
    _bundle_inference(list(images.values()), ckpt, tmp_path / "bundle_out", "--min_lesion_ml", "0")
    deploy(*images.values(), model=str(torchscript), out=str(tmp_path / "deploy_out"), min_lesion_ml=0)
    bundle_table, deploy_table = (_table(tmp_path / out / "lesion_volumes.csv") for out in ("bundle_out", "deploy_out"))
    assert bundle_table == deploy_table
    for name, path in images.items():
        mask, deployed = (nib.load(tmp_path / out / f"{name}_seg.nii.gz") for out in ("bundle_out", "deploy_out"))
        assert np.array_equal(mask.affine, nib.load(path).affine), name
        assert np.array_equal(mask.affine, deployed.affine), name
        assert np.array_equal(np.asanyarray(mask.dataobj), np.asanyarray(deployed.dataobj)), name
        voxel_ml = abs(np.linalg.det(nib.load(path).affine[:3, :3])) / 1000
        row = bundle_table[name]
        assert int(row["lesion_voxels"]) > 0, name  # random weights segment some voxels: lesion_ml is a check
        assert float(row["lesion_ml"]) == pytest.approx(int(row["lesion_voxels"]) * voxel_ml, abs=1e-4), name
    assert float(bundle_table["qident"]["hypoperfusion_ml"]) > 0  # a volume that depends on the voxel size


def test_training_reads_images_and_labels_with_nibabels_affine(tiny_phantom_dataset, dataset, tmp_path):
    """train.json's LoadImaged (hence validation and evaluate.json) reads 4D images and 3D labels whose qform
    is not their sform with nibabel's affine, the one the converter and the dataset check use."""
    entry = dataset["training"][0]
    load = ConfigParser(ConfigParser.load_config_file(CONFIGS / "train.json")).get_parsed_content(
        "train#deterministic_transforms#0"
    )
    for key in ("image", "label"):
        (tmp_path / key).mkdir()
        for name, path in _mismatched_headers(tiny_phantom_dataset / entry[key], tmp_path / key).items():
            loaded = load({"image": str(path), "label": str(path)})[key]
            assert np.array_equal(loaded.affine.numpy(), nib.load(path).affine), (key, name)
            assert np.array_equal(loaded.meta["original_affine"], nib.load(path).affine), (key, name)


def test_reader_equals_monais_nibabel_reader_on_a_converted_file(tiny_phantom_dataset, dataset):
    """A converted file (sform == qform, origin away from 0) reads as with MONAI's NibabelReader: voxels, dtype,
    affine, channel axis and meta keys; only pixdim[4], which MONAI set to the norm of the origin, is kept."""
    entry = dataset["training"][0]
    for key in ("image", "label"):
        path = str(tiny_phantom_dataset / entry[key])
        ours, monais = LoadImage(reader=HeaderPreservingNibabelReader)(path), LoadImage(reader="NibabelReader")(path)
        assert torch.equal(ours.as_tensor(), monais.as_tensor()) and ours.dtype == monais.dtype
        assert torch.equal(ours.affine, monais.affine)
        assert set(ours.meta) == set(monais.meta)
        for meta_key in ("original_affine", "spatial_shape", "original_channel_dim", "dim", "qform_code"):
            np.testing.assert_array_equal(ours.meta[meta_key], monais.meta[meta_key])
        np.testing.assert_array_equal(ours.meta["pixdim"], nib.load(path).header["pixdim"])
    assert ours.meta["original_channel_dim"] != ours.meta["original_channel_dim"]  # the label: NaN, no channel
    assert LoadImage(reader=HeaderPreservingNibabelReader)(
        str(tiny_phantom_dataset / entry["image"])
    ).meta["original_channel_dim"] == -1


VOXEL_SIZES_NOT_IN_MM = {
    # nibabel reads a stored 0 (no sform) as 1 mm: 6 mm slices stored with thickness 0 gave 11.0 mL for 66.0 mL
    "slice thickness 0": (lambda path: store_voxel_size(path, (0.9, 0.9, 0.0)),
                          r"its header stores the voxel size \[0\.9, 0\.9, 0\.0\] \(pixdim\[1:4\]\) and no sform"),
    "all 0": (lambda path: store_voxel_size(path, (0.0, 0.0, 0.0)), r"its header stores the voxel size \[0\.0, "),
    # nibabel ignores the unit: a study in meters gave an empty mask (every lesion under min_lesion_ml), 0.0 mL
    "meters": (store_in_meters, r"its header gives the voxel size in meters \(xyzt_units\), which nibabel reads as mm"),
    # a unit of unknown (xyzt_units 0) is read as mm: 0.0009 x 0.0009 x 0.005 passed, every volume 10^9 times too small
    "meters, unit unknown": (lambda path: store_in_meters(path, unit="unknown"),
                             r"its voxel size \[[0-9.e, -]+\] \(its affine, read as mm; xyzt_units 'unknown'\) is "
                             r"outside the 0\.05-30 mm of CT voxels: a header of unit unknown written in meters"),
}


@pytest.mark.parametrize("diagonal", [(0.2, 0.2, 0.5), (0.43, 0.43, 1.0), (0.7, 0.7, 12.0), (1.0, 1.0, 22.0),
                                      (-7.84, -7.84, 6.0)])  # the last: the phantom's coarsest grid (32 pixels)
@pytest.mark.parametrize("unit", ["unknown", "mm"])
def test_voxel_sizes_a_ct_scanner_writes_pass_with_any_unit_read_as_mm(tmp_path, diagonal, unit):
    """The plausibility range of ``require_voxel_size_in_mm`` (``VOXEL_MM_RANGE``) refuses meters and microns written
    with unit unknown, never what a CT scanner writes: ultra-high-resolution pixels, thin and thick slices."""
    path = tmp_path / "study.nii.gz"
    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.diag([*diagonal, 1.0]))
    image.header.set_xyzt_units(0 if unit == "unknown" else unit)
    nib.save(image, path)
    require_voxel_size_in_mm(path, nib.load(path))


@pytest.mark.parametrize("damage", VOXEL_SIZES_NOT_IN_MM)
def test_a_voxel_size_nibabel_does_not_read_in_mm_is_refused(tiny_phantom_dataset, dataset, tmp_path, damage):
    """Inference screening, the runner, the dataset check and training screening refuse a header whose voxel size
    nibabel's affine does not give in mm (``custom.data.studies.require_voxel_size_in_mm``), naming the file."""
    rewrite, problem = VOXEL_SIZES_NOT_IN_MM[damage]
    folder = shutil.copytree(tiny_phantom_dataset, tmp_path / "dataset")
    testing, training = dataset["testing"][0]["image"], dataset["training"][0]["image"]
    image = rewrite(folder / testing)
    with pytest.raises(ValueError, match=rf"{re.escape(str(image))}': {problem}"):
        read_stacked_image(image)  # deploy.py
    with pytest.raises(ValueError, match=rf"{re.escape(str(image))}: {problem}"):
        screen_inference_images([str(image)])  # inference.json's screened_images
    assert any(re.match(rf"{re.escape(testing)}: {problem}", p) for p in check_dataset(folder)), testing
    rewrite(folder / training)
    with pytest.raises(ValueError, match=rf"{re.escape(training)}: {problem}"):
        fold_datalist(folder, -1, "train")
