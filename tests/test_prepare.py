"""The ISLES 2018 converter (discovery, conversion, refusals) and the patient-grouped fold assignment."""

import itertools
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_bad_inputs import NO_VOLUME, save_with_sform, store_in_meters, store_voxel_size

from custom.clinical import MODALITIES
from custom.data.check import check_dataset
from custom.data.folds import assign_folds
from custom.data.isles2018 import find_case_folders, patients_from_slab_geometry, prepare_isles2018
from custom.data.studies import find_case_maps

SHAPE = (20, 20, 3)
AFFINE = np.array([[-0.9, 0, 0, 115.0], [0, 0.9, 0, -100.0], [0, 0, 5.0, -20.0], [0, 0, 0, 1]])
VOXEL_ML = 0.9 * 0.9 * 5.0 / 1000.0
# A distinct value per map inside the brain, so a channel swap cannot go unnoticed.
MAP_VALUES = {"CT": 40, "CBF": 30.5, "CBV": 2.5, "MTT": 6.5, "Tmax": 3.5}
BRAIN = (slice(2, 14), slice(2, 14), slice(None))
_series_ids = itertools.count(345562)


def write_isles_case(
    split_dir, case, lesion_voxels=4, labelled=True, prefix="CT", skip=(), replace=None, with_pwi=False, gz=(),
    affine=AFFINE,
):
    """Write ``split_dir/case`` in the ISLES 2018 layout: ``SMIR.Brain.XX.O.<MOD>.<id>/<same>.nii`` per map.

    CT is int16 (with one voxel outside the brain that differs between cases), perfusion maps float32
    (``MAP_VALUES`` inside a brain box, 0 outside), OT uint8 with
    ``lesion_voxels`` lesion voxels. ``replace`` maps a map name (CT, CBF, ..., OT) to the array, or
    (array, affine), to write instead; ``skip`` omits maps; ``gz`` lists maps written as .nii.gz;
    ``with_pwi`` adds a 4DPWI folder whose file is not NIfTI, so opening it would fail; ``affine`` is the
    grid of every map.
    """
    replace = replace or {}
    folder = split_dir / case
    folder.mkdir(parents=True)
    maps = {}
    for name in (*MODALITIES, "OT"):
        if name in skip or (name == "OT" and not labelled):
            continue
        if name == "OT":
            data = np.zeros(SHAPE, np.uint8)
            data[4, 4 : 4 + lesion_voxels, 1] = 1
        else:
            data = np.zeros(SHAPE, np.int16 if name == "CT" else np.float32)
            data[BRAIN] = MAP_VALUES[name]
            if name == "CT":
                data[-1, -1, 0] = next(_series_ids) % 1000  # outside the brain: no two cases are one study, as in life
        map_affine = affine
        if name in replace:
            data, map_affine = replace[name] if isinstance(replace[name], tuple) else (replace[name], affine)
        modality = name if name in ("CT", "OT") else f"{prefix}_{name}"
        series = f"SMIR.Brain.XX.O.{modality}.{next(_series_ids)}"
        (folder / series).mkdir()
        path = folder / series / f"{series}.nii{'.gz' if name in gz else ''}"
        nib.save(nib.Nifti1Image(data, map_affine), path)
        maps[name] = path
    if with_pwi:
        series = f"SMIR.Brain.XX.O.{prefix}_4DPWI.{next(_series_ids)}"
        (folder / series).mkdir()
        (folder / series / f"{series}.nii").write_text("not a NIfTI file: the converter must never open it")
    return maps


def write_patients_csv(path, rows):
    """A patients CSV with an extra, ignored column."""
    path.write_text("case,patient,centre\n" + "".join(f"{case},{patient},A\n" for case, patient in rows))
    return path


