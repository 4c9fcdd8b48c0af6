"""The dataset check: passes a good dataset folder, names the file or key of every broken variant."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from test_bad_inputs import NO_VOLUME, save_with_sform

from custom.data.check import check_dataset, check_dataset_command

SHAPE = (20, 20, 3)
AFFINE = np.diag([0.9, 0.9, 5.0, 1.0])
BRAIN = (slice(2, 14), slice(2, 14), slice(None))
# case -> (patient, fold, lesion voxels): two patients with two slabs each, one per fold.
TRAINING = {"case_1": ("P1", 0, 10), "case_2": ("P1", 0, 20), "case_3": ("P2", 1, 30), "case_4": ("P2", 1, 0)}


def make_image(channels=5, ct=0.0):
    """A (20, 20, 3, channels) float32 image: channel c holds c + 1 inside a brain box, 0 outside; ``ct`` is added to
    the CT channel (channel 0) everywhere, so that studies differ."""
    data = np.zeros(SHAPE + (channels,), np.float32)
    data[BRAIN] = np.arange(1, channels + 1, dtype=np.float32)
    data[..., 0] += ct
    return data


def make_label(lesion_voxels):
    label = np.zeros(SHAPE, np.uint8)
    label[4:14, 4:7, 1].flat[:lesion_voxels] = 1
    return label


def save(folder, relative, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(data, affine), folder / relative)


def edit_json(folder, change):
    path = folder / "dataset.json"
    dataset = json.loads(path.read_text())
    change(dataset)
    path.write_text(json.dumps(dataset))


@pytest.fixture
def dataset_dir(tmp_path):
    """A good dataset folder in the data contract: four training cases in two folds, one testing case."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp_path / sub).mkdir()
    training = []
    for number, (case, (patient, fold, voxels)) in enumerate(TRAINING.items(), start=1):
        save(tmp_path, f"imagesTr/{case}.nii.gz", make_image(ct=number))
        save(tmp_path, f"labelsTr/{case}.nii.gz", make_label(voxels))
        training.append(
            {
                "image": f"imagesTr/{case}.nii.gz",
                "label": f"labelsTr/{case}.nii.gz",
                "fold": fold,
                "patient": patient,
                "case": case,
            }
        )
    save(tmp_path, "imagesTs/case_5.nii.gz", make_image(ct=5))
    dataset = {
        "name": "toy",
        "description": "check test",
        "modality": {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax"},
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": 4,
        "numTest": 1,
        "num_folds": 2,
        "training": training,
        "testing": [{"image": "imagesTs/case_5.nii.gz", "case": "case_5"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    return tmp_path


def test_good_dataset_passes_with_a_summary(dataset_dir, capsys):
    assert check_dataset(dataset_dir) == []
    assert check_dataset_command(dataset_dir) is None
    out = capsys.readouterr().out
    assert "4 readable training cases from 2 patients, 12 slices, 1 testing case, 2 folds" in out
    voxel_ml = 0.9 * 0.9 * 5.0 / 1000
    per_case = f"{10 * voxel_ml:.1f} / {15 * voxel_ml:.1f} / {20 * voxel_ml:.1f}"
    assert f"   0      2         1       6 {30 * voxel_ml:>10.1f}  {per_case}" in out and "no problems found" in out


def _remove_label(folder):
    (folder / "labelsTr/case_2.nii.gz").unlink()


def _four_channels(folder):
    save(folder, "imagesTr/case_1.nii.gz", make_image(channels=4))


def _label_shape(folder):
    save(folder, "labelsTr/case_3.nii.gz", np.zeros((20, 20, 4), np.uint8))


def _label_affine(folder):
    affine = AFFINE.copy()
    affine[2, 3] = 5.0
    save(folder, "labelsTr/case_1.nii.gz", make_label(10), affine)


def _label_two(folder):
    label = make_label(5)
    label[8, 8, 2] = 2
    save(folder, "labelsTr/case_4.nii.gz", label)


def _nan_image(folder):
    image = make_image()
    image[5, 5, 0, 2] = np.nan
    save(folder, "imagesTr/case_2.nii.gz", image)


def _empty_brain(folder):
    image = make_image()
    image[..., 1:] = 0
    save(folder, "imagesTr/case_3.nii.gz", image)


def _inf_testing_image(folder):
    image = make_image()
    image[5, 5, 0, 4] = np.inf
    save(folder, "imagesTs/case_5.nii.gz", image)


def _corrupt_image(folder):
    (folder / "imagesTr/case_4.nii.gz").write_bytes(b"not a gzip stream")


def _patient_in_two_folds(folder):
    edit_json(folder, lambda d: d["training"][1].update(fold=1))


def _fold_out_of_range(folder):
    edit_json(folder, lambda d: d["training"][0].update(fold=2))


def _empty_fold(folder):
    edit_json(folder, lambda d: [e.update(fold=0) for e in d["training"]])


def _duplicate_case(folder):
    edit_json(folder, lambda d: d["testing"][0].update(case="case_3"))


def _missing_patient(folder):
    edit_json(folder, lambda d: d["training"][2].pop("patient"))


def _one_study_in_two_training_cases(folder):
    edit_json(folder, lambda d: d["training"][2].update(image="imagesTr/case_1.nii.gz", label="labelsTr/case_1.nii.gz"))


def _training_image_in_testing(folder):
    edit_json(folder, lambda d: d["testing"][0].update(image="./imagesTr/case_2.nii.gz"))


def _training_image_name_in_testing(folder):
    """Another file of a training image's name: MONAI Label took both as one study, inference as one mask."""
    save(folder, "imagesTs/case_2.nii.gz", make_image())
    edit_json(folder, lambda d: d["testing"][0].update(image="imagesTs/case_2.nii.gz"))


def _wrong_modality(folder):
    edit_json(folder, lambda d: d["modality"].update({"1": "rCBF"}))


def _miscount(folder):
    edit_json(folder, lambda d: d.update(numTraining=5))


def _too_small(folder):
    save(folder, "imagesTs/case_5.nii.gz", make_image()[:16, :16])


def _copy_of_a_training_study_in_testing(folder):
    shutil.copyfile(folder / "imagesTr/case_2.nii.gz", folder / "imagesTs/case_5.nii.gz")


def _coronal_testing_image(folder):
    # the voxels of an axial stack stored with the second and third axes swapped: coronal slices on the third axis
    save(folder, "imagesTs/case_5.nii.gz", make_image(), AFFINE[:, [0, 2, 1, 3]])


def _testing_image_without_voxel_volume(folder):
    # an sform of code 1 whose matrix was left unset: no voxel volume, so no lesion volume (passed up to 0.3.14)
    save_with_sform(folder / "imagesTs/case_5.nii.gz", make_image(), NO_VOLUME)


def _no_dataset_json(folder):
    (folder / "dataset.json").unlink()


@pytest.mark.parametrize(
    "break_dataset, expected",
    [
        (_remove_label, ["labelsTr/case_2.nii.gz: missing", "training[1].label"]),
        (_four_channels, ["imagesTr/case_1.nii.gz", "5 channels", "(20, 20, 3, 4)"]),
        (_label_shape, ["labelsTr/case_3.nii.gz", "shape (20, 20, 4) differs from imagesTr/case_3.nii.gz"]),
        (_label_affine, ["labelsTr/case_1.nii.gz", "affine differs from imagesTr/case_1.nii.gz"]),
        (_label_two, ["labelsTr/case_4.nii.gz", "found [2]"]),
        (_nan_image, ["imagesTr/case_2.nii.gz", "1 NaN or Inf values in the CBV channel"]),
        (_empty_brain, ["imagesTr/case_3.nii.gz", "CBF channel is all zero"]),
        (_inf_testing_image, ["imagesTs/case_5.nii.gz", "Tmax channel"]),
        (_corrupt_image, ["imagesTr/case_4.nii.gz: cannot read as NIfTI"]),
        (_patient_in_two_folds, ["patient 'P1' is in folds [0, 1] (cases case_1, case_2)"]),
        (_fold_out_of_range, ["training[0].fold", "in [0, 2)", "found 2"]),
        (_empty_fold, ["dataset.json training: fold 1 has no cases"]),
        (_duplicate_case, ["testing[0]: case 'case_3' repeats dataset.json training[2]"]),
        (_missing_patient, ["training[2]: missing patient"]),
        (_one_study_in_two_training_cases,
         ["training[2].label: 'labelsTr/case_1.nii.gz' is also dataset.json training[0].label"]),
        (_training_image_in_testing,
         ["testing[0].image: './imagesTr/case_2.nii.gz' is also dataset.json training[1].image"]),
        (_training_image_name_in_testing,
         ["testing[0].image: 'imagesTs/case_2.nii.gz' has the case name 'case_2' of dataset.json training[1].image "
          "'imagesTr/case_2.nii.gz'"]),
        (_wrong_modality, ["dataset.json 'modality'", "rCBF"]),
        (_miscount, ["'numTraining' is 5 but 'training' has 4"]),
        (_too_small, ["imagesTs/case_5.nii.gz: in-plane size 16 x 16 is below the network's minimum 17 x 17"]),
        (_no_dataset_json, ["dataset.json' is missing"]),
        (_copy_of_a_training_study_in_testing,
         ["testing[0].image: 'imagesTs/case_5.nii.gz' holds the voxels of dataset.json training[1].image "
          "'imagesTr/case_2.nii.gz'"]),
        (_coronal_testing_image, ["imagesTs/case_5.nii.gz: its third voxel axis runs front-back", "must be axial"]),
        (_testing_image_without_voxel_volume, ["imagesTs/case_5.nii.gz: its affine gives the voxels no volume"]),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_broken_dataset_is_reported(dataset_dir, break_dataset, expected):
    break_dataset(dataset_dir)
    problems = check_dataset(dataset_dir)
    assert any(all(part in problem for part in expected) for problem in problems), problems


def test_command_prints_every_problem_and_exits_non_zero(dataset_dir, capsys):
    _label_two(dataset_dir)
    _nan_image(dataset_dir)
    with pytest.raises(SystemExit) as exit_info:
        check_dataset_command(dataset_dir)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "2 problem(s):" in out and "labelsTr/case_4.nii.gz" in out and "imagesTr/case_2.nii.gz" in out


def test_summary_counts_only_named_patients(dataset_dir, capsys):
    edit_json(dataset_dir, lambda d: [entry.pop("patient") for entry in d["training"][2:]])
    with pytest.raises(SystemExit):
        check_dataset_command(dataset_dir)
    out = capsys.readouterr().out
    assert "4 readable training cases from 1 patient," in out
    assert "   1      2         0 " in out  # fold 1's cases name no patient


def test_command_on_a_missing_folder_names_it_without_a_fold_count(tmp_path, capsys):
    with pytest.raises(SystemExit):
        check_dataset_command(str(tmp_path / "missing"))
    out = capsys.readouterr().out
    assert "0 testing cases, no valid number of folds" in out and "None" not in out
    assert f"dataset_dir '{tmp_path / 'missing'}' does not exist" in out


def test_a_fold_without_any_lesion_is_the_problem_training_refuses_it_for(dataset_dir, capsys):
    """check printed "no problems found" for a dataset whose fold held no lesion voxel, which training that fold (and
    cv) refuses; it names each such fold in fold_datalist's words. Evaluation scores the fold (false positives)."""
    from custom.data.datalist import fold_datalist

    save(dataset_dir, "labelsTr/case_3.nii.gz", make_label(0))  # fold 1: case_3 and case_4, both lesion-free now
    problems = check_dataset(dataset_dir)
    assert len(problems) == 2, problems
    assert problems[0].startswith("no label of the 2 training cases of fold 0 holds a lesion voxel: the network")
    assert problems[1].startswith("no label of the 2 validation cases of fold 1 holds a lesion voxel: the best model")
    for problem, fold, role in zip(problems, (0, 1), ("train", "validate")):
        with pytest.raises(ValueError) as refused:
            fold_datalist(dataset_dir, fold, role)
        assert str(refused.value).endswith(problem)
    assert len(fold_datalist(dataset_dir, 1, "evaluate")) == 2
    with pytest.raises(SystemExit) as exit_info:
        check_dataset_command(dataset_dir)
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "no problems found" not in out
    assert all(f"  - {problem}" in out for problem in problems)

    # a label of 2 is a lesion to fold_datalist (and a problem of its own), so fold 1 is not called lesion-free
    label = make_label(0)
    label[8, 8, 2] = 2
    save(dataset_dir, "labelsTr/case_4.nii.gz", label)
    assert not [p for p in check_dataset(dataset_dir) if "holds a lesion voxel" in p]
    # a label that cannot be read: whether its fold holds a lesion is unknown, and the missing file is the problem
    save(dataset_dir, "labelsTr/case_4.nii.gz", make_label(0))
    (dataset_dir / "labelsTr/case_4.nii.gz").unlink()
    problems = check_dataset(dataset_dir)
    assert len(problems) == 1 and problems[0].startswith("labelsTr/case_4.nii.gz: missing"), problems
