"""Bad input in the bundle's train, evaluate and inference paths: refused by file name, nothing half-written,
one bad case never stops the others (the MONAI-free runner's equivalents are in test_deploy.py)."""

import csv
import errno
import functools
import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, TINY_TRAINING, bundle_workflow, inference_network, refuse_listing
from monai.bundle import ConfigParser
from monai.data import create_file_basename

from custom.data.datalist import fold_datalist, inference_datalist, output_case_name, screen_inference_images
from custom.deploy import brain_quantiles
from custom.transforms import NormalizeWithinBrain
from custom.writers import ShapePreservingNibabelWriter

AFFINE = np.diag([1.0, 1.0, 5.0, 1.0])
# The same voxels stored as a sagittal stack: the third voxel axis runs left-right, the first head-foot.
SAGITTAL = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
# An sform of code 1 whose matrix was left unset (zeros): nibabel reads it as the affine, the voxels have no volume.
NO_VOLUME = np.array([[0.0, 0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 20.0], [0.0, 0.0, 0.0, 30.0], [0.0, 0.0, 0.0, 1.0]])


def _study(shape=(32, 32, 3)) -> np.ndarray:
    """A (H, W, D, 5) float32 study whose perfusion maps are non-zero in a central 'brain'."""
    rng = np.random.default_rng(0)
    volume = np.zeros((*shape, 5), dtype=np.float32)
    volume[..., 0] = rng.normal(40.0, 10.0, shape)
    volume[4:-4, 4:-4, :, 1:] = rng.uniform(0.5, 5.0, (shape[0] - 8, shape[1] - 8, shape[2], 4))
    return volume


def save_with_sform(path: Path, data: np.ndarray, sform: np.ndarray) -> Path:
    """Save ``data`` with ``sform`` (code 1) as its only affine, no qform: nibabel makes no qform of a singular
    matrix such as ``NO_VOLUME``, so ``nib.Nifti1Image(data, sform)`` refuses it (test_deploy and test_prepare too)."""
    header = nib.Nifti1Header()
    header.set_data_shape(np.shape(data))
    header.set_data_dtype(np.asarray(data).dtype)
    header.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(np.asarray(data), None, header), path)
    return path


def store_voxel_size(path: Path, pixdim) -> Path:
    """Rewrite the NIfTI file ``path`` (.nii or .nii.gz) to store ``pixdim`` as pixdim[1:4] and sform_code 0, byte by
    byte: nibabel replaces a stored 0 by 1 when it builds or reads a header, so it cannot write one."""
    compressed = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
    struct.pack_into("<3f", raw, 80, *pixdim)  # pixdim[1:4] (little-endian, as nibabel writes here)
    struct.pack_into("<h", raw, 254, 0)  # sform_code 0: the affine comes from the qform or pixdim
    path.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
    return path


def store_in_meters(path: Path, unit: str = "meter") -> Path:
    """Rewrite the NIfTI file ``path`` in meters: its affine divided by 1000, xyzt_units ``unit`` (nibabel ignores it;
    "unknown", code 0, is read as mm)."""
    image = nib.load(path, mmap=False)  # not a memory map of the file it replaces
    copy = nib.Nifti1Image(np.asanyarray(image.dataobj), np.diag([0.001, 0.001, 0.001, 1.0]) @ image.affine)
    copy.header.set_xyzt_units(0 if unit == "unknown" else unit, "sec")
    nib.save(copy, path)
    return path


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    if affine is NO_VOLUME:
        return save_with_sform(path, data, affine)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _truncate(path: Path) -> Path:
    """Cut a .nii.gz in half: the header still reads, the voxels do not (a copy interrupted mid-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _messages(error: BaseException) -> str:
    """The messages of an error and of every error it was raised from (MONAI wraps transform errors)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def _network_checkpoint(path: Path, **network_changes) -> Path:
    """Seeded random weights of inference.json's network_def (with ``network_changes``) saved to ``path``."""
    torch.manual_seed(0)
    torch.save(inference_network(**network_changes).state_dict(), path)
    return path


@pytest.fixture
def dataset_copy(tiny_phantom_dataset, tmp_path) -> tuple[Path, dict]:
    """A private copy of the tiny phantom dataset (to damage) and its dataset.json."""
    folder = shutil.copytree(tiny_phantom_dataset, tmp_path / "dataset")
    return folder, json.loads((folder / "dataset.json").read_text())


def _files(folder: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray = AFFINE) -> dict[str, str]:
    """A data-list item: ``image`` and ``label`` saved as ``image.nii.gz`` and ``label.nii.gz`` in ``folder``."""
    return {"image": str(_save(folder / "image.nii.gz", image, affine)),
            "label": str(_save(folder / "label.nii.gz", label, affine))}