def leftovers(folder, expected):
    """Entries of ``folder`` other than ``expected`` (temporary folders a failed conversion must not leave)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


def test_case_folders_sorted_naturally(tmp_path):
    for name in ("case_10", "case_2", "case_1", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "case_3.txt").write_text("not a folder")
    assert [p.name for p in find_case_folders(tmp_path, [])] == ["case_1", "case_2", "case_10"]


def test_maps_found_by_name_with_mr_spelling_and_pwi_ignored(tmp_path):
    written = write_isles_case(tmp_path, "case_1", prefix="MR", with_pwi=True, gz=("CBV",))
    found = find_case_maps(tmp_path / "case_1")
    assert found.name == "case_1"
    assert found.maps == {name: written[name] for name in MODALITIES}
    assert found.label == written["OT"]
    assert ".MR_CBF." in found.maps["CBF"].name and found.maps["CBV"].name.endswith(".nii.gz")
    assert not any("4DPWI" in str(p) for p in found.maps.values())


def test_macos_appledouble_files_are_ignored(tmp_path):
    """A copy made on macOS puts an AppleDouble ``._<name>`` (not NIfTI) beside every file and folder."""
    written = write_isles_case(tmp_path, "case_1")
    for path in written.values():
        for entry in (path, path.parent):
            (entry.parent / f"._{entry.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    found = find_case_maps(tmp_path / "case_1")
    assert found.maps == {name: written[name] for name in MODALITIES} and found.label == written["OT"]


def test_duplicated_modality_names_case_and_map(tmp_path):
    write_isles_case(tmp_path, "case_1")
    series = "SMIR.Brain.XX.O.MR_CBF.999"
    (tmp_path / "case_1" / series).mkdir()
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), tmp_path / "case_1" / series / f"{series}.nii")
    with pytest.raises(ValueError, match=r"case_1.*CBF found more than once"):
        find_case_maps(tmp_path / "case_1")


def test_good_conversion(tmp_path, capsys):
    src, testing = tmp_path / "TRAINING", tmp_path / "TESTING"
    lesions = {"case_1": 3, "case_2": 5, "case_10": 7}
    for case, voxels in lesions.items():
        write_isles_case(src, case, lesion_voxels=voxels, prefix="MR" if case == "case_2" else "CT", with_pwi=True)
    write_isles_case(src, "case_3", labelled=False)
    for case in ("case_20", "case_21"):
        write_isles_case(testing, case, labelled=False)
    patients = write_patients_csv(tmp_path / "patients.csv", [("case_1", "P1"), ("case_2", "P1"), ("case_10", "P2")])
    dst = tmp_path / "dataset"

    assert prepare_isles2018(src, dst, patients=patients, folds=2, seed=3, testing=testing) == dst

    dataset = json.loads((dst / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax"}
    assert dataset["labels"] == {"0": "background", "1": "lesion"}
    assert (dataset["num_folds"], dataset["numTraining"], dataset["numTest"]) == (2, 3, 3)
    assert [(e["case"], e["patient"], e["image"], e["label"]) for e in dataset["training"]] == [
        (c, p, f"imagesTr/{c}.nii.gz", f"labelsTr/{c}.nii.gz")
        for c, p in [("case_1", "P1"), ("case_2", "P1"), ("case_10", "P2")]
    ]
    fold = {e["case"]: e["fold"] for e in dataset["training"]}
    assert fold["case_1"] == fold["case_2"] != fold["case_10"]
    assert dataset["testing"] == [
        {"image": f"imagesTs/{c}.nii.gz", "case": c} for c in ("case_3", "case_20", "case_21")
    ]

    for entry in dataset["training"] + dataset["testing"]:
        image = nib.load(dst / entry["image"])
        data = np.asanyarray(image.dataobj)
        assert data.shape == SHAPE + (5,) and data.dtype == np.float32
        np.testing.assert_allclose(image.affine, AFFINE)
        np.testing.assert_allclose(image.header.get_zooms()[:3], (0.9, 0.9, 5.0))
        assert data[8, 8, 1].tolist() == [MAP_VALUES[m] for m in MODALITIES]
        assert not data[0, 0, 1].any()
    for entry in dataset["training"]:
        label = nib.load(dst / entry["label"])
        assert label.get_data_dtype() == np.uint8 and label.shape == SHAPE
        np.testing.assert_allclose(label.affine, AFFINE)
        assert np.asanyarray(label.dataobj).sum() == lesions[entry["case"]]

    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 6 and "case_10" in progress[2] and f"{7 * VOXEL_ML:.1f} mL" in progress[2]
    assert check_dataset(dst) == []
    assert leftovers(tmp_path, {"TRAINING", "TESTING", "patients.csv", "dataset"}) == []


def test_testing_cases_renamed_when_names_clash(tmp_path):
    write_isles_case(tmp_path / "TRAINING", "case_1")
    write_isles_case(tmp_path / "TRAINING", "case_2")
    write_isles_case(tmp_path / "TESTING", "case_1", labelled=False)
    dst = prepare_isles2018(tmp_path / "TRAINING", tmp_path / "out", folds=2, testing=tmp_path / "TESTING")
    testing = json.loads((dst / "dataset.json").read_text())["testing"]
    assert testing == [{"image": "imagesTs/TESTING_case_1.nii.gz", "case": "TESTING_case_1"}]
    assert (dst / "imagesTs" / "TESTING_case_1.nii.gz").is_file()


def test_testing_folder_that_is_the_source_folder_is_refused(tmp_path):
    """``--testing`` naming SRC again (here with a trailing slash) would copy every training case into the
    testing list."""
    write_isles_case(tmp_path / "TRAINING", "case_1")
    write_isles_case(tmp_path / "TRAINING", "case_2")
    with pytest.raises(ValueError, match=r"--testing '.*TRAINING/' is the source folder SRC '.*TRAINING'"):
        prepare_isles2018(tmp_path / "TRAINING", tmp_path / "out", folds=2, testing=f"{tmp_path}/TRAINING/")
    assert leftovers(tmp_path, {"TRAINING"}) == []


def test_case_of_source_with_an_unrecognised_ot_is_refused_and_one_without_ot_is_named(tmp_path, capsys):
    """A case of SRC without a recognised OT goes to testing by design; an OT folder renamed by a repeated
    download must not silently move a training case there, and every case that goes there is named on stderr."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    label = write_isles_case(src, "case_3")["OT"].parent
    renamed = label.with_name(f"{label.name} (1)")
    label.rename(renamed)
    with pytest.raises(ValueError, match=r"case_3': no OT map recognised, but '.*\.OT\.\d+ \(1\)' looks like one"):
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert leftovers(tmp_path, {"TRAINING"}) == []

    renamed.rename(tmp_path / "set_aside")
    (src / "case_3" / "notes.txt").write_text("no mask for this one")
    capsys.readouterr()
    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert json.loads((dst / "dataset.json").read_text())["testing"] == [
        {"image": "imagesTs/case_3.nii.gz", "case": "case_3"}
    ]
    warning = capsys.readouterr().err
    assert "WARNING: 1 case(s) of '" in warning and "have no OT mask: they go to the testing list" in warning
    assert f"  '{src / 'case_3'}': found CT, CBF, CBV, MTT, Tmax; other entries: notes.txt\n" in warning


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    cbf = np.zeros(SHAPE + (1,), np.float32)
    cbf[BRAIN] = MAP_VALUES["CBF"]
    write_isles_case(tmp_path / "TRAINING", "case_1", replace={"CBF": cbf})
    write_isles_case(tmp_path / "TRAINING", "case_2")
    dst = prepare_isles2018(tmp_path / "TRAINING", tmp_path / "out", folds=2)
    image = nib.load(dst / "imagesTr" / "case_1.nii.gz")
    assert image.shape == SHAPE + (5,) and image.dataobj[8, 8, 1, 1] == MAP_VALUES["CBF"]


