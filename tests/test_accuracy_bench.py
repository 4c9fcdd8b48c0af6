"""The fixed-budget accuracy benchmark: budget arithmetic, the table, the command end to end."""

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.accuracy_bench import (
    METHODS,
    comparison_rows,
    ignite_epoch_seconds,
    score_masks_command,
)
from custom.data.datalist import load_dataset_json


def test_epoch_times_are_read_from_ignite_logs():
    log = (
        "2026-11-25 01:04:12,432 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. "
        "Time taken: 00:01:02.500\n"
        "2026-11-25 01:04:12,741 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[3] Complete. "
        "Time taken: 00:00:00.165\n"
    )
    assert ignite_epoch_seconds(log, "SupervisedTrainer") == [62.5]
    assert ignite_epoch_seconds(log, "SupervisedEvaluator") == [0.165]


def _rows(method, dice, hd95):
    return [
        {"method": method, "case": f"case_{i}", "dice": d, "hd95_mm": h, "avd_ml": 1.0, "lesion_f1": 1.0}
        for i, (d, h) in enumerate(zip(dice, hd95))
    ]


def test_distances_are_compared_on_the_cases_every_method_has():
    nan = math.nan
    cases = {"bundle": _rows("bundle", [0.5, 0.6, 0.0], [10.0, 20.0, nan]),
             "threshold": _rows("threshold", [0.4, 0.0, 0.3], [30.0, nan, 50.0])}
    rows = {row["method"]: row for row in comparison_rows(cases, {}, "bundle")}
    assert rows["bundle"]["hd95_mm_n"] == rows["threshold"]["hd95_mm_n"] == 1  # only case_0 has both
    assert rows["bundle"]["hd95_mm_mean"] == 10.0 and rows["threshold"]["hd95_mm_mean"] == 30.0
    assert rows["threshold"]["dice_vs_bundle_mean_difference"] == pytest.approx((-0.1 - 0.6 + 0.3) / 3)


def test_the_bundle_row_names_its_overrides_instead_of_claiming_the_defaults():
    cases = {"bundle": _rows("bundle", [0.5, 0.6], [10.0, 20.0]),
             "threshold": _rows("threshold", [0.4, 0.3], [3.0, 5.0])}
    facts = {"bundle": {"overrides": {"adjacent_slices": 1, "loss#lambda_gdl": 0}}, "threshold": {}}
    rows = {row["method"]: row for row in comparison_rows(cases, facts, "bundle")}
    assert rows["bundle"]["description"] == (
        "the bundle (train.json with --adjacent_slices 1 --loss#lambda_gdl 0, epochs fitted to the budget)")
    assert rows["threshold"]["description"] == "threshold rule rCBF < 30 % within Tmax > 6 s"
    plain = comparison_rows(cases, {"bundle": {"overrides": {}}}, "bundle")[0]
    assert plain["description"] == "the bundle (train.json defaults, epochs fitted to the budget)"


@pytest.mark.slow
def test_quick_benchmark_scores_every_method_on_the_same_cases(tmp_path):
    from custom.accuracy_bench import run_accuracy_bench

    # nnU-Net is the `bench` extra, not a test requirement: without it the other methods are compared
    methods = [m for m in METHODS if m != "nnunet_2d" or importlib.util.find_spec("nnunetv2") is not None]
    run_accuracy_bench(out=str(tmp_path), quick=True, methods=",".join(methods))
    with open(tmp_path / "accuracy.csv") as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert set(table) == set(methods)
    case_sets = []
    for method in methods:
        assert math.isfinite(float(table[method]["dice_mean"]))
        with open(tmp_path / method / "cases.csv") as f:
            rows = list(csv.DictReader(f))
        assert all(math.isfinite(float(row["dice"])) for row in rows)
        case_sets.append({row["case"] for row in rows})
    assert all(cases == case_sets[0] for cases in case_sets) and len(case_sets[0]) == int(table["bundle"]["cases"])


