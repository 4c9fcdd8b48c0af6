"""Cross-validation orchestration, the loss ablation table, the threshold baseline on the phantom, figures."""

import csv
import json

import pytest
from conftest import TINY_TRAINING

from custom.ablation import LOSS_VARIANTS, ablation_markdown
from custom.baseline import run_baseline
from custom.crossval import CASE_METRICS, latest_checkpoint, run_cross_validation


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"latest_checkpoint_epoch={epoch}.pt").touch()
    (tmp_path / "model.pt").touch()
    assert latest_checkpoint(tmp_path).name == "latest_checkpoint_epoch=10.pt"


def test_cross_validation_rejects_folds_not_in_dataset(tiny_phantom_dataset, tmp_path):
    with pytest.raises(ValueError, match="does not match the folds"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=3)


@pytest.mark.integration
def test_cross_validation_writes_folds_and_skips_finished_ones(tiny_phantom_dataset, tmp_path, capsys):
    out = tmp_path / "cv"
    overrides = {**TINY_TRAINING, "epochs": 1}
    summary = run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, **overrides)
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    with open(out / "cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert sorted(row["case"] for row in cases) == sorted(e["case"] for e in dataset["training"])
    folds_by_case = {e["case"]: e["fold"] for e in dataset["training"]}
    assert all(int(row["fold"]) == folds_by_case[row["case"]] for row in cases)
    assert all(0.0 <= float(row["dice"]) <= 1.0 for row in cases)
    assert [str(row["fold"]) for row in summary] == ["0", "1", "all"]
    assert summary[-1]["cases"] == len(cases)
    assert "| all |" in (out / "summary.md").read_text()
    for fold in (0, 1):
        assert (out / f"fold_{fold}" / "fold_done.json").is_file()
        assert (out / f"fold_{fold}" / "models" / "model.pt").is_file()
        assert any((out / f"fold_{fold}" / "eval" / "masks").glob("*_seg.nii.gz"))
    capsys.readouterr()

    model_time = (out / "fold_0" / "models" / "model.pt").stat().st_mtime
    again = run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, **overrides)
    assert "already done, skipped" in capsys.readouterr().out
    assert (out / "fold_0" / "models" / "model.pt").stat().st_mtime == model_time
    assert again == summary


def test_ablation_table_reports_paired_difference():
    rows = [
        {"variant": name, "description": name, "cases": 4,
         **{f"{m}_{s}": 0.5 for m in ("dice", "hd95_mm", "avd_ml", "lesion_f1") for s in ("mean", "std")},
         "dice_vs_ce_mean_difference": delta, "dice_vs_ce_std_difference": 0.01,
         "dice_vs_ce_improved": improved, "dice_vs_ce_worse": 4 - improved, "dice_vs_ce_cases": 4}
        for name, delta, improved in (("ce", 0.0, 0), ("wce_gdl", 0.021, 3))
    ]
    table = ablation_markdown(rows, "ce")
    assert "+0.021 ± 0.010" in table and "3 / 1 (of 4)" in table
    assert set(LOSS_VARIANTS) >= {"ce", "gdl", "wce_gdl", "dice_ce"}


def test_baseline_on_phantom_is_in_range(tiny_phantom_dataset, tmp_path):
    summary = run_baseline(str(tiny_phantom_dataset), str(tmp_path / "baseline"))
    overall = summary[-1]
    assert 0.0 <= overall["dice_mean"] < 0.9
    assert overall["cases"] == len(json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"])
    with open(tmp_path / "baseline" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for metric in CASE_METRICS:
            value = float(row[metric])
            assert value != value or value >= 0.0  # NaN (undefined) or non-negative
            if metric in ("dice", "precision", "recall", "lesion_f1"):
                assert value != value or value <= 1.0