def _shifted_affine():
    affine = AFFINE.copy()
    affine[0, 3] += 1.0
    return affine


def _with_nan():
    data = np.full(SHAPE, MAP_VALUES["CBF"], np.float32)
    data[3, 3, 0] = np.nan
    return data


def _rgb():
    data = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    data["R"] = 200
    return data


def _label_with_two():
    data = np.zeros(SHAPE, np.uint8)
    data[5, 5, 1] = 2
    return data


@pytest.mark.parametrize(
    "broken, message",
    [
        ({"skip": ("MTT",)}, r"case_3.*missing MTT"),
        ({"replace": {"CBV": np.ones((20, 20, 4), np.float32)}}, r"CT_CBV.*shape \(20, 20, 4\) differs"),
        ({"replace": {"Tmax": (np.ones(SHAPE, np.float32), _shifted_affine())}}, r"CT_Tmax.*affine differs"),
        ({"replace": {"CBF": _with_nan()}}, r"CT_CBF.*1 NaN or Inf"),
        ({"replace": {"OT": _label_with_two()}}, r"\.OT\..*found \[2\.0\]"),
        ({"replace": {"MTT": _rgb()}}, r"CT_MTT.*stored as 3-value records \(\('R', 'G', 'B'\).*scalar image"),
    ],
    ids=["missing-modality", "shape", "affine", "nan", "label-2", "rgb"],
)
def test_broken_case_is_refused_and_leaves_nothing(tmp_path, broken, message):
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    write_isles_case(src, "case_3", **broken)
    with pytest.raises(ValueError, match=message):
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert leftovers(tmp_path, {"TRAINING"}) == []


def test_a_case_whose_maps_have_no_voxel_volume_is_refused(tmp_path):
    """Maps whose sform matrix is zero (sform_code 1, srow unset) were converted, the lesion counted as 0.0 mL."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    for path in write_isles_case(src, "case_3").values():
        save_with_sform(path, np.array(nib.load(path, mmap=False).dataobj), NO_VOLUME)
    with pytest.raises(ValueError, match=r"case_3/SMIR\.Brain\.XX\.O\.CT\..*: its affine gives the voxels no volume"):
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert leftovers(tmp_path, {"TRAINING"}) == []


@pytest.mark.parametrize(
    "rewrite, problem",
    [
        (lambda path: store_voxel_size(path, (0.9, 0.9, 0.0)), "its header stores the voxel size"),  # AFFINE, slice 0
        (store_in_meters, "its header gives the voxel size in meters"),
        (lambda path: store_in_meters(path, unit="unknown"), r"its voxel size \[.*\] \(its affine, read as mm; "
                                                             r"xyzt_units 'unknown'\) is outside the 0\.05-30 mm"),
    ],
    ids=["slice-thickness-0", "meters", "meters-unit-unknown"],
)
def test_a_case_whose_voxel_size_is_not_read_in_mm_is_refused(tmp_path, rewrite, problem):
    """nibabel reads a stored slice thickness of 0 (no sform) as 1 mm, and an affine in meters as mm: the case was
    converted on that grid, its lesion volume wrong."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    for path in write_isles_case(src, "case_3").values():
        rewrite(path)
    with pytest.raises(ValueError, match=rf"case_3/SMIR\.Brain\.XX\.O\.CT\..*: {problem}"):
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert leftovers(tmp_path, {"TRAINING"}) == []


