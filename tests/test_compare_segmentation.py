"""``python -m custom perfusion compare-segmentation``: computed vs given maps, same folds, compared case by case."""

import csv
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAINING

from custom.data import phantom
from custom.data.isles2018 import prepare_isles2018
from custom.perfusion.compare import (
    comparison_markdown,
    comparison_rows,
    compare_segmentation,
    false_positive_markdown,
    fold_assignment,
    require_same_folds,
    threshold_false_positives,
)


@pytest.fixture(scope="module")
def raw_phantom_with_series(tmp_path_factory):
    """6 labelled phantom cases (48 x 48) with their 4D series; no testing cases."""
    root = tmp_path_factory.mktemp("raw")
    return phantom.write_phantom(root / "isles", cases=6, test_cases=0, seed=2, size=48, pwi=True)


@pytest.mark.parametrize("with_patients", [True, False])
def test_given_and_computed_conversions_get_the_same_folds(raw_phantom_with_series, tmp_path, with_patients):
    raw = raw_phantom_with_series
    patients = raw / "patients.csv" if with_patients else None
    given = prepare_isles2018(raw / "TRAINING", tmp_path / "given", patients=patients, folds=2)
    computed = prepare_isles2018(raw / "TRAINING", tmp_path / "computed", patients=patients, folds=2, maps_from_4d=True)
    assert fold_assignment(given) == fold_assignment(computed)
    assert require_same_folds(given, computed) == fold_assignment(given)
    assert len({fold for _, fold in fold_assignment(given).values()}) == 2


def _dataset(folder, entries):
    folder.mkdir()
    training = [{"image": "", "label": "", "case": c, "patient": p, "fold": f} for c, p, f in entries]
    (folder / "dataset.json").write_text(json.dumps({"training": training}))
    return folder


def test_dataset_without_training_list_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"testing": []}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dataset.json'}' has no 'training' key")):
        fold_assignment(tmp_path)


def test_different_folds_or_cases_are_refused_naming_them(tmp_path):
    given = _dataset(tmp_path / "a", [("case_1", "p1", 0), ("case_2", "p2", 1), ("case_3", "p3", 1)])
    computed = _dataset(tmp_path / "b", [("case_1", "p1", 0), ("case_2", "p2", 0), ("case_4", "p4", 1)])
    with pytest.raises(ValueError, match="same") as error:
        require_same_folds(given, computed)
    message = str(error.value)
    assert "case_2: ('p2', 1)" in message and "('p2', 0)" in message
    assert "case_3" in message and "case_4" in message and "case_1" not in message