# The bundle's load-time validation (custom.transforms.ValidateStudyd), as the configs use it.
def _bad_study(problem: str) -> tuple[np.ndarray, np.ndarray]:
    image, label = _study(), np.zeros((32, 32, 3), dtype=np.uint8)
    label[10:14, 10:14, 1] = 1
    if problem == "nan":
        image[5, 5, 1, 2] = np.nan
    elif problem == "inf":
        image[5, 5, 1, 4] = np.inf
    elif problem == "four channels":
        image = image[..., :4]
    elif problem == "six channels":
        image = np.concatenate([image, image[..., :1]], axis=-1)
    elif problem == "3D image":
        image = image[..., 1]
    elif problem == "in-plane 16 x 16":
        image = image[8:24, 8:24]
    elif problem == "all-zero image":
        image = np.zeros_like(image)
    elif problem == "no background":  # as read from an int16 file whose scl_inter does not keep 0 at 0
        image[..., 1:][image[..., 1:] == 0] = -0.0186
    elif problem == "label 0.5":
        label = label.astype(np.float32) * 0.5
    elif problem == "label 2":
        label = label * 2
    elif problem == "label shape":
        label = np.zeros((32, 32, 4), dtype=np.uint8)
    return image, label


BAD_STUDIES = {
    "nan": r"image\.nii\.gz: 1 NaN or Inf values in the CBV channel",
    "inf": r"image\.nii\.gz: 1 NaN or Inf values in the Tmax channel",
    "four channels": r"image\.nii\.gz: expected a 4D image with 5 channels .* found shape \(32, 32, 3, 4\)",
    "six channels": r"image\.nii\.gz: expected a 4D image with 5 channels .* found shape \(32, 32, 3, 6\)",
    "3D image": r"image\.nii\.gz: expected a 4D image with 5 channels .* found shape \(32, 32, 3\)",
    "in-plane 16 x 16": r"image\.nii\.gz: in-plane size 16 x 16 is below the network's minimum 17 x 17",
    "all-zero image": r"image\.nii\.gz: the CBF channel is all zero",
    "no background": r"image\.nii\.gz: no voxel is zero in every perfusion map, so the whole volume would be taken",
    "label 0.5": r"label\.nii\.gz: label values must be 0 or 1, found \[0\.5\]",
    "label 2": r"label\.nii\.gz: label values must be 0 or 1, found \[2",
    "label shape": r"label\.nii\.gz: shape \(32, 32, 4\) differs from .*image\.nii\.gz \(32, 32, 3\)",
    # segmented into a confident mask of sagittal slices up to 0.3.12
    "sagittal slices": r"image\.nii\.gz: its third voxel axis runs left-right .* voxel axis 1 runs head-foot",
    # segmented with every lesion under min_lesion_ml (0 mL), then a crash writing the mask, up to 0.3.14
    "no voxel volume": r"image\.nii\.gz: its affine gives the voxels no volume .* set the voxel size",
}
STUDY_AFFINES = {"sagittal slices": SAGITTAL, "no voxel volume": NO_VOLUME}


@pytest.mark.parametrize(
    "problem, config, transforms",
    [(p, "train.json", "validate#preprocessing") for p in BAD_STUDIES]
    + [(p, "inference.json", "preprocessing") for p in BAD_STUDIES if not p.startswith("label")],
)
def test_load_time_validation_names_the_file_and_the_problem(tmp_path, problem, config, transforms):
    image, label = _bad_study(problem)
    item = _files(tmp_path, image, label, STUDY_AFFINES.get(problem, AFFINE))
    if config == "inference.json":
        del item["label"]
    preprocessing = ConfigParser(ConfigParser.load_config_file(CONFIGS / config)).get_parsed_content(transforms)
    with pytest.raises(Exception) as raised:
        preprocessing(item)
    assert re.search(BAD_STUDIES[problem], _messages(raised.value)), _messages(raised.value)


@pytest.mark.parametrize(
    "config, transforms", [("train.json", "validate#preprocessing"), ("inference.json", "preprocessing")]
)
def test_load_time_validation_refuses_a_voxel_size_not_read_in_mm(tmp_path, config, transforms):
    """MONAI Label infers and fine-tunes through these transforms without the screening of the bundle's datalists: a
    study stored in meters, or with a slice thickness of 0 and no sform, was segmented on nibabel's mm grid."""
    preprocessing = ConfigParser(ConfigParser.load_config_file(CONFIGS / config)).get_parsed_content(transforms)
    slice_thickness_0 = functools.partial(store_voxel_size, pixdim=(1.0, 1.0, 0.0))
    meters_unit_unknown = functools.partial(store_in_meters, unit="unknown")
    for rewrite, problem in ((store_in_meters, "its header gives the voxel size in meters"),
                             (slice_thickness_0, "its header stores the voxel size"),
                             (meters_unit_unknown, r"its voxel size \[0\.001, 0\.001, 0\.005\] \(its affine")):
        item = _files(tmp_path, *_bad_study("none"))
        rewrite(Path(item["image"]))
        if config == "inference.json":
            del item["label"]
        with pytest.raises(Exception) as raised:
            preprocessing(item)
        assert re.search(f"{re.escape(item['image'])}: {problem}", _messages(raised.value)), _messages(raised.value)