def test_every_broken_case_is_listed_in_one_refusal(tmp_path, capsys):
    """The converter stopped at the first broken case, so a user fixed one, reran, and met the next. Every case is
    checked now and one error lists each problem, with the messages of a single refusal; nothing is written."""
    src, testing = tmp_path / "TRAINING", tmp_path / "TESTING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2", skip=("MTT",))
    nan = write_isles_case(src, "case_3", replace={"CBF": _with_nan()})["CBF"]
    label = write_isles_case(src, "case_4", replace={"OT": _label_with_two()})["OT"]
    shutil.copytree(src / "case_1", src / "case_5")
    write_isles_case(src, "case_6", labelled=False)
    (src / "case_6" / "SMIR.Brain.XX.O.OT.1 (1)").mkdir()
    write_isles_case(testing, "case_7", labelled=False, skip=("CBV",))
    write_isles_case(src, "case_8")
    expected = [
        f"'{src / 'case_2'}': missing MTT",
        f"'{src / 'case_6'}': no OT map recognised, but 'SMIR.Brain.XX.O.OT.1 (1)' looks like one",
        f"'{testing / 'case_7'}': missing CBV",
        f"'{nan}': 1 NaN or Inf values",
        f"'{label}': label values must be 0 or 1, found [2.0]",
        f"'{src / 'case_5'}' holds the same maps as '{src / 'case_1'}'",
    ]
    with pytest.raises(ValueError) as refused:
        prepare_isles2018(src, tmp_path / "dataset", folds=2, testing=testing)
    lines = str(refused.value).splitlines()
    assert lines[0] == "6 problem(s) in the case folders; nothing written:"
    assert [line[4:].startswith(problem) for line, problem in zip(lines[1:], expected)] == [True] * 6, lines
    assert "case_8: 20x20x3, training" in capsys.readouterr().out  # read after the broken ones
    assert leftovers(tmp_path, {"TRAINING", "TESTING"}) == []

    for case in ("case_2", "case_5", "case_6"):  # the cases' maps are found; the rest is refused while converting
        shutil.rmtree(src / case)
    shutil.rmtree(testing)
    with pytest.raises(ValueError) as refused:
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert str(refused.value).splitlines()[1:] == [f"  - {problem}" for problem in expected[3:5]]
    assert leftovers(tmp_path, {"TRAINING"}) == []


def test_entries_of_src_that_are_no_case_folder_are_named_and_misnamed_cases_refused(tmp_path, capsys):
    """A case folder renamed by hand ('Case_3', 'case 4 copy') was skipped without a word: a study lost, and
    `check` could not tell. A folder holding ISLES 2018 maps under another name is refused by name; other entries
    are named in one warning line, hidden files (.DS_Store) aside."""
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2", "Case_3", "case 4 copy", ".case_9"):
        write_isles_case(src, case)
    (src / "README.txt").write_text("downloaded from SMIR")
    (src / ".DS_Store").write_bytes(b"\x00")
    (src / "__MACOSX" / "case_1").mkdir(parents=True)
    (src / "case_5.zip").write_bytes(b"PK")
    with pytest.raises(ValueError) as refused:
        prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert str(refused.value).splitlines()[1:] == [
        f"  - '{src / name}': holds ISLES 2018 maps (SMIR.Brain...) but is not named case_*, so it would not be "
        f"converted: rename it case_<N>, or move it out of '{src}'"
        for name in (".case_9", "case 4 copy", "Case_3")
    ]
    assert leftovers(tmp_path, {"TRAINING"}) == []
    warning = (f"WARNING: '{src}': 3 entries not converted (no case_* folder, no maps): __MACOSX, case_5.zip, "
               "README.txt\n")
    assert warning in capsys.readouterr().err

    for name in (".case_9", "Case_3", "case 4 copy"):
        (src / name).rename(tmp_path / name)
    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)
    assert [e["case"] for e in json.loads((dst / "dataset.json").read_text())["training"]] == ["case_1", "case_2"]
    assert warning in capsys.readouterr().err


def test_empty_source_is_refused(tmp_path):
    (tmp_path / "TRAINING").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no case_\* folders in '.*TRAINING'"):
        prepare_isles2018(tmp_path / "TRAINING", tmp_path / "dataset")
    assert leftovers(tmp_path, {"TRAINING"}) == []