@pytest.mark.parametrize("methods, score_on", [("bundle,nnunet_2d", "inner"), ("bundle", "validation")])
def test_score_on_refuses_what_it_cannot_score_before_writing_anything(tmp_path, methods, score_on):
    from custom.accuracy_bench import run_accuracy_bench

    with pytest.raises(ValueError, match="--score_on"):
        run_accuracy_bench(out=str(tmp_path / "bench"), quick=True, methods=methods, score_on=score_on)
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
def test_quick_benchmark_scored_on_the_inner_fold_never_reads_a_test_phantom(tmp_path):
    from custom.accuracy_bench import INNER_VALIDATION_FOLD, run_accuracy_bench
    from custom.data.datalist import load_dataset_json

    run_accuracy_bench(out=str(tmp_path), quick=True, methods="bundle,threshold", score_on="inner")
    inner = {e["case"] for e in load_dataset_json(tmp_path / "train" / "dataset")["training"]
             if e["fold"] == INNER_VALIDATION_FOLD}
    for method in ("bundle", "threshold"):
        with open(tmp_path / method / "cases.csv") as f:
            assert {row["case"] for row in csv.DictReader(f)} == inner
    assert not (tmp_path / "test").exists()
    assert "inner validation fold" in (tmp_path / "accuracy.md").read_text()
    # a folder scored on the inner fold is not reused for a test-phantom table
    with pytest.raises(ValueError, match="scored_on: recorded 'inner', now 'test'"):
        run_accuracy_bench(out=str(tmp_path), quick=True, methods="threshold")