def test_load_time_validation_passes_a_good_study(tmp_path):
    image, label = _bad_study("none")
    item = _files(tmp_path, image, label)
    preprocessing = ConfigParser(ConfigParser.load_config_file(CONFIGS / "train.json")).get_parsed_content(
        "validate#preprocessing"
    )
    out = preprocessing(item)
    assert out["image"].shape == (5, 32, 32, 3) and torch.isfinite(out["image"]).all()


# Training and evaluation: bad cases named before any DataLoader starts (custom.data.datalist.fold_datalist).
def _damage(folder: Path, dataset: dict) -> dict[str, str]:
    """Give one fold-0 case all-zero perfusion maps and truncate another's image; return {case: image path}."""
    fold_0 = [e for e in dataset["training"] if e["fold"] == 0]
    empty, corrupt = fold_0[0], fold_0[1]
    image = nib.load(folder / empty["image"])
    data = np.asarray(image.dataobj).copy()
    data[..., 1:] = 0
    nib.save(nib.Nifti1Image(data, image.affine, image.header), folder / empty["image"])
    _truncate(folder / corrupt["image"])
    return {"empty": empty["image"], "corrupt": corrupt["image"]}


def test_fold_datalists_refuse_unusable_cases_naming_each(dataset_copy):
    folder, dataset = dataset_copy
    damaged = _damage(folder, dataset)
    for fold, role in ((1, "train"), (0, "validate"), (-1, "train")):
        with pytest.raises(ValueError) as raised:
            fold_datalist(folder, fold, role)
        message = str(raised.value)
        assert f"{damaged['empty']}: the CBF channel is all zero" in message
        assert f"{damaged['corrupt']}: cannot read the voxels" in message
    assert fold_datalist(folder, 0, "train")  # fold 0's training cases (folds 1) are intact


def _empty_labels(folder: Path, entries) -> None:
    for entry in entries:
        label = nib.load(folder / entry["label"])
        nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), folder / entry["label"])


def test_training_cases_without_any_lesion_are_refused(dataset_copy):
    folder, dataset = dataset_copy
    _empty_labels(folder, [e for e in dataset["training"] if e["fold"] != 0])
    with pytest.raises(ValueError, match="no label of the 4 training cases of fold 0 holds a lesion voxel: the net"):
        fold_datalist(folder, 0, "train")
    assert fold_datalist(folder, 0, "validate")  # fold 0's own labels still hold lesions
    assert fold_datalist(folder, 1, "train")  # trains on fold 0's
    # one training case: counted in the singular ("the 1 training cases" up to 0.3.15)
    kept = [next(e for e in dataset["training"] if e["fold"] == fold) for fold in (0, 1)]
    (folder / "dataset.json").write_text(json.dumps({**dataset, "training": kept}))
    with pytest.raises(ValueError, match="no label of the 1 training case of fold 0 holds a lesion voxel"):
        fold_datalist(folder, 0, "train")


def test_validation_cases_without_any_lesion_are_refused_for_training_not_for_evaluation(dataset_copy, tmp_path):
    """On a fold of empty labels every case scores Dice 0 where the network predicts any lesion voxel and 1 where it
    predicts none: train.json's best-Dice model.pt was the first validated one (0.0 at every epoch), without a word.
    Evaluating a lesion-free fold measures false positives (avd_ml is the predicted volume): evaluate.json takes it."""
    folder, dataset = dataset_copy
    fold_0 = [e for e in dataset["training"] if e["fold"] == 0]
    _empty_labels(folder, fold_0)
    with pytest.raises(ValueError) as refused:
        fold_datalist(folder, 0, "validate")
    message = str(refused.value)
    assert f"'{folder / 'dataset.json'}': no label of the {len(fold_0)} validation cases of fold 0 holds a lesion" \
        in message
    assert "the best model would be picked on empty labels" in message
    assert "python -m custom check" in message and "--folds K --seed S" in message
    assert len(fold_datalist(folder, 0, "evaluate")) == len(fold_0)
    assert fold_datalist(folder, 0, "train")  # fold 1's labels hold lesions
    folders = {"dataset_dir": str(folder), "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out")}
    training = bundle_workflow(["train.json"], "train", **folders, **TINY_TRAINING)
    training.initialize()
    with pytest.raises(Exception) as refused_by_the_bundle:
        training.parser.get_parsed_content("validate#datalist")
    assert "no label of the 4 validation cases of fold 0" in _messages(refused_by_the_bundle.value)
    evaluation = bundle_workflow(["train.json", "evaluate.json"], "eval", **folders)
    evaluation.initialize()
    assert len(evaluation.parser.get_parsed_content("validate#datalist")) == len(fold_0)