@pytest.mark.parametrize("copy_to", ["TRAINING/case_1 (1)", "TESTING/case_3"])
def test_a_study_converted_twice_is_refused_naming_both_case_folders(tmp_path, copy_to):
    """A case folder copied under another name (a repeated download's 'case_1 (1)') became a patient of its own,
    in another fold than the original: the same study trained on and validated on, `check` finding no problem.
    Cases whose CT alone is the same (all zero, for data without a CT) are converted."""
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2", "case_3"):
        write_isles_case(src, case)
    write_isles_case(tmp_path / "TESTING", "case_4", labelled=False)
    shutil.copytree(src / "case_1", tmp_path / copy_to)
    expected = f"'{tmp_path / copy_to}' holds the same maps as '{src / 'case_1'}'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        prepare_isles2018(src, tmp_path / "dataset", folds=2, testing=tmp_path / "TESTING")
    assert leftovers(tmp_path, {"TRAINING", "TESTING"}) == []

    zero_ct = tmp_path / "ZERO_CT"
    for number in (1, 2):
        cbf = np.zeros(SHAPE, np.float32)
        cbf[BRAIN] = MAP_VALUES["CBF"] + number  # two patients' maps differ
        write_isles_case(zero_ct, f"case_{number}", replace={"CT": np.zeros(SHAPE, np.int16), "CBF": cbf})
    assert prepare_isles2018(zero_ct, tmp_path / "zero_ct_dataset", folds=2).is_dir()


def test_existing_dst_needs_overwrite_and_survives_a_failed_overwrite(tmp_path):
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)
    marker = dst / "imagesTs" / "from_the_previous_conversion.nii.gz"
    marker.write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_isles2018(src, dst, folds=2)

    write_isles_case(src, "case_3", replace={"CBF": _with_nan()})
    with pytest.raises(ValueError, match="NaN"):
        prepare_isles2018(src, dst, folds=2, overwrite=True)
    assert marker.is_file()
    assert leftovers(tmp_path, {"TRAINING", "dataset"}) == []

    (src / "case_3").rename(tmp_path / "set_aside")
    prepare_isles2018(src, dst, folds=2, overwrite=True)
    assert not marker.exists() and (dst / "dataset.json").is_file()
    assert leftovers(tmp_path, {"TRAINING", "dataset", "set_aside"}) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_empty_dst_made_beforehand_is_filled(tmp_path, overwrite):
    """`mkdir -p data/isles2018` then `prepare ... data/isles2018` was refused ('already exists; pass --overwrite'),
    and with --overwrite refused again ('holds no dataset.json ... --overwrite would delete everything in it'), for a
    folder holding nothing. The phantom fills an empty OUT; so does prepare now. A hidden file is still refused."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    dst = tmp_path / "dataset"
    dst.mkdir()
    assert prepare_isles2018(src, dst, folds=2, overwrite=overwrite) == dst
    assert (dst / "dataset.json").is_file() and leftovers(tmp_path, {"TRAINING", "dataset"}) == []

    other = tmp_path / "other"
    other.mkdir()
    (other / ".DS_Store").write_bytes(b"")
    with pytest.raises(FileExistsError, match="holds no dataset.json" if overwrite else "pass --overwrite"):
        prepare_isles2018(src, other, folds=2, overwrite=overwrite)
    assert [p.name for p in other.iterdir()] == [".DS_Store"]


def test_a_mount_point_dst_is_refused_before_converting(tmp_path, monkeypatch, capsys):
    """A mount point (an empty Docker volume) cannot be renamed over: taken as an empty DST, every case would be
    converted before the rename failed with 'Device or resource busy'. Refused before any case is read, naming it
    (no mount is made: the test marks DST as one)."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    dst = tmp_path / "dataset"
    dst.mkdir()
    is_mount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == dst or is_mount(path))
    with pytest.raises(ValueError, match=re.escape(f"'{dst}' is a mount point")):
        prepare_isles2018(src, dst, folds=2)
    assert "case_1" not in capsys.readouterr().out and list(dst.iterdir()) == []