def test_a_method_of_other_settings_is_refused_not_reused_before_any_work(tmp_path):
    """A rerun into the same --out reused a method's cases.csv whatever its budget or overrides, and titled the
    table with this run's budget: 15 s of training reported as 600 s with --learning_rate 0.1."""
    import json

    from custom.accuracy_bench import QUICK_BUNDLE_OVERRIDES, run_accuracy_bench

    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "cases.csv").write_text("method,case,dice\nbundle,case_1,0.5\n")
    facts = {"budget_s": 15, "scored_on": "test", "overrides": QUICK_BUNDLE_OVERRIDES, "train_seconds": 32.2}
    (folder / "facts.json").write_text(json.dumps(facts))
    with pytest.raises(ValueError, match=r"other settings \(budget_s: recorded 15, now 600; "
                       r"override --learning_rate: recorded '<unset>', now 0.1; see .*facts.json"):
        run_accuracy_bench(out=str(tmp_path), quick=True, methods="bundle", budget_s=600, learning_rate=0.1)
    with pytest.raises(ValueError, match=r"other settings \(override --learning_rate: recorded '<unset>', now 0.1;"):
        run_accuracy_bench(out=str(tmp_path), quick=True, methods="bundle", learning_rate=0.1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bundle"]  # no phantom was written


def test_a_method_folder_without_its_facts_is_refused_naming_it_before_any_work(tmp_path):
    """The threshold method's run_baseline writes a cases.csv into the method folder before facts.json is written:
    a run stopped or failed between the two left a folder every rerun died on, reading the missing facts.json
    (Python's FileNotFoundError and its traceback)."""
    from custom.accuracy_bench import run_accuracy_bench

    (tmp_path / "threshold").mkdir()
    (tmp_path / "threshold" / "cases.csv").write_text("case,fold,dice\ncase_1,0,0.5\n")
    with pytest.raises(ValueError, match=f"'{tmp_path / 'threshold'}' holds a cases.csv but no facts.json"):
        run_accuracy_bench(out=str(tmp_path), quick=True, methods="threshold")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["threshold"]  # no phantom was written


def test_a_phantom_of_other_settings_is_refused_not_reused(tmp_path):
    from custom.accuracy_bench import phantom_dataset

    dataset = phantom_dataset(tmp_path, cases=2, seed=1, size=32, folds=2)
    assert phantom_dataset(tmp_path, cases=2, seed=1, size=32, folds=2) == dataset
    with pytest.raises(ValueError, match=r"other settings \(seed: recorded 1, now 2.*phantom.json"):
        phantom_dataset(tmp_path, cases=2, seed=2, size=32, folds=2)


def test_bundle_overrides_that_change_the_network_input_reach_inference(tmp_path, monkeypatch):
    """A model trained with other input settings (``contralateral_channels``, ``adjacent_slices``, ``spacing_mm``)
    or another ``network_def`` is only usable by an inference run with the same keys; training-only keys stay out of it;
    ``lesion_threshold`` and ``min_lesion_ml`` (post-processing) reach it and only it; training gets the budget
    as ``time_budget_s`` and nothing that would size the run instead."""
    import custom.accuracy_bench as bench

    commands = {}

    def fake_run(command, log_file, env=None):
        name = "inference" if str(bench.BUNDLE_ROOT / "configs" / "inference.json") in " ".join(command) else "train"
        commands[name] = command
        if name == "train":
            (tmp_path / "models").mkdir(exist_ok=True)
            (tmp_path / "models" / "model.pt").write_bytes(b"")
            log_file.write_text("- ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. "
                                "Time taken: 00:00:01.000\n")

    monkeypatch.setattr(bench, "_run", fake_run)
    overrides = {"contralateral_channels": "difference", "adjacent_slices": 1, "spacing_mm": 0.9,
                 "network_def#norm": "batch", "learning_rate": 0.01, "min_lesion_ml": 0, "lesion_threshold": 0.7}
    bench.run_bundle(tmp_path / "dataset", ["a.nii.gz"], tmp_path, 30, overrides)

    def value(command, key):
        return command[command.index(f"--{key}") + 1] if f"--{key}" in command else None

    expected_in_both = {"contralateral_channels": "'difference'", "adjacent_slices": "1", "spacing_mm": "0.9",
                        "network_def#norm": "'batch'"}
    for key, expected in expected_in_both.items():
        assert value(commands["train"], key) == expected and value(commands["inference"], key) == expected
    assert value(commands["train"], "learning_rate") == "0.01" and value(commands["inference"], "learning_rate") is None
    assert value(commands["inference"], "min_lesion_ml") == "0"  # the post-processing, e.g. off to measure it
    assert value(commands["train"], "min_lesion_ml") is None
    assert value(commands["inference"], "lesion_threshold") == "0.7"
    assert value(commands["train"], "lesion_threshold") is None
    # the budget alone sizes the run: train.json's epochs, validation cadence and warm-up are left as shipped
    assert value(commands["train"], "time_budget_s") == "30"
    assert all(value(commands["train"], key) is None for key in ("epochs", "val_interval", "warmup_epochs"))


def test_a_rerun_of_the_bundle_starts_without_the_files_of_an_interrupted_run(tmp_path, monkeypatch):
    """A method without cases.csv is rerun whole: the checkpoints, TensorBoard files and masks of an interrupted
    attempt would make train.json or inference.json refuse the new run (or pass for its model.pt)."""
    import custom.accuracy_bench as bench

    leftovers = [tmp_path / "models" / "model.pt", tmp_path / "train_logs" / "events.out.tfevents.1.host.1.0",
                 tmp_path / "masks" / "a_seg.nii.gz"]  # fmt: skip
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    at_training = {}

    def fake_run(command, log_file, env=None):
        if str(bench.BUNDLE_ROOT / "configs" / "train.json") in " ".join(command):
            at_training.update({path.name: path.exists() for path in leftovers})
            (tmp_path / "models").mkdir(exist_ok=True)
            (tmp_path / "models" / "model.pt").write_bytes(b"new")
            log_file.write_text("- ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. "
                                "Time taken: 00:00:01.000\n")

    monkeypatch.setattr(bench, "_run", fake_run)
    bench.run_bundle(tmp_path / "dataset", ["a.nii.gz"], tmp_path, 30, {})
    assert at_training == {"model.pt": False, "events.out.tfevents.1.host.1.0": False, "a_seg.nii.gz": False}


def test_score_masks_scores_every_labelled_case_and_refuses_gaps_and_overwrites(tiny_phantom_dataset, tmp_path):
    """Labels scored as masks give Dice 1 on every lesion case; an emptied mask gives 0 on that case; a case
    without a mask is named, and an existing cases.csv is kept."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    masks = tmp_path / "masks"
    masks.mkdir()
    for entry in entries:
        case = Path(entry["image"]).name.split(".nii")[0]
        shutil.copy(tiny_phantom_dataset / entry["label"], masks / f"{case}_seg.nii.gz")
    emptied = Path(entries[0]["image"]).name.split(".nii")[0]
    label = nib.load(tiny_phantom_dataset / entries[0]["label"])
    assert np.asanyarray(label.dataobj).any(), "the first tiny phantom case should have a lesion"
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), masks / f"{emptied}_seg.nii.gz")

    table = score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    with open(table, newline="") as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(e["case"] for e in entries)
    assert float(rows[entries[0]["case"]]["dice"]) == 0.0
    assert all(float(rows[e["case"]]["dice"]) == 1.0 for e in entries[1:])
    earlier_table = r"--out '.*scored' holds 1 file\(s\) of an earlier run .*cases.csv.*--overwrite"
    with pytest.raises(FileExistsError, match=earlier_table):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    # rescoring after a mask was corrected (no option to do so up to 0.3.12: the table had to be removed by hand)
    shutil.copy(tiny_phantom_dataset / entries[0]["label"], masks / f"{emptied}_seg.nii.gz")
    with open(score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"), overwrite=True),
              newline="") as f:  # fmt: skip
        assert all(float(row["dice"]) == 1.0 for row in csv.DictReader(f))

    (masks / f"{emptied}_seg.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=f"1 of {len(entries)} cases .* no mask .*{emptied}_seg.nii.gz"):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored_again"))
    assert not (tmp_path / "scored_again").exists()


def test_score_masks_of_one_fold_scores_its_cases_only(tiny_phantom_dataset, tmp_path):
    """``fold`` scores the cases of that fold (a validation split), so masks of the other cases are not needed;
    an unknown fold is named with the folds present."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    fold_cases = [e for e in entries if e["fold"] == 1]
    assert 0 < len(fold_cases) < len(entries), "the tiny phantom should have several folds"
    masks = tmp_path / "masks"
    masks.mkdir()
    for entry in fold_cases:
        case = Path(entry["image"]).name.split(".nii")[0]
        shutil.copy(tiny_phantom_dataset / entry["label"], masks / f"{case}_seg.nii.gz")
    table = score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"), fold=1)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["case"] for row in rows) == sorted(e["case"] for e in fold_cases)
    assert all(float(row["dice"]) == 1.0 for row in rows)
    with pytest.raises(ValueError, match="fold 7 not found in .*dataset.json' \\(folds present: \\[0, 1"):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored_7"), fold=7)
    with pytest.raises(ValueError, match="--fold must be a whole number, got True"):  # True == 1 scored fold 1
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored_true"), fold=True)
    assert not (tmp_path / "scored_true").exists()


def test_scored_cases_are_counted_in_the_right_number(tiny_phantom_dataset, tmp_path, capsys):
    """score-masks printed "1 cases scored" for a fold of one case."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    one = tmp_path / "one"
    one.mkdir()
    case = {**entries[0], **{key: str(tiny_phantom_dataset / entries[0][key]) for key in ("image", "label")}}
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    (one / "dataset.json").write_text(json.dumps({**dataset, "training": [case]}))
    _label_masks(tiny_phantom_dataset, entries[:1], tmp_path / "masks")
    score_masks_command(str(tmp_path / "masks"), str(one), str(tmp_path / "scored"))
    assert capsys.readouterr().out.rstrip().endswith("\n1 case scored")


def _label_masks(dataset: Path, entries: list[dict], masks: Path) -> None:
    masks.mkdir()
    for entry in entries:
        case = Path(entry["image"]).name.split(".nii")[0]
        shutil.copy(dataset / entry["label"], masks / f"{case}_seg.nii.gz")


def test_score_masks_refuses_a_mask_on_another_grid_naming_it_and_its_label(tiny_phantom_dataset, tmp_path):
    """A correct mask stored flipped on axis 0 with its affine adjusted (same world positions) would score Dice 0
    voxel by voxel: it is refused, naming the mask and its label, and nothing is written."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    masks = tmp_path / "masks"
    _label_masks(tiny_phantom_dataset, entries, masks)
    flipped = masks / f"{Path(entries[0]['image']).name.split('.nii')[0]}_seg.nii.gz"
    label = nib.load(tiny_phantom_dataset / entries[0]["label"])
    flip = nib.orientations.inv_ornt_aff([[0, -1], [1, 1], [2, 1]], label.shape)
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj)[::-1].copy(), label.affine @ flip), flipped)
    named = rf"mask '{flipped}': affine differs from its label's \('.*{entries[0]['label']}'; another orientation"
    with pytest.raises(ValueError, match=named):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    assert not (tmp_path / "scored").exists()