def test_a_study_in_the_training_and_validation_cases_of_a_fold_is_refused(dataset_copy):
    folder, dataset = dataset_copy
    validated = next(e for e in dataset["training"] if e["fold"] == 0)
    trained = next(e for e in dataset["training"] if e["fold"] == 1)
    trained.update(image=validated["image"], label=validated["label"])  # one study listed in two folds
    (folder / "dataset.json").write_text(json.dumps(dataset))
    for role in ("train", "validate"):
        with pytest.raises(ValueError, match="fold 0's validation and training cases list the same file"):
            fold_datalist(folder, 0, role)
    assert fold_datalist(folder, -1, "train")  # every case, for a fit check: no held-out fold to leak into


FOLD_PROBLEMS = {
    "string": r"dataset.json training\[{index}\].fold: expected an integer in \[0, 2\), found '1'",
    "out of range": r"dataset.json training\[{index}\].fold: expected an integer in \[0, 2\), found 2",
    "missing": r"dataset.json training\[{index}\]: missing fold",
    "patient in two folds": r"dataset.json training: patient '{patient}' is in folds \[0, 1\]",
}


@pytest.mark.parametrize("change", FOLD_PROBLEMS)
def test_training_entries_without_a_valid_fold_or_a_patient_in_two_folds_are_refused(dataset_copy, change):
    """A fold "1" (a string, as a hand-written or spreadsheet-made dataset.json has it) or 2 of 2 folds was trained on
    in every fold and validated in none, and a missing fold failed with a bare KeyError: 'fold'. A patient in two
    folds (slabs A and B apart) was validated on the slab the model trained on. All without a word."""
    folder, dataset = dataset_copy
    index, entry = next((i, e) for i, e in enumerate(dataset["training"]) if e["fold"] == 1)
    validated = next(e for e in dataset["training"] if e["fold"] == 0)
    if change == "string":
        entry["fold"] = "1"
    elif change == "out of range":
        entry["fold"] = 2
    elif change == "missing":
        del entry["fold"]
    else:
        entry["patient"] = validated["patient"]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    for fold, role in ((0, "train"), (0, "validate"), (1, "train"), (1, "validate")):
        with pytest.raises(ValueError, match=FOLD_PROBLEMS[change].format(index=index, patient=validated["patient"])):
            fold_datalist(folder, fold, role)
    assert fold_datalist(folder, -1, "train")  # every case, whatever its fold: a fit check


@pytest.mark.parametrize("configs", [["train.json"], ["train.json", "evaluate.json"]])
def test_training_and_evaluation_refuse_before_any_dataloader(dataset_copy, tmp_path, configs):
    folder, dataset = dataset_copy
    damaged = _damage(folder, dataset)
    workflow = bundle_workflow(
        configs, "train", dataset_dir=str(folder), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"),
        ckpt_path=str(_network_checkpoint(tmp_path / "model.pt")), **TINY_TRAINING,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert f"{damaged['empty']}: the CBF channel is all zero" in _messages(raised.value)
    assert "No sampling location" not in _messages(raised.value)
    assert not (tmp_path / "models").exists() and not (tmp_path / "out" / "metrics.csv").exists()
    assert not list((tmp_path / "out").glob("events.out.tfevents.*"))  # a rerun on mended data is not refused


def test_missing_and_empty_datasets_are_named(dataset_copy, tmp_path):
    folder, dataset = dataset_copy
    with pytest.raises(FileNotFoundError, match=f"dataset_dir '{tmp_path / 'nowhere'}' does not exist"):
        inference_datalist(tmp_path / "nowhere")
    (folder / "dataset.json").write_text(json.dumps({**dataset, "training": [], "testing": []}))
    with pytest.raises(ValueError, match="has no 'training' entries"):
        fold_datalist(folder, 0, "train")
    with pytest.raises(ValueError, match="lists no 'testing' images"):
        inference_datalist(folder)


def test_prepare_names_a_truncated_map_and_writes_nothing(tiny_phantom_dataset, tmp_path):
    from custom.data.isles2018 import prepare_isles2018

    source = shutil.copytree(tiny_phantom_dataset.parent / "isles2018" / "TRAINING", tmp_path / "TRAINING")
    cbf = next(next((source / "case_2").glob("*CT_CBF*")).glob("*.nii*"))
    _truncate(cbf)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(cbf))}': cannot read the voxels"):
        prepare_isles2018(source, tmp_path / "dataset", folds=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TRAINING"]


def test_inference_refuses_a_dataset_without_testing_images(dataset_copy):
    folder, dataset = dataset_copy
    del dataset["testing"]
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=r"lists no 'testing' images; .* --datalist"):
        inference_datalist(folder)


@pytest.mark.parametrize("name", ["case_5.nii.gz", "case.v2.nii.gz", "x.nii_old.nii.gz", "CASE.NII.GZ", "c.NII.gz",
                                  "a.nii.GZ", "b.NII", "c.nii"])
def test_output_case_name_is_the_name_save_image_writes(tmp_path, name):
    """The table, the refusals and the MONAI-free runner name a case as MONAI's SaveImaged names its mask."""
    written = create_file_basename("", tmp_path / name, tmp_path, separate_folder=False, makedirs=False)
    assert output_case_name(tmp_path / name) == Path(written).name