def test_temporary_folder_of_a_killed_conversion_is_named(tmp_path, capsys):
    """kill -9 removes nothing: the next conversion names the hidden temporary folder it left (as large as a
    dataset), and leaves it (it may belong to a conversion still running)."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    leftover = tmp_path / ".dataset.0badc0de.tmp"
    (leftover / "imagesTr").mkdir(parents=True)
    prepare_isles2018(src, tmp_path / "dataset", folds=2)
    warning = capsys.readouterr().err
    assert f"temporary folder(s) of an interrupted write of '{tmp_path / 'dataset'}'" in warning
    assert f"\n  {leftover}" in warning
    assert leftover.is_dir() and (tmp_path / "dataset" / "dataset.json").is_file()


def test_overwrite_deletes_nothing_the_converter_did_not_write(tmp_path, monkeypatch):
    """--overwrite deletes the old DST, so it is refused for a folder without dataset.json, for a DST holding
    entries the converter does not write (named, also when they appear during the conversion), and for a
    --patients CSV inside DST; the user's files stay."""
    from custom.data import isles2018

    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    thesis = tmp_path / "notds" / "thesis.tex"
    thesis.parent.mkdir()
    thesis.write_text("not a dataset")
    with pytest.raises(FileExistsError, match=r"notds' holds no dataset\.json, so it is not a dataset folder"):
        prepare_isles2018(src, thesis.parent, folds=2, overwrite=True)

    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)
    patients = write_patients_csv(dst / "my_patients.csv", [("case_1", "P1"), ("case_2", "P2")])
    with pytest.raises(ValueError, match=r"would contain the --patients CSV '.*my_patients\.csv'; choose another"):
        prepare_isles2018(src, dst, patients=patients, folds=2, overwrite=True)
    (dst / "imagesTr" / "README").write_text("my notes on the images")
    with pytest.raises(FileExistsError, match=r"holds 2 entries this converter does not write, which --overwrite "
                       r"would delete: imagesTr/README, my_patients\.csv; move them out"):
        prepare_isles2018(src, dst, folds=2, overwrite=True)

    patients.unlink()
    (dst / "imagesTr" / "README").unlink()
    save = isles2018._save_on_ct_grid

    def save_while_the_user_adds_notes(data, ct_image, path):
        (dst / "late_notes.txt").write_text("written during the conversion")
        save(data, ct_image, path)

    monkeypatch.setattr(isles2018, "_save_on_ct_grid", save_while_the_user_adds_notes)
    with pytest.raises(FileExistsError, match=r"holds 1 entry this converter does not write.*: late_notes\.txt"):
        prepare_isles2018(src, dst, folds=2, overwrite=True)
    assert thesis.is_file() and (dst / "late_notes.txt").is_file() and (dst / "dataset.json").is_file()
    assert leftovers(tmp_path, {"TRAINING", "dataset", "notds"}) == []


def test_patients_csv_must_cover_training_cases(tmp_path):
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2", "case_3"):
        write_isles_case(src, case)
    patients = write_patients_csv(tmp_path / "patients.csv", [("case_1", "P1"), ("case_2", "P2")])
    with pytest.raises(ValueError, match=r"patients\.csv' has no patient for training case\(s\): case_3"):
        prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=2)
    (tmp_path / "bad.csv").write_text("case,subject\ncase_1,P1\n")
    with pytest.raises(ValueError, match=r"bad\.csv' needs a header with 'case' and 'patient'"):
        prepare_isles2018(src, tmp_path / "dataset", patients=tmp_path / "bad.csv", folds=2)
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize(
    "bad, message, mended",
    [
        # a row naming a patient but no case is an error, not a silently dropped row; an all-empty row
        # (spreadsheet padding) is skipped
        ("case,patient\ncase_1,P1\n,\ncase_2,P2\n ,P3\n", r"line 5: empty case \(patient 'P3'\)",
         "case,patient\ncase_1,P1\n,\ncase_2,P2\n"),
        # an unquoted comma in a note column gives a row more cells than the header (it crashed naming neither the
        # file nor the line); the same note quoted is read
        ("case,patient,note\ncase_1,P1,\ncase_2,P2,slab A, upper\n",
         "line 3: 4 cells, more than the header's 3; quote a cell",
         'case,patient,note\ncase_1,P1,\ncase_2,P2,"slab A, upper"\n'),
    ],
    ids=["row-without-case", "more-cells-than-the-header"],
)
def test_patients_csv_row_that_cannot_be_read_is_refused_naming_the_line(tmp_path, bad, message, mended):
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2"):
        write_isles_case(src, case)
    patients = tmp_path / "patients.csv"
    patients.write_text(bad)
    with pytest.raises(ValueError, match=r"patients\.csv' " + message):
        prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=2)
    assert leftovers(tmp_path, {"TRAINING", "patients.csv"}) == []
    patients.write_text(mended)
    prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=2)


def test_patients_csv_not_in_utf8_is_refused_naming_the_file_and_line(tmp_path):
    """A CSV saved by Excel as cp1252 with an accented centre name raised a bare UnicodeDecodeError naming neither
    the file nor the line. It is refused naming both and the encoding expected; Excel's "CSV UTF-8", with its
    byte-order mark, is read."""
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2"):
        write_isles_case(src, case)
    patients = tmp_path / "patients.csv"
    text = "case,patient,centre\ncase_1,P1,Zürich\ncase_2,P2,Hôpital de Genève\n"
    patients.write_bytes(text.encode("cp1252"))
    with pytest.raises(ValueError, match=re.escape(f"'{patients}' line 2: not UTF-8 (byte 0xfc); save the patients "
                                                   "CSV as UTF-8")):
        prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=2)
    assert leftovers(tmp_path, {"TRAINING", "patients.csv"}) == []
    patients.write_bytes(text.encode("utf-8-sig"))
    dst = prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=2)
    assert [e["patient"] for e in json.loads((dst / "dataset.json").read_text())["training"]] == ["P1", "P2"]