@pytest.mark.parametrize("override, error", [({"epochz": 5}, RuntimeError), ({"fold": 1}, ValueError)])
def test_bad_override_is_refused_before_any_conversion(tmp_path, override, error):
    with pytest.raises(error) as raised:
        compare_segmentation(str(tmp_path / "missing"), str(tmp_path / "out"), **override)
    assert "epochz" in str(raised.value.__cause__) or "itself for each fold" in str(raised.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_threshold_false_positives_are_counted_by_ct_density(tmp_path):
    image = np.zeros((8, 8, 2, 5), np.float32)
    image[1:7, 1:7, :, 0] = 35.0  # tissue
    image[1:3, 1:7, :, 0] = 5.0  # fluid: 24 voxels
    image[1:7, 1:7, :, 1:] = 1.0  # brain: 72 voxels
    label, flagged = np.zeros((8, 8, 2), np.uint8), np.zeros((8, 8, 2), np.uint8)
    label[4:6, 4:6, 0] = 1  # 4 voxels
    flagged[4:6, 4:6, 0] = 1  # on the label
    flagged[1, 1:4, 0] = 1  # 3 in fluid
    flagged[5, 1, 1] = 1  # 1 in tissue
    for folder, data in (("imagesTr", image), ("labelsTr", label), ("masks", flagged)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / folder / "case_1.nii.gz")
    modality = {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax"}
    training = [{"image": "imagesTr/case_1.nii.gz", "label": "labelsTr/case_1.nii.gz", "case": "case_1", "fold": 0}]
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": modality, "training": training}))
    counts = threshold_false_positives(tmp_path, tmp_path / "masks")
    assert counts == {"flagged": 8, "false_positive": 4, "false_positive_fluid": 3, "brain_fluid_share": 24 / 72}
    assert "| computed | 8 | 4 | 3 (75 %) | 33 % |" in false_positive_markdown({"computed": counts})


def _rows(dice, hd95=None):
    return [
        {"case": f"case_{i}", "fold": str(i % 2), "dice": d, "hd95_mm": hd95[i] if hd95 else 5.0, "avd_ml": 1.0,
         "lesion_f1": 0.5}
        for i, d in enumerate(dice)
    ]


def test_comparison_rows_pair_computed_with_given_case_by_case():
    case_rows = {
        ("bundle", "given"): _rows([0.5, 0.6, 0.7], hd95=[4.0, math.nan, 6.0]),
        ("bundle", "computed"): _rows([0.4, 0.6, 0.9], hd95=[5.0, 3.0, 5.0]),
        ("threshold", "given"): _rows([0.3, 0.3, 0.3]),
        ("threshold", "computed"): _rows([0.2, 0.2, 0.2]),
    }
    rows = comparison_rows(case_rows)
    assert [(r["method"], r["maps"]) for r in rows] == [
        ("bundle", "given"), ("bundle", "computed"), ("threshold", "given"), ("threshold", "computed")
    ]
    bundle = rows[1]
    assert bundle["dice_vs_given_mean_difference"] == pytest.approx(0.1 / 3)
    assert (bundle["dice_vs_given_improved"], bundle["dice_vs_given_worse"], bundle["dice_vs_given_equal"]) == (1, 1, 1)
    # HD95: lower is better; the case with an undefined distance is left out
    assert bundle["hd95_mm_vs_given_cases"] == 2 and bundle["hd95_mm_vs_given_excluded_nan"] == 1
    assert (bundle["hd95_mm_vs_given_improved"], bundle["hd95_mm_vs_given_worse"]) == (1, 1)
    assert rows[3]["dice_vs_given_mean_difference"] == pytest.approx(-0.1)
    assert "dice_vs_given_mean_difference" not in rows[0]
    without_bundle = comparison_rows({key: value for key, value in case_rows.items() if key[0] == "threshold"})
    assert without_bundle == rows[2:]
    table = comparison_markdown(rows).splitlines()
    assert len(table) == 6 and "computed - given" in table[0]
    assert "-0.100 ± 0.000; 0 / 3 of 3" in table[5]
    assert "0.600 ± 0.082 (0.600)" in table[2]
    # both sources' HD95 over the two cases where both have one (computed's was over its three)
    assert (rows[0]["hd95_mm_n"], rows[1]["hd95_mm_n"]) == (2, 2)
    assert rows[1]["hd95_mm_mean"] == pytest.approx(5.0) and "5.000 ± 0.000 (5.000), n=2" in table[3]


@pytest.mark.slow
@pytest.mark.integration
def test_compare_segmentation_end_to_end_and_resumes(raw_phantom_with_series, tmp_path, capsys):
    raw = raw_phantom_with_series
    out = tmp_path / "compare"
    overrides = {**TINY_TRAINING, "epochs": 1}
    patients = str(raw / "patients.csv")
    rows = compare_segmentation(str(raw / "TRAINING"), str(out), patients=patients, folds=2, **overrides)
    assert [(r["method"], r["maps"]) for r in rows] == [
        ("bundle", "given"), ("bundle", "computed"), ("threshold", "given"), ("threshold", "computed")
    ]
    assert all(r["cases"] == 6 and r["dice_vs_given_cases"] + r["dice_vs_given_excluded_nan"] == 6
               for r in rows if r["maps"] == "computed")
    assert "same patients and folds in both conversions: 6 training cases in 2 folds" in capsys.readouterr().out
    for source in ("given", "computed"):
        for result in ("cv/summary.md", "baseline/summary.md", "dataset/dataset.json", "conversion.json"):
            assert (out / source / result).is_file()
    with open(out / "comparison_cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert sorted(c["case"] for c in cases) == [f"case_{i}" for i in range(1, 7)]
    assert all(0.0 <= float(c["dice_bundle_computed"]) <= 1.0 for c in cases)
    table = (out / "comparison.md").read_text()
    assert "| bundle recipe, maps computed from the 4D series | 6 |" in table and "| computed | " in table

    model = out / "computed" / "cv" / "fold_0" / "models" / "model.pt"
    written = model.stat().st_mtime
    again = compare_segmentation(str(raw / "TRAINING"), str(out), patients=patients, folds=2, **overrides)
    printed = capsys.readouterr().out
    assert "computed: reusing the conversion" in printed and "already done, skipped" in printed
    assert model.stat().st_mtime == written
    assert json.dumps(again, default=str) == json.dumps(rows, default=str)
    fold_0 = sum(1 for c in cases if c["fold"] == "0")
    partial = compare_segmentation(str(raw / "TRAINING"), str(out), patients=patients, folds=2, cv_folds=1, **overrides)
    assert [r["cases"] for r in partial] == [fold_0, fold_0, 6, 6]
    assert "the first 1 fold(s) only" in (out / "comparison.md").read_text()
    threshold_only = compare_segmentation(str(raw / "TRAINING"), str(out), patients=patients, folds=2, cv_folds=0)
    assert [(r["method"], r["cases"]) for r in threshold_only] == [("threshold", 6), ("threshold", 6)]
    assert threshold_only[1]["dice_vs_given_mean_difference"] == rows[3]["dice_vs_given_mean_difference"]
    with pytest.raises(ValueError, match="fold_seed differ"):
        compare_segmentation(str(raw / "TRAINING"), str(out), patients=patients, folds=2, fold_seed=1, **overrides)