def test_an_isles_case_folder_given_as_dot_is_named_as_itself(tmp_path, monkeypatch):
    (tmp_path / "case_5").mkdir()
    monkeypatch.chdir(tmp_path / "case_5")
    assert output_case_name(".") == "case_5"  # python -m custom deploy . (was: '_seg.nii.gz')


def test_a_datalist_of_one_path_or_of_other_things(tmp_path):
    image = _save(tmp_path / "one.nii.gz", _study())
    assert screen_inference_images(str(image)).usable == [str(image)]  # --datalist one.nii.gz
    with pytest.raises(ValueError, match=r"datalist: \{'image': .*\} is not a path; list 5-channel NIfTI files"):
        screen_inference_images([{"image": str(image)}])


def test_a_folder_of_nifti_files_in_the_datalist_is_named_with_its_files(tmp_path):
    """A folder of converted images (`--datalist imagesTs`) was set aside with the hint for ISLES case folders
    (convert them with prepare, or use deploy), which neither of its files needs: list them."""
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    _save(folder / "case_9.nii.gz", _study())
    _save(folder / "case_10.nii.gz", _study())
    (folder / "._case_9.nii.gz").write_bytes(b"")  # an AppleDouble file is no image
    image = _save(tmp_path / "one.nii.gz", _study())
    rejected = screen_inference_images([str(folder), str(image)]).rejected
    assert rejected == {str(folder): f"{folder}: a folder, not a 5-channel NIfTI file (list its 2 NIfTI file(s) "
                                     f"instead, e.g. '{folder / 'case_10.nii.gz'}')"}


def test_a_folder_in_the_datalist_that_cannot_be_listed_is_set_aside(tmp_path, monkeypatch):
    """Listing a folder to name its files raised PermissionError out of the screening (another user's folder, mode
    700), so no image was segmented; it is set aside with the other reasons. Simulated: the tests run as root."""
    folder = tmp_path / "locked"
    folder.mkdir()
    image = _save(tmp_path / "one.nii.gz", _study())
    refuse_listing(monkeypatch, folder)
    screened = screen_inference_images([str(folder), str(image)])
    assert list(screened.rejected) == [str(folder)] and "a folder, not a 5-channel NIfTI file" in screened.rejected[
        str(folder)]


def test_a_testing_entry_without_image_is_named(dataset_copy):
    folder, dataset = dataset_copy
    dataset["testing"][1] = {"img": "imagesTs/x.nii.gz", "case": "x"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=re.escape(f"'{folder / 'dataset.json'}' testing[1] has no 'image' key")):
        inference_datalist(folder)


@pytest.mark.parametrize(
    "testing, problem",
    [
        ("imagesTs/x.nii.gz", "'testing': expected a list of images, found a str"),
        ([{"image": ["imagesTs/ct.nii.gz", "imagesTs/cbf.nii.gz"]}], "testing[0]: expected the path of one 5-channel"),
        ([3], "testing[0]: expected the path of one 5-channel NIfTI file, found 3"),
    ],
)
def test_a_testing_list_of_other_things_is_named(dataset_copy, testing, problem):
    """A hand-edited ``testing`` that is one path instead of a list read as one image per character ("'<dir>/s' and
    '<dir>/s' would both write 's_seg.nii.gz'"); a list of files per entry (one per map) or a number failed with
    "unsupported operand type(s) for /", naming neither dataset.json nor the entry."""
    folder, dataset = dataset_copy
    dataset["testing"] = testing
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=re.escape(f"'{folder / 'dataset.json'}' {problem}")):
        inference_datalist(folder)