def test_fewer_patients_than_folds_is_refused_before_converting(tmp_path):
    src = tmp_path / "TRAINING"
    for case in ("case_1", "case_2", "case_3"):
        write_isles_case(src, case)
    patients = write_patients_csv(tmp_path / "patients.csv", [("case_1", "P1"), ("case_2", "P1"), ("case_3", "P2")])
    with pytest.raises(ValueError, match=r"fewer patients \(2\) than folds \(4\)"):
        prepare_isles2018(src, tmp_path / "dataset", patients=patients, folds=4)
    assert leftovers(tmp_path, {"TRAINING", "patients.csv"}) == []


def test_output_folder_that_cannot_be_written_is_refused_before_converting(tmp_path):
    write_isles_case(tmp_path / "TRAINING", "case_1")
    write_isles_case(tmp_path / "TRAINING", "case_2")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=f"output folder '{blocker}' is not writable"):
        prepare_isles2018(tmp_path / "TRAINING", blocker / "dataset", folds=2)


def test_dst_that_is_or_holds_the_working_folder_is_refused_before_converting(tmp_path, monkeypatch, capsys):
    """From inside the dataset folder, `prepare isles2018 SRC . --overwrite` converted every case into a temporary
    folder inside DST itself ('./..<id>.tmp', the sibling of '.'), then refused the run naming that folder as an
    entry the converter does not write. Now refused before any case is read, whatever the spelling."""
    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2")
    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)
    before = {p.relative_to(dst): p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()}
    capsys.readouterr()
    for working_folder, target in ((dst, "."), (dst / "imagesTr", ".."), (dst / "labelsTr", dst)):
        monkeypatch.chdir(working_folder)
        with pytest.raises(ValueError, match=rf"'{target}' is or holds the working folder '{working_folder}'"):
            prepare_isles2018(src, target, folds=2, overwrite=True)
        assert "case_1" not in capsys.readouterr().out  # refused before converting
    assert {p.relative_to(dst): p.stat().st_mtime_ns for p in dst.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path, {"TRAINING", "dataset"}) == []


def test_refused_run_creates_no_parent_folder_of_dst(tmp_path):
    """Neither a wrong SRC (refused before converting) nor a broken case (refused while converting) leaves the
    missing parent folders of DST behind."""
    with pytest.raises(FileNotFoundError, match=r"TRAININGX' is not a folder"):
        prepare_isles2018(tmp_path / "TRAININGX", tmp_path / "new" / "sub" / "dataset", folds=2)
    assert leftovers(tmp_path, set()) == []

    src = tmp_path / "TRAINING"
    write_isles_case(src, "case_1")
    write_isles_case(src, "case_2", replace={"CBF": _with_nan()})
    with pytest.raises(ValueError, match="NaN"):
        prepare_isles2018(src, tmp_path / "new" / "sub" / "dataset", folds=2)
    assert leftovers(tmp_path, {"TRAINING"}) == []


def _moved(affine, dx=0.0, dz=0.0, pixel=None):
    """``affine`` shifted by dx, dz mm (scanner axes), with another in-plane pixel size if given."""
    moved = affine.copy()
    moved[:3, 3] += (dx, 0.0, dz)
    if pixel is not None:
        moved[0, 0], moved[1, 1] = -pixel, pixel
    return moved


def test_without_patients_csv_neighbouring_slabs_are_grouped_loudly(tmp_path, capsys):
    src = tmp_path / "TRAINING"
    slab_height = SHAPE[2] * 5.0
    other_grid = _moved(AFFINE, pixel=1.0)
    geometry = {
        "case_1": AFFINE,
        "case_2": _moved(AFFINE, dz=slab_height),  # slab B of case_1: same in-plane grid, next heights
        "case_3": _moved(AFFINE, dz=2 * slab_height),  # same grid, but case_2 is already slab B ...
        "case_4": _moved(other_grid, dz=3 * slab_height),  # another pixel size
        "case_5": _moved(other_grid, dx=10.0, dz=4 * slab_height),  # another in-plane origin
        "case_6": _moved(other_grid, dx=10.0, dz=4 * slab_height),  # the same slice positions as case_5
        "case_7": _moved(other_grid, dx=10.0, dz=10 * slab_height),  # far above case_6
        "case_9": _moved(other_grid, dx=10.0, dz=11 * slab_height),  # next heights, but not the next case
    }
    for case, affine in geometry.items():
        write_isles_case(src, case, affine=affine)

    dst = prepare_isles2018(src, tmp_path / "dataset", folds=2)

    patient = {e["case"]: e["patient"] for e in json.loads((dst / "dataset.json").read_text())["training"]}
    chain = "case_1+case_2+case_3"  # ... so the three are one group: grouping errs on the side of no leak
    assert patient == {**{c: chain for c in ("case_1", "case_2", "case_3")}, **{c: c for c in list(geometry)[3:]}}
    warning = capsys.readouterr().err
    assert "WARNING: no --patients CSV" in warning and "94 slabs of 63 patients" in warning
    assert "  case_1 + case_2 + case_3\n" in warning and "--patients" in warning