def test_score_masks_names_a_non_binary_mask(tiny_phantom_dataset, tmp_path):
    """A probability map (0.7 x mask) is not a mask: the error names its file."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    masks = tmp_path / "masks"
    _label_masks(tiny_phantom_dataset, entries, masks)
    soft = masks / f"{Path(entries[0]['image']).name.split('.nii')[0]}_seg.nii.gz"
    label = nib.load(tiny_phantom_dataset / entries[0]["label"])
    nib.save(nib.Nifti1Image(0.7 * np.asanyarray(label.dataobj).astype(np.float32), label.affine), soft)
    with pytest.raises(ValueError, match=f"mask '{soft}' scored against label .*pred must be binary"):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"))


def test_score_masks_refuses_a_case_with_both_mask_names(tiny_phantom_dataset, tmp_path):
    """A mask corrected by hand as <case>.nii.gz beside the original <case>_seg.nii.gz: the original was scored
    without a word. Both names are refused, and nothing is written."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    masks = tmp_path / "masks"
    _label_masks(tiny_phantom_dataset, entries, masks)
    case = Path(entries[0]["image"]).name.split(".nii")[0]
    label = nib.load(tiny_phantom_dataset / entries[0]["label"])
    nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), masks / f"{case}.nii.gz")
    with pytest.raises(ValueError, match=f"two masks of 1 case.*{case}_seg.nii.gz and {case}.nii.gz"):
        score_masks_command(str(masks), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    assert not (tmp_path / "scored").exists()


def test_score_masks_refuses_the_datasets_own_labels_as_masks(tiny_phantom_dataset, tmp_path):
    """``score-masks DS/labelsTr DS OUT`` (the labels' folder typed for the masks') scored each label against itself:
    mean Dice 1.000 without a word. It is refused, naming a label file, and nothing is written."""
    entries = load_dataset_json(tiny_phantom_dataset, ("training",))["training"]
    labels = tiny_phantom_dataset / "labelsTr"
    assert all(Path(e["label"]).parent == Path("labelsTr") for e in entries)
    with pytest.raises(ValueError, match=f"{len(entries)} of the {len(entries)} masks in '{labels}' are the label "
                                         f"files they would be scored against \\(e.g. '{labels}/case_"):
        score_masks_command(str(labels), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    assert not (tmp_path / "scored").exists()


def test_score_masks_measures_a_sheared_grid_in_mm(tmp_path):
    """A gantry-tilted grid (slices 4 mm apart, each shifted 2 mm along y): the mask is the label moved 4 mm straight
    up. Scored with the affine, not the voxel sizes (1, 1, 4.47 mm taken as perpendicular axes gave HD95 4.60 mm,
    ASSD 2.41 mm and 0.894 mL): HD95 4 mm, ASSD 2.15 mm, 200 voxels of 4 mm^3 (test_metrics.py derives them)."""
    affine = np.array([[1.0, 0, 0, 0], [0, 1.0, 2.0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1.0]])
    for folder, (y, z) in (("labelsTr", (10, 2)), ("masks", (8, 3))):
        mask = np.zeros((32, 32, 8), np.uint8)
        mask[10:20, y : y + 10, z : z + 2] = 1
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(mask, affine), tmp_path / folder / "box.nii.gz")
    entry = {"case": "box", "patient": "p", "fold": 0, "image": "imagesTr/box.nii.gz", "label": "labelsTr/box.nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [entry]}))
    with open(score_masks_command(str(tmp_path / "masks"), str(tmp_path), str(tmp_path / "scored")), newline="") as f:
        (row,) = list(csv.DictReader(f))
    values = {name: float(row[name]) for name in ("hd95_mm", "assd_mm", "pred_ml", "label_ml")}
    assert values == pytest.approx({"hd95_mm": 4.0, "assd_mm": 2.15, "pred_ml": 0.8, "label_ml": 0.8})


def test_each_command_is_printed_as_a_shell_runs_it(tmp_path, monkeypatch, capsys):
    """The printed line of a method's command, pasted into a shell, is that command (as cv's fold commands)."""
    import shlex
    import subprocess

    import custom.accuracy_bench

    ran = []
    monkeypatch.setattr(custom.accuracy_bench.subprocess, "run", lambda command, **_: ran.append(command)
                        or subprocess.CompletedProcess(command, 0))  # fmt: skip
    command = custom.accuracy_bench._bundle_command("train.json", {"patch_size": [64, 64], "ckpt_dir": "runs/a b"})
    custom.accuracy_bench._run(command, tmp_path / "log")
    assert shlex.split(capsys.readouterr().out) == ran[0] == command