# Inference: every good case written, the bad ones reported by name, a non-zero exit code.
@pytest.mark.parametrize("second_name", ["case.nii.gz", "case.NII.gz"])
def test_two_inputs_never_write_one_output(tmp_path, second_name):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, second = _save(tmp_path / "a" / "case.nii", _study()), _save(tmp_path / "b" / second_name, _study())
    with pytest.raises(ValueError, match=f"'{first}' and '{second}' would both write 'case_seg.nii.gz'"):
        screen_inference_images([first, second])
    workflow = bundle_workflow(
        ["inference.json"], "infer", datalist=[str(first), str(second)], output_dir=str(tmp_path / "o")
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert "would both write 'case_seg.nii.gz'" in _messages(raised.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_bundle_inference_writes_good_cases_and_fails_naming_bad_ones(tmp_path):
    good = [_save(tmp_path / "good_0.nii.gz", _study()), _save(tmp_path / "GOOD_1.NII.GZ", _study())]
    with_nan = _study()
    with_nan[3, 3, 0, 1] = np.nan
    bad = {
        "nan": _save(tmp_path / "nan.nii.gz", with_nan),
        "corrupt": _truncate(_save(tmp_path / "corrupt.nii.gz", _study())),
        "four": _save(tmp_path / "four.nii.gz", _study()[..., :4]),
        "zero": _save(tmp_path / "zero.nii.gz", np.zeros((32, 32, 3, 5), dtype=np.float32)),
        "no volume": _save(tmp_path / "no_volume.nii.gz", _study(), NO_VOLUME),
        "folder": tmp_path / "case_7",
    }
    bad["folder"].mkdir()
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
        "--bundle_root", str(BUNDLE), "--datalist", repr([str(p) for p in [good[0], *bad.values(), good[1]]]),
        "--ckpt_path", str(_network_checkpoint(tmp_path / "model.pt")), "--output_dir", str(out), "--num_workers", "0",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert completed.returncode != 0
    log = completed.stdout + completed.stderr
    assert "6 image(s) not segmented" in log
    assert f"{bad['nan']}: 1 NaN or Inf values in the CBF channel" in log
    assert f"{bad['corrupt']}: cannot read the voxels" in log
    assert f"{bad['four']}: expected a 4D image with 5 channels" in log
    assert f"{bad['zero']}: the CBF channel is all zero" in log
    assert f"{bad['no volume']}: its affine gives the voxels no volume" in log  # crashed the run up to 0.3.14
    assert f"{bad['folder']}: a folder, not a 5-channel NIfTI file" in log
    # the table names the mask SaveImaged wrote (it keeps the upper-case .NII of GOOD_1.NII.GZ)
    assert sorted(p.name for p in out.iterdir()) == ["GOOD_1.NII_seg.nii.gz", "good_0_seg.nii.gz", "lesion_volumes.csv"]
    with open(out / "lesion_volumes.csv") as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["good_0", "GOOD_1.NII"]


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_checkpoint_of_another_network_is_named(tiny_phantom_dataset, tmp_path, configs):
    checkpoint = _network_checkpoint(tmp_path / "four_channels.pt", in_channels=4)
    workflow = bundle_workflow(
        configs, "infer" if configs == ["inference.json"] else "train", dataset_dir=str(tiny_phantom_dataset),
        ckpt_path=str(checkpoint), output_dir=str(tmp_path / "out"), num_workers=0,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert f"checkpoint '{checkpoint}' does not fit model" in _messages(raised.value)
    assert "contralateral_channels or adjacent_slices" in _messages(raised.value)
    assert "size mismatch for model.0.conv.unit0.conv.weight" in _messages(raised.value)


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_truncated_checkpoint_is_named_as_unreadable(tiny_phantom_dataset, tmp_path, configs):
    whole = _network_checkpoint(tmp_path / "whole.pt", in_channels=5).read_bytes()
    checkpoint = tmp_path / "truncated.pt"
    checkpoint.write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    workflow = bundle_workflow(
        configs, "infer" if configs == ["inference.json"] else "train", dataset_dir=str(tiny_phantom_dataset),
        ckpt_path=str(checkpoint), output_dir=str(tmp_path / "out"), num_workers=0,
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = _messages(raised.value)
    assert f"checkpoint '{checkpoint}' cannot be read (truncated, or not a PyTorch checkpoint)" in message
    assert "does not fit" not in message


@pytest.mark.parametrize("path", ["evaluation", "inference", "inference ensemble"])
def test_weights_of_other_input_settings_are_refused_naming_the_record(tiny_phantom_dataset, tmp_path, path):
    """Weights trained with ``--contralateral_channels difference`` have the 10 input channels of ``mirror``: run with
    ``mirror`` they were loaded without a word. The training record beside them refuses it, naming the checkpoint,
    the record, the setting, both values and the override to pass; nothing is written. With the recorded settings
    the same weights run."""
    from custom.training_record import TRAINING_RECORD, write_training_record

    run = tmp_path / "difference_run"
    run.mkdir()
    trained = {"contralateral_channels": "difference", "adjacent_slices": 0, "spacing_mm": None}
    write_training_record(run, trained, fold=0, dataset_dir=tiny_phantom_dataset)  # at its start, as a run does
    checkpoint = _network_checkpoint(run / "model.pt", in_channels=10)
    configs = ["train.json", "evaluate.json"] if path == "evaluation" else ["inference.json"]
    ensemble = {}
    if path == "inference ensemble":  # two members of other weights, each with its record (one listed twice is refused)
        other_run = tmp_path / "difference_run_b"
        other_run.mkdir()
        write_training_record(other_run, trained, fold=0, dataset_dir=tiny_phantom_dataset)
        torch.manual_seed(1)
        torch.save(inference_network(in_channels=10).state_dict(), other_run / "model.pt")
        ensemble = {"ensemble_ckpt_paths": [str(checkpoint), str(other_run / "model.pt")]}

    def run_with(contralateral_channels):
        workflow = bundle_workflow(
            configs, "train" if path == "evaluation" else "infer", dataset_dir=str(tiny_phantom_dataset),
            ckpt_path=str(checkpoint), output_dir=str(tmp_path / contralateral_channels), num_workers=0,
            contralateral_channels=contralateral_channels, **ensemble,
        )  # fmt: skip
        workflow.initialize()
        workflow.run()

    with pytest.raises(Exception) as raised:
        run_with("mirror")
    message = _messages(raised.value)
    assert f"checkpoint '{checkpoint}' was trained with other settings than this run's" in message
    assert f"(recorded in '{run / TRAINING_RECORD}')" in message
    assert "contralateral_channels: trained with 'difference', this run 'mirror' " in message
    assert "(--contralateral_channels difference)" in message
    assert not (tmp_path / "mirror").exists()
    run_with("difference")
    written = "metrics.csv" if path == "evaluation" else "lesion_volumes.csv"
    assert (tmp_path / "difference" / written).is_file()


@pytest.mark.parametrize("record", ["images", "0.3.12"])
@pytest.mark.parametrize("fold", [1, -1])
def test_evaluating_a_checkpoint_on_cases_it_was_trained_on_is_refused(tiny_phantom_dataset, tmp_path, fold, record):
    """evaluate.json takes ``--fold`` and ``--ckpt_path`` apart: ``--fold 1 --ckpt_path runs/fold0/model.pt`` (or
    ``--fold -1``, every training case) scored fold 0's model on cases it was trained on, without a word. Its training
    record names the voxels of each image it was trained on: refused before anything is cached or written, naming
    the checkpoint, the record, how many and which images and the fold to evaluate; its own fold passes. A copy of
    the dataset whose dataset.json differs, with a case renamed, is refused too (it passed up to 0.3.12, and still
    does with a record of 0.3.12, which names the fold and the dataset.json's SHA-256 only)."""
    from custom.data.datalist import fold_datalist
    from custom.training_record import TRAINING_RECORD, check_held_out, write_training_record

    run = tmp_path / "fold0"
    run.mkdir()
    trained_cases = fold_datalist(tiny_phantom_dataset, 0, "train") if record == "images" else None
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
    write_training_record(run, settings, 0, tiny_phantom_dataset, trained_cases=trained_cases)  # as a run, first
    checkpoint = _network_checkpoint(run / "model.pt")
    workflow = bundle_workflow(
        ["train.json", "evaluate.json"], "train", dataset_dir=str(tiny_phantom_dataset), fold=fold,
        ckpt_path=str(checkpoint), output_dir=str(tmp_path / "eval"), num_workers=0,
    )  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = _messages(raised.value)
    dataset_json, recorded = tiny_phantom_dataset / "dataset.json", run / TRAINING_RECORD
    if record == "images":
        assert f"checkpoint '{checkpoint}' was trained on 4 of the {4 if fold == 1 else 8} images of config id " \
               f"'fold' {fold} of '{dataset_json}': case_4.nii.gz, case_5.nii.gz, case_6.nii.gz, case_8.nii.gz " \
               f"(same voxels; it was trained on every fold but 0 of '{dataset_json}', recorded in '{recorded}')" \
               in message
        assert "Their scores would be those of cases it learnt: evaluate its own fold with --fold 0" in message
    else:
        assert f"checkpoint '{checkpoint}' was trained on every fold but 0 of '{dataset_json}' " \
               f"(recorded in '{recorded}')" in message
        assert f"config id 'fold' {fold} scores cases it was trained on; evaluate its own fold with --fold 0" in message
    assert not (tmp_path / "eval").exists()
    check_held_out(checkpoint, 0, tiny_phantom_dataset, fold_datalist(tiny_phantom_dataset, 0, "validate"))
    other = shutil.copytree(tiny_phantom_dataset, tmp_path / "other")
    dataset = json.loads((other / "dataset.json").read_text())
    (other / "imagesTr" / "case_4.nii.gz").rename(other / "imagesTr" / "case_9.nii.gz")
    dataset["training"][3]["image"] = "imagesTr/case_9.nii.gz"
    (other / "dataset.json").write_text(json.dumps(dataset))
    cases = fold_datalist(other, fold, "validate")
    if record == "0.3.12":
        check_held_out(checkpoint, fold, other, cases)
        return
    with pytest.raises(ValueError, match=f"was trained on 4 of the {len(cases)} images"):  # a datalist of files only
        check_held_out(checkpoint, fold, other, [{"image": case["image"]} for case in cases])
    with pytest.raises(ValueError) as raised:
        check_held_out(checkpoint, fold, other, cases)
    assert f"4 of the {len(cases)} images of config id 'fold' {fold} of '{other / 'dataset.json'}': case_9.nii.gz " \
           f"(trained as '{tiny_phantom_dataset / 'imagesTr' / 'case_4.nii.gz'}'), case_5.nii.gz" in str(raised.value)
    assert f"evaluate it on the dataset it was trained on (--dataset_dir '{tiny_phantom_dataset}' --fold 0), or " \
           f"train fold {fold} of '{other / 'dataset.json'}' and evaluate that model" in str(raised.value)


def test_a_checkpoint_of_a_dataset_converted_again_into_its_folder_is_refused_with_advice_that_works(
    tiny_phantom_dataset, tmp_path
):
    """docs/data.md's re-conversion into the same folder (``--overwrite``) with folds that moved: the refusal advised
    evaluating the checkpoint on 'the dataset it was trained on', ``--dataset_dir`` that very folder, which now holds
    the new folds and is refused again. It says the dataset changed and to train the fold again."""
    from custom.data.datalist import fold_datalist
    from custom.data.isles2018 import prepare_isles2018
    from custom.training_record import check_held_out, write_training_record

    raw, dataset = tiny_phantom_dataset.parent / "isles2018", tmp_path / "dataset"
    prepare_isles2018(raw / "TRAINING", dataset, patients=raw / "patients.csv", folds=2, seed=0)
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
    write_training_record(tmp_path, settings, 0, dataset, trained_cases=fold_datalist(dataset, 0, "train"))
    checkpoint = _network_checkpoint(tmp_path / "model.pt")
    prepare_isles2018(raw / "TRAINING", dataset, patients=raw / "patients.csv", folds=2, seed=3, overwrite=True)
    with pytest.raises(ValueError) as raised:  # seed 3 swaps the two folds of this phantom
        check_held_out(checkpoint, 0, dataset, fold_datalist(dataset, 0, "validate"))
    assert "was trained on 4 of the 4 images of config id 'fold' 0" in str(raised.value)
    assert str(raised.value).endswith(
        f"cases it learnt: '{dataset / 'dataset.json'}' changed since it was trained (converted again?): train fold 0 "
        "on it again"
    )


# Outputs: a failed write (full disk, read-only folder) leaves nothing under the final name, and says which.
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_mask_writer_is_atomic_and_names_the_file(tmp_path, monkeypatch, error):
    def failing_save(image, filename):
        Path(filename).write_bytes(b"half a mask")
        raise OSError(error, "simulated")

    monkeypatch.setattr(nib, "save", failing_save)
    writer = ShapePreservingNibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(torch.ones(1, 8, 8, 2), channel_dim=0)
    writer.set_metadata({"affine": AFFINE, "original_affine": AFFINE}, resample=False)
    target = tmp_path / "case_seg.nii.gz"
    with pytest.raises(OSError) as raised:
        writer.write(target)
    assert f"while writing '{target}'" in " ".join(getattr(raised.value, "__notes__", []))
    assert list(tmp_path.iterdir()) == []


def cap_torch_quantile(monkeypatch):
    """Make ``torch.quantile`` refuse more than 2**24 elements, as the PyTorch releases setup.cfg allows
    (>= 2.4) do before the fix of pytorch/pytorch#64947 (the installed one may have the fix)."""
    quantile = torch.quantile

    def capped(input, *args, **kwargs):
        if input.numel() > 2**24:
            raise RuntimeError("quantile() input tensor is too large")
        return quantile(input, *args, **kwargs)

    monkeypatch.setattr(torch, "quantile", capped)


def test_normalisation_of_more_than_2_24_brain_voxels(monkeypatch):
    cap_torch_quantile(monkeypatch)
    torch.manual_seed(0)
    image = torch.rand(2, 4097, 4097)  # 16.8 M voxels per channel, all brain
    normalised = NormalizeWithinBrain(mask_channels=(1,))(image)
    values = image[1].double().flatten().numpy()
    low, high = np.quantile(values, [0.005, 0.995])
    clipped = np.clip(values, low, high)
    expected = ((clipped - clipped.mean()) / clipped.std()).astype(np.float32)
    np.testing.assert_allclose(normalised[1].flatten().numpy(), expected, atol=1e-5)


def test_brain_quantiles_equal_torch_quantile_where_it_works():
    values = torch.randn(10001, dtype=torch.float64)
    expected = torch.quantile(values, torch.tensor([0.005, 0.995], dtype=torch.float64))
    assert brain_quantiles(values, (0.005, 0.995)) == pytest.approx(expected.tolist(), rel=0, abs=1e-12)


def test_tables_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from custom import atomic
    from custom.handlers import LesionVolumeWriter
    from custom.reporting import write_case_csv

    def full_disk(path):
        raise OSError(errno.ENOSPC, "simulated")

    monkeypatch.setattr(atomic, "_fsync", full_disk)
    volumes, cases = tmp_path / "lesion_volumes.csv", tmp_path / "cases.csv"
    for table in (volumes, cases):
        table.write_text("the previous run's table\n")
    writer = LesionVolumeWriter(str(volumes))
    writer.rows = [{"case": "a", "image": "a.nii.gz", "lesion_voxels": 1, "lesion_ml": 0.1}]
    with pytest.raises(OSError, match="simulated"):
        writer._write(None)
    with pytest.raises(OSError, match="simulated"):
        write_case_csv([{"case": "a", "dice": 0.5}], str(cases))
    assert [t.read_text() for t in (volumes, cases)] == ["the previous run's table\n"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv", "lesion_volumes.csv"]