def test_slab_grouping_finds_every_two_slab_patient_of_the_phantom(tmp_path, capsys):
    from custom.data.phantom import write_phantom

    raw = write_phantom(tmp_path / "raw", cases=16, test_cases=0, seed=0, size=32)
    truth = {}
    for line in (raw / "patients.csv").read_text().splitlines()[1:]:
        case, patient = line.split(",")[:2]
        truth.setdefault(patient, []).append(case)
    two_slab_patients = [cases for cases in truth.values() if len(cases) == 2]
    assert two_slab_patients, "the phantom cohort should hold two-slab patients"

    guessed = patients_from_slab_geometry([find_case_maps(f) for f in find_case_folders(raw / "TRAINING", [])])
    for cases in truth.values():
        assert len({guessed[c] for c in cases}) == 1, f"slabs {cases} of one phantom patient were split"
    warning = capsys.readouterr().err
    assert all(" + ".join(cases) in warning for cases in two_slab_patients)


def _two_slab_cohort():
    """20 patients, every third with two slabs, lesion volumes spread over two orders of magnitude."""
    case_patient, lesion_ml = {}, {}
    for patient in range(20):
        for slab in range(2 if patient % 3 == 0 else 1):
            case = f"case_{len(case_patient) + 1}"
            case_patient[case] = f"P{patient}"
            lesion_ml[case] = float((patient * 37) % 23) ** 2 / 4 + slab
    return case_patient, lesion_ml


def test_folds_keep_patients_together_and_cover_every_case():
    case_patient, lesion_ml = _two_slab_cohort()
    folds = assign_folds(case_patient, lesion_ml, num_folds=4, seed=0)
    assert list(folds) == list(case_patient) and set(folds.values()) == {0, 1, 2, 3}
    for patient in set(case_patient.values()):
        assert len({folds[c] for c, p in case_patient.items() if p == patient}) == 1
    counts = [list(folds.values()).count(f) for f in range(4)]
    assert max(counts) - min(counts) <= 2


def test_folds_balance_lesion_volume():
    volumes = [100.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0, 1.0]
    cases = {f"case_{i}": f"P{i}" for i in range(len(volumes))}
    folds = assign_folds(cases, {f"case_{i}": v for i, v in enumerate(volumes)}, num_folds=4, seed=0)
    totals = [sum(v for i, v in enumerate(volumes) if folds[f"case_{i}"] == f) for f in range(4)]
    counts = [list(folds.values()).count(f) for f in range(4)]
    # Dealt largest first to the lightest fold: {100, 1}, {50, 5}, {40, 10}, {30, 20}.
    assert sorted(totals) == [50.0, 50.0, 55.0, 101.0] and counts == [2, 2, 2, 2]


def test_folds_are_deterministic_for_a_seed():
    case_patient = {f"case_{i}": f"P{i}" for i in range(12)}
    no_lesions = dict.fromkeys(case_patient, 0.0)
    assert assign_folds(case_patient, no_lesions, 3, seed=5) == assign_folds(case_patient, no_lesions, 3, seed=5)
    assert len({tuple(assign_folds(case_patient, no_lesions, 3, seed=s).values()) for s in range(5)}) > 1


def test_folds_refuse_too_few_patients_and_mismatched_cases():
    with pytest.raises(ValueError, match=r"fewer patients \(2\) than folds \(3\)"):
        assign_folds({"a": "P1", "b": "P1", "c": "P2"}, {"a": 1.0, "b": 2.0, "c": 3.0}, num_folds=3)
    with pytest.raises(ValueError, match=r"differ on \['b'\]"):
        assign_folds({"a": "P1", "b": "P2"}, {"a": 1.0}, num_folds=2)


@pytest.mark.integration
def test_phantom_converts_and_passes_the_check(tmp_path):
    from custom.data.phantom import write_phantom

    raw = write_phantom(tmp_path / "raw", cases=6, test_cases=1, seed=1, size=32)
    dst = prepare_isles2018(
        f"{raw}/TRAINING", tmp_path / "dataset", patients=f"{raw}/patients.csv", folds=2, testing=f"{raw}/TESTING"
    )
    dataset = json.loads((dst / "dataset.json").read_text())
    assert len(dataset["training"]) == 6 and len(dataset["testing"]) == 1
    folds_of_patient = {}
    for entry in dataset["training"]:
        folds_of_patient.setdefault(entry["patient"], set()).add(entry["fold"])
    assert all(len(folds) == 1 for folds in folds_of_patient.values())
    assert check_dataset(dst) == []
