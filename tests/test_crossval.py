"""Cross-validation orchestration, the loss ablation table, the threshold baseline on the phantom, figures."""

import csv
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY_TRAINING

import custom.crossval
from custom.ablation import LOSS_VARIANTS, ablation_markdown
from custom.baseline import run_baseline
from custom.config_check import check_evaluation_dir
from custom.crossval import (
    CASE_METRICS,
    DONE_FILE,
    EVALUATION_METRICS,
    RUN_RECORD,
    read_raw_metric,
    run_cross_validation,
)
from custom.data.datalist import scored_dataset_sha256
from custom.deploy import is_refusal
from custom.lifecycle import latest_checkpoint
from custom.wording import counted


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"latest_checkpoint_epoch={epoch}.pt").touch()
    (tmp_path / "model.pt").touch()
    assert latest_checkpoint(tmp_path).name == "latest_checkpoint_epoch=10.pt"


def test_cross_validation_rejects_folds_not_in_dataset(tiny_phantom_dataset, tmp_path):
    with pytest.raises(ValueError, match="does not match the folds"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=3)


def test_dataset_without_training_list_is_named(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"num_folds": 2, "testing": []}))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'dataset.json'}' has no 'training' key")):
        run_cross_validation(str(tmp_path), str(tmp_path / "cv"), folds=2)


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
    with pytest.raises(ValueError, match="--epochs: recorded 1, now 2"):
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, **{**overrides, "epochs": 2})
    assert (out / "fold_0" / "models" / "model.pt").stat().st_mtime == model_time

    # a fold killed after its first validation wrote model.pt and before its first periodic checkpoint: nothing to
    # resume from, so it trains again from the start, replacing that model.pt
    fold_1 = out / "fold_1"
    (fold_1 / "fold_done.json").unlink()
    for checkpoint in (fold_1 / "models").glob("latest_checkpoint_epoch=*.pt"):
        checkpoint.unlink()
    (fold_1 / "models" / "model.pt").write_bytes(b"model of the killed run")
    run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, **overrides)
    assert (fold_1 / "fold_done.json").is_file()
    assert (fold_1 / "models" / "model.pt").read_bytes() != b"model of the killed run"


class BundleRunStopped(BaseException):
    """Raised by the stand-in for ``monai.bundle run`` so that a cross-validation stops at its first run: a
    ``BaseException``, as an interruption (Ctrl-C) is, which cv does not take for a failed fold to go on from."""


@pytest.fixture
def bundle_runs(monkeypatch):
    """Record the arguments of every bundle run of ``run_cross_validation`` and stop at the first one."""
    runs = []

    def stop(config_files, arguments, overrides, log_file):
        runs.append({**arguments, **overrides})
        raise BundleRunStopped

    monkeypatch.setattr(custom.crossval, "_run_bundle", stop)
    return runs


def fake_bundle(monkeypatch, name_image=str, evaluated=slice(None)) -> list[dict]:
    """Stand in for ``monai.bundle run`` and record its arguments: training does nothing; evaluation writes the
    ``*_raw.csv`` files of evaluate.json's MetricsSaver with MONAI's own writer, each metric of the fold's K-th
    validation case being (K + 1) / 100, its file named ``name_image(absolute image path)``, for the
    ``evaluated`` slice of the fold's cases, after evaluate.json's refusal of an earlier evaluation's outputs."""
    from monai.handlers.utils import write_metrics_reports

    runs = []

    def run(config_files, arguments, overrides, log_file):
        runs.append({**arguments, **overrides})
        if "ckpt_path" in arguments:
            dataset_dir = Path(arguments["dataset_dir"])
            training = json.loads((dataset_dir / "dataset.json").read_text())["training"]
            images = [name_image(str(dataset_dir / e["image"])) for e in training if e["fold"] == arguments["fold"]]
            images = images[evaluated]
            check_evaluation_dir(arguments["output_dir"], images, EVALUATION_METRICS, arguments["save_masks"],
                                 arguments.get("overwrite", False))
            values = np.arange(1, len(images) + 1).reshape(-1, 1) / 100
            details = dict.fromkeys(EVALUATION_METRICS, values)
            write_metrics_reports(arguments["output_dir"], images, None, details, None)

    monkeypatch.setattr(custom.crossval, "_run_bundle", run)
    return runs


def test_fold_whose_metrics_cannot_be_read_is_not_marked_done(tiny_phantom_dataset, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    fake_bundle(monkeypatch, name_image=lambda image: image.replace(".nii.gz", "_moved.nii.gz"))
    with pytest.raises(RuntimeError, match="fold 0: .*_moved.nii.gz', which is not in dataset.json"):
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2)
    assert not (out / "fold_0" / DONE_FILE).exists()

    runs = fake_bundle(monkeypatch)
    run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2)
    assert [run["fold"] for run in runs if "ckpt_path" in run] == [0, 1]  # fold 0 evaluated again, not skipped
    assert (out / "fold_0" / DONE_FILE).is_file() and (out / "fold_1" / DONE_FILE).is_file()
    with open(out / "cases.csv") as f:
        cases = list(csv.DictReader(f))
    training = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"]
    assert sorted(row["case"] for row in cases) == sorted(e["case"] for e in training)


def fail_training_of_fold_0(monkeypatch, of_overrides) -> None:
    """Make the training run of fold 0 fail, as ``monai.bundle run`` fails, for the runs whose overrides
    ``of_overrides`` accepts; every other run goes to the stand-in in place (``fake_bundle``)."""
    run = custom.crossval._run_bundle

    def fold_0_training_fails(config_files, arguments, overrides, log_file):
        if of_overrides(overrides) and arguments["fold"] == 0 and "ckpt_path" not in arguments:
            raise RuntimeError(f"bundle run failed with exit code 1; see the log '{log_file}'")
        run(config_files, arguments, overrides, log_file)

    monkeypatch.setattr(custom.crossval, "_run_bundle", fold_0_training_fails)


def test_a_failed_fold_stops_no_other_fold_and_a_rerun_runs_only_it(
    tiny_phantom_dataset, tmp_path, monkeypatch, capsys
):
    """Fold 0's training failing stopped the cross-validation there: fold 1 was never trained (a night of 4 folds
    lost to one). Every fold runs; the failures are named together at the end, with no summary as if complete."""
    out = tmp_path / "cv"
    out.mkdir()
    (out / "summary.md").write_text("an earlier run's summary")
    runs = fake_bundle(monkeypatch)
    fail_training_of_fold_0(monkeypatch, lambda overrides: True)
    with pytest.raises(RuntimeError) as failed:
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2)
    assert str(failed.value) == (
        f"1 of 2 folds failed, so '{out}' holds no summary (finished and kept: fold 1):\n"
        f"  - fold 0: bundle run failed with exit code 1; see the log '{out / 'fold_0' / 'train.log'}'\n"
        "Fix the cause and run the same command again: finished folds are skipped and interrupted ones resume from "
        "their latest checkpoint."
    )
    assert "fold 0 failed: bundle run failed" in capsys.readouterr().out
    assert [(run["fold"], "ckpt_path" in run) for run in runs] == [(1, False), (1, True)]
    assert (out / "fold_1" / DONE_FILE).is_file() and not (out / "fold_0" / DONE_FILE).exists()
    assert not any((out / name).exists() for name in ("cases.csv", "summary.csv", "summary.md"))

    runs = fake_bundle(monkeypatch)  # the cause fixed: the rerun runs fold 0 only
    summary = run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2)
    assert [(run["fold"], "ckpt_path" in run) for run in runs] == [(0, False), (0, True)]
    assert [str(row["fold"]) for row in summary] == ["0", "1", "all"] and (out / "summary.md").is_file()


def test_a_failed_loss_variant_stops_no_other_and_a_rerun_runs_only_its_failed_fold(
    tiny_phantom_dataset, tmp_path, monkeypatch, capsys
):
    """cv raises once all its folds have run; the ablation stopped at the first variant whose cv raised, so the
    variants after it never ran (a night's ablation lost to one fold), and an earlier ablation table stayed. Every
    variant runs; the failures are named together at the end, with no table as if complete."""
    from custom.ablation import run_ablation

    tables = ("ablation.csv", "ablation.md")
    out = tmp_path / "ablation"
    out.mkdir()
    (out / "ablation.md").write_text("an earlier run's table")
    runs = fake_bundle(monkeypatch)
    fail_training_of_fold_0(monkeypatch, lambda overrides: overrides.get("loss#ce_weight_mode") == "fixed")
    with pytest.raises(RuntimeError) as failed:
        run_ablation(str(tiny_phantom_dataset), str(out), variants="gdl", reference="ce", folds=2)
    message = str(failed.value)
    assert message.startswith(f"1 of 2 loss variants failed, so '{out}' holds no ablation table (finished and kept: "
                              f"gdl):\n  - ce: 1 of 2 folds failed, so '{out / 'ce'}' holds no summary")
    assert f"\n      - fold 0: bundle run failed with exit code 1; see the log '{out / 'ce' / 'fold_0'}" in message
    assert "loss variant ce failed; going on with the other variants" in capsys.readouterr().out
    variant_of = {"fixed": "ce", None: "gdl"}
    ran = [(variant_of[r.get("loss#ce_weight_mode")], r["fold"], "ckpt_path" in r) for r in runs]
    assert ran == [("ce", 1, False), ("ce", 1, True)] + [("gdl", f, e) for f in (0, 1) for e in (False, True)]
    assert not any((out / name).exists() for name in tables) and (out / "gdl" / "summary.md").is_file()

    runs = fake_bundle(monkeypatch)  # the cause fixed: the rerun trains and evaluates ce's fold 0 only
    rows = run_ablation(str(tiny_phantom_dataset), str(out), variants="gdl", reference="ce", folds=2)
    assert [(r["fold"], "ckpt_path" in r) for r in runs] == [(0, False), (0, True)]
    assert [row["variant"] for row in rows] == ["ce", "gdl"] and all((out / n).is_file() for n in tables)


def test_an_ablation_of_an_unusable_dataset_is_refused_once_before_any_variant(
    tiny_phantom_dataset, tmp_path, bundle_runs
):
    """Every variant's cv would refuse the dataset, each in the end's list of failures: the first variant's refusal
    is raised at once, before any work."""
    from custom.ablation import run_ablation

    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    for entry in json.loads((dataset / "dataset.json").read_text())["training"]:
        if entry["fold"] == 1:
            label = nib.load(dataset / entry["label"])
            nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), dataset / entry["label"])
    with pytest.raises(ValueError) as refused:
        run_ablation(str(dataset), str(tmp_path / "ablation"), variants="gdl,wce_gdl", folds=2)
    assert str(refused.value).startswith(f"'{dataset / 'dataset.json'}' cannot be cross-validated:\n  - no label")
    assert is_refusal(refused.value) and str(refused.value).count("of fold 1 holds a lesion voxel") == 1
    assert bundle_runs == [] and not (tmp_path / "ablation").exists()


def test_evaluation_that_left_out_a_case_is_refused_naming_it(tiny_phantom_dataset, tmp_path, monkeypatch):
    """A fold table over fewer cases than the fold holds would look complete (and lift or lower the mean)."""
    fake_bundle(monkeypatch, evaluated=slice(1, None))
    training = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"]
    first = next(e["case"] for e in training if e["fold"] == 0)
    with pytest.raises(RuntimeError, match=f"do not match fold 0 of dataset.json: metrics missing for {first}\n"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=2)
    assert not (tmp_path / "cv" / "fold_0" / DONE_FILE).exists()


def test_dataset_path_with_commas_is_read_back_from_the_metrics_files(tiny_phantom_dataset, tmp_path, monkeypatch):
    # MONAI's MetricsSaver writes file names unquoted: csv split this path at its comma into two columns
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "my data, v2" / "ds, 1")
    fake_bundle(monkeypatch)
    run_cross_validation(str(dataset), str(tmp_path / "cv"), folds=2)
    with open(tmp_path / "cv" / "cases.csv") as f:
        dice = {row["case"]: float(row["dice"]) for row in csv.DictReader(f)}
    training = json.loads((dataset / "dataset.json").read_text())["training"]
    for fold in (0, 1):
        cases = [e["case"] for e in training if e["fold"] == fold]
        assert [dice[case] for case in cases] == [(k + 1) / 100 for k in range(len(cases))]


def test_malformed_metrics_line_is_refused_naming_file_and_line(tmp_path):
    raw = tmp_path / "val_mean_dice_raw.csv"
    raw.write_text("filename,class0,mean\n/data/a, b.nii.gz,0.5000,0.5000\n/data/c.nii.gz,0.5000\n")
    with pytest.raises(ValueError, match=re.escape(f"'{raw}' line 3: expected 'filename,class0,mean' values")):
        read_raw_metric(raw)
    raw.write_text("filename,class0,mean\n/data/a, b.nii.gz,0.5000,nan\n")
    assert [(name, str(mean)) for name, mean in read_raw_metric(raw)] == [("/data/a, b.nii.gz", "nan")]


def test_rerun_with_other_settings_into_the_same_folder_is_refused(tiny_phantom_dataset, tmp_path, bundle_runs):
    out = tmp_path / "cv"
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, epochs=3, val_interval=1)
    recorded = json.loads((out / RUN_RECORD).read_text())
    assert recorded["overrides"] == {"epochs": 3, "val_interval": 1}
    checkpoint = out / "fold_0" / "models" / "latest_checkpoint_epoch=2.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.touch()

    with pytest.raises(ValueError) as refused:
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, epochs=5, val_interval=1)
    message = str(refused.value)
    assert str(out) in message and "--epochs: recorded 3, now 5" in message and "new --out folder" in message
    with pytest.raises(ValueError, match="config files differ"):
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, config_files=[
            str(custom.crossval.BUNDLE_ROOT / "configs" / "demo.json")], epochs=3, val_interval=1)
    assert len(bundle_runs) == 1 and json.loads((out / RUN_RECORD).read_text()) == recorded

    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(tiny_phantom_dataset), str(out), folds=2, epochs=3, val_interval=1)
    assert bundle_runs[-1]["resume_ckpt"] == str(checkpoint)


def test_training_entries_without_case_or_patient_are_refused_before_any_fold(
    tiny_phantom_dataset, tmp_path, bundle_runs
):
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    contents = json.loads((dataset / "dataset.json").read_text())
    for key in ("case", "patient"):
        del contents["training"][1][key]
    (dataset / "dataset.json").write_text(json.dumps(contents))
    with pytest.raises(ValueError) as refused:
        run_cross_validation(str(dataset), str(tmp_path / "cv"), folds=2)
    message = str(refused.value)
    assert f"'{dataset / 'dataset.json'}' cannot be cross-validated" in message
    assert "dataset.json training[1]: missing patient, case" in message
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


def test_image_path_with_a_line_break_is_refused_before_any_fold(tiny_phantom_dataset, tmp_path, bundle_runs):
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "my\ndata")
    with pytest.raises(ValueError, match=re.escape(f"the dataset folder {str(dataset)!r} holds a line break")):
        run_cross_validation(str(dataset), str(tmp_path / "cv"), folds=2)
    contents = json.loads((dataset / "dataset.json").read_text())
    image = contents["training"][3]["image"]
    (dataset / image).rename(dataset / image.replace("case", "case\n"))
    contents["training"][3]["image"] = image.replace("case", "case\n")
    dataset = dataset.rename(tmp_path / "ds")
    (dataset / "dataset.json").write_text(json.dumps(contents))
    with pytest.raises(ValueError, match=re.escape(f"training[3].image: {contents['training'][3]['image']!r} holds")):
        run_cross_validation(str(dataset), str(tmp_path / "cv"), folds=2)
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


def test_a_fold_without_any_lesion_is_refused_before_any_fold(tiny_phantom_dataset, tmp_path, bundle_runs):
    """A third fold of lesion-free labels: its training run refuses to pick a best model on empty labels
    (fold_datalist), after folds 0 and 1 had trained; cv names it before the first fold. A run of the folds before it
    is not refused: they train on its cases, beside others that hold lesions."""
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    contents = json.loads((dataset / "dataset.json").read_text())
    patient = next(e["patient"] for e in contents["training"] if e["fold"] == 1)
    fold_2 = [e for e in contents["training"] if e["patient"] == patient]
    for entry in fold_2:
        entry["fold"] = 2
        label = nib.load(dataset / entry["label"])
        nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), dataset / entry["label"])
    (dataset / "dataset.json").write_text(json.dumps({**contents, "num_folds": 3}))
    with pytest.raises(ValueError) as refused:
        run_cross_validation(str(dataset), str(tmp_path / "cv"))
    message = str(refused.value)
    assert f"'{dataset / 'dataset.json'}' cannot be cross-validated:\n  - no label of the " \
        f"{counted(len(fold_2), 'validation case')} of fold 2 holds a lesion voxel: the best model would be picked " \
        "on empty labels" in message
    assert message.count("holds a lesion voxel") == 1 and "--folds K --seed S" in message
    assert bundle_runs == [] and not (tmp_path / "cv").exists()
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(dataset), str(tmp_path / "cv"), folds=2)


def test_rerun_after_an_image_or_label_changed_is_refused(tiny_phantom_dataset, tmp_path, bundle_runs):
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    out = tmp_path / "cv"
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(dataset), str(out), folds=2)
    recorded = json.loads((out / RUN_RECORD).read_text())
    # a mask fixed and the dataset prepared again: the file is rewritten, dataset.json stays byte-identical
    training = json.loads((dataset / "dataset.json").read_text())["training"]
    label = dataset / training[2]["label"]
    modified = label.stat().st_mtime_ns + 10**9
    mask = nib.load(label)
    fixed = np.asarray(mask.dataobj).copy()
    fixed[0, 0, 0] = 1 - fixed[0, 0, 0]
    nib.save(nib.Nifti1Image(fixed, mask.affine, mask.header), label)
    os.utime(label, ns=(modified, modified))
    with pytest.raises(ValueError) as refused:
        run_cross_validation(str(dataset), str(out), folds=2)
    message = str(refused.value)
    assert f"dataset file '{label}': recorded {recorded['dataset_files'][training[2]['label']][0]} bytes" in message
    assert "new --out folder" in message and "dataset_json_sha256" not in message
    assert len(bundle_runs) == 1 and json.loads((out / RUN_RECORD).read_text()) == recorded

    # a record of an earlier version of cv, without the files: their changes cannot be ruled out
    del recorded["dataset_files"]
    (out / RUN_RECORD).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="the record has no sizes and modification times of the images and labels"):
        run_cross_validation(str(dataset), str(out), folds=2)
    assert len(bundle_runs) == 1


def _edit_dataset_json(dataset: Path, change) -> None:
    contents = json.loads((dataset / "dataset.json").read_text())
    change(contents)
    (dataset / "dataset.json").write_text(json.dumps(contents, indent=2))


def _fewer_testing_cases(contents: dict) -> None:
    contents.update(testing=contents["testing"][:1], numTest=1, description="testing list cut to one case")


def test_rerun_after_only_the_testing_list_changed_reuses_the_finished_folds(
    tiny_phantom_dataset, tmp_path, monkeypatch, capsys
):
    """dataset.json's testing list or description decides nothing of a fold, yet a rerun was refused for it, naming
    two SHA-256 only (`dataset_json_sha256: recorded '32eb...', now 'b22d...'`). It is accepted with a note; a change
    that decides the folds' results is refused, naming it."""
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    out = tmp_path / "cv"
    fake_bundle(monkeypatch)
    summary = run_cross_validation(str(dataset), str(out), folds=2)
    _edit_dataset_json(dataset, _fewer_testing_cases)
    capsys.readouterr()
    runs = fake_bundle(monkeypatch)
    assert run_cross_validation(str(dataset), str(out), folds=2) == summary and runs == []  # both folds skipped
    assert "outside its modality, labels, num_folds, training (its testing list or description, say)" \
        in capsys.readouterr().out
    digest = hashlib.sha256((dataset / "dataset.json").read_bytes()).hexdigest()
    recorded = json.loads((out / RUN_RECORD).read_text())
    assert recorded["dataset_json_sha256"] == digest  # montage checks the dataset.json of now against it

    contents = json.loads((dataset / "dataset.json").read_text())
    case, patient = next((e["case"], e["patient"]) for e in contents["training"]
                         if [f["patient"] for f in contents["training"]].count(e["patient"]) == 1)

    def rename_patient(contents):
        next(e for e in contents["training"] if e["case"] == case)["patient"] = "another patient"

    _edit_dataset_json(dataset, rename_patient)
    with pytest.raises(ValueError) as refused:
        run_cross_validation(str(dataset), str(out), folds=2)
    message = str(refused.value)
    assert f"dataset.json training case {case!r} 'patient': recorded {patient!r}, now 'another patient'" in message
    assert "SHA-256" not in message and "dataset_json_sha256" not in message and runs == []

    # a record of cv 0.3.14 or earlier holds no scored part of dataset.json: a change cannot be told apart
    del recorded["scored_dataset"], recorded["scored_dataset_sha256"]
    (out / RUN_RECORD).write_text(json.dumps(recorded))
    _edit_dataset_json(dataset, lambda contents: contents.update(description="described again"))
    with pytest.raises(ValueError, match="does not say whether its modality, labels, num_folds, training changed"):
        run_cross_validation(str(dataset), str(out), folds=2)


def test_an_interrupted_fold_recorded_before_the_testing_list_changed_resumes(
    tiny_phantom_dataset, tmp_path, bundle_runs
):
    """The fold of a run accepted after a testing-list change trained again from the start, losing its progress:
    train.json refused to resume a checkpoint recorded with another dataset.json. It compares the part that decides
    training now (``test_a_run_resumed_in_the_folder_of_another_fold_dataset_or_input_settings_is_refused``), so
    cv resumes the fold."""
    from custom.training_record import TRAINING_RECORD

    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    out = tmp_path / "cv"
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(dataset), str(out), folds=2)
    models = out / "fold_0" / "models"
    models.mkdir(parents=True)
    (models / "latest_checkpoint_epoch=2.pt").touch()
    digest = hashlib.sha256((dataset / "dataset.json").read_bytes()).hexdigest()
    (models / TRAINING_RECORD).write_text(json.dumps({"fold": 0, "dataset_json_sha256": digest}))
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(dataset), str(out), folds=2)
    assert bundle_runs[-1]["resume_ckpt"] == str(models / "latest_checkpoint_epoch=2.pt")
    _edit_dataset_json(dataset, _fewer_testing_cases)
    with pytest.raises(BundleRunStopped):
        run_cross_validation(str(dataset), str(out), folds=2)
    assert bundle_runs[-1]["resume_ckpt"] == str(models / "latest_checkpoint_epoch=2.pt")
    assert "overwrite" not in bundle_runs[-1]


def test_bad_override_is_refused_before_the_run_folder_is_claimed(tiny_phantom_dataset, tmp_path, bundle_runs):
    with pytest.raises(RuntimeError) as raised:
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=2, epochz=5)
    assert "config id 'epochz' is used by nothing" in str(raised.value.__cause__)
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


@pytest.mark.parametrize("folds", [2.5, True, "2"])
def test_folds_that_is_not_a_whole_number_is_refused_before_any_fold(
    tiny_phantom_dataset, tmp_path, bundle_runs, folds
):
    """``--folds 2.5`` ran 2 folds (``int``) and ``--folds True`` 1, each summarised as the whole run."""
    with pytest.raises(ValueError, match=f"^--folds must be a whole number of folds, got {folds!r}$"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=folds, epochs=1)
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


@pytest.mark.parametrize("option", ["config_files", "bundle_root"])
def test_a_config_file_that_does_not_exist_is_refused_naming_the_option(
    tiny_phantom_dataset, tmp_path, bundle_runs, option
):
    """A mistyped ``--config_files`` (or a ``--bundle_root`` without configs) failed in MONAI's ConfigParser with a
    traceback naming neither option; it is a refusal of the project now, one line on the command line."""
    with pytest.raises(FileNotFoundError) as raised:
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=2, epochs=1,
                             **{option: str(tmp_path / "nowhere.json" if option == "config_files" else tmp_path)})
    assert f"--{option}" in str(raised.value) and is_refusal(raised.value)
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


def test_override_of_an_id_set_per_fold_is_refused(tiny_phantom_dataset, tmp_path, bundle_runs):
    with pytest.raises(ValueError, match=r"cv sets \['fold'\] itself for each fold"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=2, fold=1)
    assert bundle_runs == [] and not (tmp_path / "cv").exists()


def test_run_folder_with_folds_but_no_record_is_refused(tiny_phantom_dataset, tmp_path, bundle_runs):
    (tmp_path / "cv" / "fold_0" / "models").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"holds folds \\(fold_0\\) but no '{RUN_RECORD}'"):
        run_cross_validation(str(tiny_phantom_dataset), str(tmp_path / "cv"), folds=2, epochs=3)
    assert bundle_runs == []


def test_output_under_a_file_is_refused_before_any_work(tiny_phantom_dataset, tmp_path, bundle_runs):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=f"output folder '{blocker / 'cv'}' is not writable"):
        run_cross_validation(str(tiny_phantom_dataset), str(blocker / "cv"), folds=2)
    assert bundle_runs == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the test above covers the error")
def test_read_only_output_folder_is_refused_before_any_work(tiny_phantom_dataset, tmp_path, bundle_runs):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(OSError, match=f"output folder '{read_only}' is not writable"):
        run_cross_validation(str(tiny_phantom_dataset), str(read_only), folds=2)
    assert bundle_runs == [] and not any(read_only.iterdir())


def _montage_cv(dataset: Path, cv_dir: Path, dice=(0.9, "nan", 0.5, 0.7), whole_file_only=False) -> list[dict]:
    """A cv folder as ``python -m custom cv`` leaves it for the montage: the labels as its masks, cases.csv with
    ``dice`` for the first cases, and the run record's dataset.json SHA-256s (that of its scored part left out with
    ``whole_file_only``, as in records up to 0.3.14); returns the cases' entries."""
    from custom.reporting import write_case_csv

    entries = json.loads((dataset / "dataset.json").read_text())["training"][: len(dice)]
    for entry in entries:
        masks = cv_dir / f"fold_{entry['fold']}" / "eval" / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        (masks / f"{entry['case']}_seg.nii.gz").write_bytes((dataset / entry["label"]).read_bytes())
    write_case_csv([{"fold": e["fold"], "case": e["case"], "dice": d} for e, d in zip(entries, dice)],
                   str(cv_dir / "cases.csv"))
    digest = hashlib.sha256((dataset / "dataset.json").read_bytes()).hexdigest()
    record = {"dataset_dir": str(dataset), "dataset_json_sha256": digest}
    if not whole_file_only:
        record["scored_dataset_sha256"] = scored_dataset_sha256(json.loads((dataset / "dataset.json").read_text()))
    (cv_dir / RUN_RECORD).write_text(json.dumps(record))
    return entries


def test_montage_refuses_a_dataset_other_than_the_cv_runs(tiny_phantom_dataset, tmp_path):
    """A dataset whose dataset.json differs from the one the cv run recorded (here: the same images with two
    labels swapped, so the shapes fit) is refused naming both; so is a cv folder without its run record."""
    from custom.result_figures import plot_montage

    cv_dir = tmp_path / "cv"
    _montage_cv(tiny_phantom_dataset, cv_dir)
    other = tmp_path / "other"
    shutil.copytree(tiny_phantom_dataset, other)
    dataset = json.loads((other / "dataset.json").read_text())
    first, second = dataset["training"][:2]
    first["label"], second["label"] = second["label"], first["label"]
    (other / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=f"'{other / 'dataset.json'}' is not the dataset.json the cv run '{cv_dir}'"):
        plot_montage(str(cv_dir), str(other), str(tmp_path / "montage.png"))
    (cv_dir / RUN_RECORD).unlink()
    with pytest.raises(ValueError, match=f"cannot read the dataset of the cv run '{cv_dir}' from .*{RUN_RECORD}"):
        plot_montage(str(cv_dir), str(tiny_phantom_dataset), str(tmp_path / "montage.png"))
    assert not (tmp_path / "montage.png").exists()


def test_montage_accepts_a_dataset_json_changed_only_in_its_testing_list(tiny_phantom_dataset, tmp_path):
    """The montage compared the whole dataset.json's SHA-256: a testing list or description changed after the cv run
    (which cv itself accepts) refused the montage, though it pairs training cases only. It compares the part that
    decides the folds (training cases, folds, labels) where the run record holds its hash; a record without it (up
    to 0.3.14) compares the whole file as before."""
    from custom.result_figures import plot_montage

    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "ds")
    _montage_cv(dataset, tmp_path / "old_cv", whole_file_only=True)
    _montage_cv(dataset, tmp_path / "cv")
    _edit_dataset_json(dataset, _fewer_testing_cases)
    with pytest.raises(ValueError, match="its SHA-256 differs from the one recorded"):
        plot_montage(str(tmp_path / "old_cv"), str(dataset), str(tmp_path / "montage.png"))
    plot_montage(str(tmp_path / "cv"), str(dataset), str(tmp_path / "montage.png"))
    assert (tmp_path / "montage.png").stat().st_size > 0


def test_montage_names_the_cases_without_a_dice(tiny_phantom_dataset, tmp_path, capsys):
    from custom.result_figures import plot_montage

    entries = _montage_cv(tiny_phantom_dataset, tmp_path / "cv")
    plot_montage(str(tmp_path / "cv"), str(tiny_phantom_dataset), str(tmp_path / "montage.png"))
    assert f"1 case(s) without a Dice (NaN) left out of the ranking: {entries[1]['case']}" in capsys.readouterr().out
    assert (tmp_path / "montage.png").stat().st_size > 0


def test_curves_draw_each_epoch_of_a_resumed_fold_once_with_the_last_runs_value(tmp_path, monkeypatch):
    """A resumed fold logs the epochs after its checkpoint again, in a second event file: the curve drew both runs'
    values of those epochs (a zigzag back and forth); it keeps the one of the latest wall time, whatever the order
    of the files' names (here the resumed run's file is written first, so its name sorts first)."""
    import matplotlib.axes
    from torch.utils.tensorboard import SummaryWriter

    from custom.result_figures import plot_curves

    log_dir = tmp_path / "cv" / "fold_0" / "train"
    for epochs, value, wall_time in ((range(4, 8), 0.5, 2000.0), (range(1, 6), 1.0, 1000.0)):  # resumed, interrupted
        writer = SummaryWriter(str(log_dir), filename_suffix=f".{int(wall_time)}")
        for epoch in epochs:
            for tag in ("train_loss", "val_mean_dice"):
                writer.add_scalar(tag, value, epoch, walltime=wall_time + epoch)
        writer.close()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2
    drawn, plot = [], matplotlib.axes.Axes.plot

    def recorded_plot(axis, x, y, **options):
        drawn.append((x, y))
        return plot(axis, x, y, **options)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded_plot)
    plot_curves(str(tmp_path / "cv"), str(tmp_path / "curves.png"))
    expected = (tuple(range(1, 8)), (1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5))
    assert [(tuple(x), tuple(y)) for x, y in drawn] == [expected, expected]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_curves_name_no_loss_the_run_may_not_have_used(tmp_path, monkeypatch):
    """The loss panel was titled "training loss (WCE + GDL)" for every cv folder, the ablation's cross-entropy and
    DiceCE runs included."""
    import matplotlib.axes
    from torch.utils.tensorboard import SummaryWriter

    from custom.result_figures import plot_curves

    writer = SummaryWriter(str(tmp_path / "ce" / "fold_0" / "train"))
    for tag in ("train_loss", "val_mean_dice"):
        writer.add_scalar(tag, 0.5, 1)
    writer.close()
    titles, set_axis = [], matplotlib.axes.Axes.set
    monkeypatch.setattr(matplotlib.axes.Axes, "set", lambda axis, **options: titles.append(options.get("title"))
                        or set_axis(axis, **options))  # fmt: skip
    plot_curves(str(tmp_path / "ce"), str(tmp_path / "curves.png"))
    assert titles[:2] == ["training loss", "validation Dice (per volume, 3D)"]


def test_curves_show_the_loss_of_a_one_epoch_fold(tmp_path, monkeypatch):
    """A fold trained for one epoch logs one loss value: its line through a single point, drawn without a marker,
    was invisible, and the loss panel looked empty. A one-point loss is drawn with a marker; longer ones as before."""
    import matplotlib.axes
    from torch.utils.tensorboard import SummaryWriter

    from custom.result_figures import plot_curves

    for fold, epochs in ((0, 1), (1, 3)):
        writer = SummaryWriter(str(tmp_path / "cv" / f"fold_{fold}" / "train"))
        for epoch in range(1, epochs + 1):
            for tag in ("train_loss", "val_mean_dice"):
                writer.add_scalar(tag, 0.5, epoch)
        writer.close()
    drawn, plot = [], matplotlib.axes.Axes.plot

    def recorded_plot(axis, *data, **options):
        lines = plot(axis, *data, **options)
        drawn.extend(lines)
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded_plot)
    plot_curves(str(tmp_path / "cv"), str(tmp_path / "curves.png"))
    one_epoch_loss, _, three_epoch_loss, _ = drawn  # per fold: the loss line, then the Dice line
    assert (list(one_epoch_loss.get_xdata()), list(one_epoch_loss.get_ydata())) == ([1], [0.5])
    assert one_epoch_loss.get_marker() not in ("None", "", " ", None)
    assert three_epoch_loss.get_marker() == "None"


def test_ablation_table_reports_paired_difference():
    rows = [
        {"variant": name, "description": name, "cases": 4,
         **{f"{m}_{s}": 0.5 for m in ("dice", "hd95_mm", "avd_ml", "lesion_f1") for s in ("mean", "std")},
         **{f"{m}_n": 4 for m in ("dice", "avd_ml", "lesion_f1")}, "hd95_mm_n": 3,
         "dice_vs_ce_mean_difference": delta, "dice_vs_ce_std_difference": 0.01,
         "dice_vs_ce_improved": improved, "dice_vs_ce_worse": 4 - improved, "dice_vs_ce_cases": 4}
        for name, delta, improved in (("ce", 0.0, 0), ("wce_gdl", 0.021, 3))
    ]
    table = ablation_markdown(rows, "ce")
    assert "+0.021 ± 0.010" in table and "3 / 1 (of 4)" in table
    assert "| 0.500 ± 0.500, n=3 |" in table and "| 0.500 ± 0.500 |" in table  # n only where cases were left out
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


def _write_cases(folder, dice_by_case: dict, fold_of: dict):
    from custom.reporting import write_case_csv

    rows = [{"case": case, "fold": fold_of[case], "dice": dice, "hd95_mm": 5.0, "avd_ml": 1.0, "lesion_f1": 1.0}
            for case, dice in dice_by_case.items()]
    write_case_csv(rows, str(folder / "cases.csv"))
    return folder


def test_compare_cv_pairs_the_cases_of_the_shorter_run(tmp_path):
    from custom.ablation import compare_cross_validations

    folds = {"a": 0, "b": 0, "c": 1, "d": 1}
    reference = _write_cases(tmp_path / "reference", {"a": 0.5, "b": 0.7, "c": 0.1, "d": 0.9}, folds)
    other = _write_cases(tmp_path / "other", {"a": 0.6, "b": 0.6}, folds)  # fold 0 only
    table = tmp_path / "table.md"
    rows = {row["variant"]: row for row in compare_cross_validations(str(reference), str(other), out=str(table))}
    assert rows["reference"]["cases"] == rows["other"]["cases"] == 2
    assert rows["reference"]["dice_mean"] == pytest.approx(0.6) and rows["other"]["dice_mean"] == pytest.approx(0.6)
    assert rows["other"]["dice_vs_reference_mean_difference"] == pytest.approx(0.0)
    assert (rows["other"]["dice_vs_reference_improved"], rows["other"]["dice_vs_reference_worse"]) == (1, 1)
    assert table.read_text().startswith("2 cases (folds 0) scored by both runs")


def test_compare_cv_averages_distances_over_the_cases_both_runs_have(tmp_path):
    from custom.ablation import compare_cross_validations
    from custom.reporting import write_case_csv

    # the other run missed case c's lesion (empty prediction, HD95 undefined): its HD95 mean must not skip the
    # hardest case while the reference's includes it
    for name, hd95_c in (("reference", 30.0), ("other", float("nan"))):
        write_case_csv([{"case": case, "fold": 0, "dice": 0.5, "hd95_mm": hd95, "avd_ml": 1.0, "lesion_f1": 1.0}
                        for case, hd95 in (("a", 2.0), ("b", 4.0), ("c", hd95_c))], str(tmp_path / name / "cases.csv"))
    rows = compare_cross_validations(str(tmp_path / "reference"), str(tmp_path / "other"), out=str(tmp_path / "t.md"))
    assert [(row["hd95_mm_mean"], row["hd95_mm_n"]) for row in rows] == [(3.0, 2), (3.0, 2)]
    assert (tmp_path / "t.md").read_text().count("3.000 ± 1.000, n=2") == 2


def test_compare_cv_refuses_runs_of_the_same_case_names_in_another_dataset(tmp_path):
    from custom.ablation import compare_cross_validations
    from custom.reporting import write_case_csv

    # case_1 of the test phantom is another patient than case_1 of the training phantom: they were paired silently
    for name, label_ml in (("train_phantom", [22.312, 35.705]), ("test_phantom", [37.690, 4.0176]),
                           ("test_again", [37.690004, 4.0176002])):  # the same labels through another float32 path
        write_case_csv([{"case": f"case_{i}", "dice": 0.5, "hd95_mm": 5.0, "avd_ml": 1.0, "label_ml": volume,
                         "lesion_f1": 1.0} for i, volume in enumerate(label_ml, 1)], str(tmp_path / name / "cases.csv"))
    with pytest.raises(ValueError, match=r"different labels for 2 case\(s\), e.g. 'case_1' \(label_ml 22.3120 against "
                                         r"37.6900\): the same case names in another dataset"):
        compare_cross_validations(str(tmp_path / "train_phantom"), str(tmp_path / "test_phantom"))
    rows = compare_cross_validations(str(tmp_path / "test_phantom"), str(tmp_path / "test_again"))
    assert rows[1]["dice_vs_reference_equal"] == 2


def test_compare_cv_refuses_cv_and_baseline_runs_of_another_dataset(tmp_path):
    """cv's tables carry no label_ml: two cv runs of the same case names were paired whatever their datasets."""
    from custom.ablation import compare_cross_validations
    from custom.baseline import RUN_RECORD as BASELINE_RECORD
    from custom.crossval import RUN_RECORD

    folds = {"a": 0, "b": 0}
    runs = {name: _write_cases(tmp_path / name, {"a": 0.5, "b": 0.6}, folds) for name in ("cv_1", "cv_2", "rule")}
    for name, record, sha in (("cv_1", RUN_RECORD, "1" * 64), ("cv_2", RUN_RECORD, "2" * 64),
                              ("rule", BASELINE_RECORD, "1" * 64)):
        (runs[name] / record).write_text(json.dumps({"dataset_json_sha256": sha}))
    with pytest.raises(ValueError, match=r"ran on different datasets \(dataset.json SHA-256 1{64} against 2{64}"):
        compare_cross_validations(str(runs["cv_1"]), str(runs["cv_2"]))
    assert compare_cross_validations(str(runs["cv_1"]), str(runs["rule"]))[1]["dice_vs_reference_equal"] == 2


def test_compare_cv_pairs_cv_runs_whose_datasets_differ_in_the_testing_list_only(tiny_phantom_dataset, tmp_path):
    """cv trains and scores the training cases only, yet compare-cv refused two cv runs of the same source converted
    with and without --testing (their dataset.json SHA-256 differ). It compares the part of dataset.json that decides
    the folds' results where both records hold it, so runs of other folds are still refused."""
    from custom.ablation import compare_cross_validations
    from custom.crossval import BUNDLE_ROOT, run_configuration
    from custom.data.isles2018 import prepare_isles2018

    raw = tiny_phantom_dataset.parent / "isles2018"  # converted with --testing into tiny_phantom_dataset
    without_testing = prepare_isles2018(raw / "TRAINING", tmp_path / "no_testing", patients=raw / "patients.csv",
                                        folds=2)  # fmt: skip
    training = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"]
    folds = {entry["case"]: entry["fold"] for entry in training}
    runs = {}

    def cv_run(name, dataset_dir):
        run = _write_cases(tmp_path / name, dict.fromkeys(folds, 0.5), folds)
        record = run_configuration([], {}, Path(dataset_dir), BUNDLE_ROOT, save_masks=True)
        (run / RUN_RECORD).write_text(json.dumps(record))
        runs[name] = str(run)

    cv_run("with_testing", tiny_phantom_dataset)
    cv_run("without_testing", without_testing)
    dataset = json.loads((without_testing / "dataset.json").read_text())
    for entry in dataset["training"]:
        entry["fold"] = 1 - entry["fold"]
    (without_testing / "dataset.json").write_text(json.dumps(dataset))
    cv_run("other_folds", without_testing)
    rows = compare_cross_validations(runs["with_testing"], runs["without_testing"])
    assert rows[1]["dice_vs_reference_equal"] == len(folds)
    with pytest.raises(ValueError, match=r"ran on different datasets \(SHA-256 of the training cases, folds and labels "
                                         r"of dataset.json [0-9a-f]{64} against [0-9a-f]{64} in their run records\)"):
        compare_cross_validations(runs["with_testing"], runs["other_folds"])


def test_compare_cv_pairs_a_cv_run_with_baseline_and_score_masks_runs_of_another_testing_list(
    tiny_phantom_dataset, tmp_path
):
    """baseline and score-masks recorded the whole dataset.json's SHA-256 only, so compare-cv refused to pair a cv run
    with the threshold rule or masks scored on the same training cases converted without --testing; they record the
    hash of the scored part too, as cv does (``datalist.scored_dataset_sha256``)."""
    from custom.ablation import compare_cross_validations
    from custom.accuracy_bench import score_masks_command
    from custom.crossval import BUNDLE_ROOT, run_configuration
    from custom.data.isles2018 import prepare_isles2018

    raw = tiny_phantom_dataset.parent / "isles2018"  # converted with --testing into tiny_phantom_dataset
    without_testing = prepare_isles2018(raw / "TRAINING", tmp_path / "no_testing", patients=raw / "patients.csv",
                                        folds=2)  # fmt: skip
    training = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"]
    folds = {entry["case"]: entry["fold"] for entry in training}
    cv = _write_cases(tmp_path / "cv", dict.fromkeys(folds, 0.5), folds)
    (cv / RUN_RECORD).write_text(json.dumps(run_configuration([], {}, tiny_phantom_dataset, BUNDLE_ROOT, True)))
    run_baseline(str(without_testing), str(tmp_path / "rule"))
    (tmp_path / "masks").mkdir()
    for entry in training:
        shutil.copy(without_testing / entry["label"], tmp_path / "masks" / f"{entry['case']}_seg.nii.gz")
    score_masks_command(str(tmp_path / "masks"), str(without_testing), str(tmp_path / "scored"))
    for other in ("rule", "scored"):
        rows = compare_cross_validations(str(cv), str(tmp_path / other))
        assert rows[1]["cases"] == len(folds), other


def test_compare_cv_refuses_a_score_masks_table_of_another_dataset(tiny_phantom_dataset, tmp_path):
    """score-masks wrote no run record, so its table was paired with a cv run of the same case names in another
    dataset; it records the dataset.json SHA-256 of the labels it scored, which compare-cv checks as cv's."""
    from custom.ablation import compare_cross_validations
    from custom.accuracy_bench import SCORE_RECORD, score_masks_command

    entries = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"]
    (tmp_path / "masks").mkdir()
    for entry in entries:
        shutil.copy(tiny_phantom_dataset / entry["label"], tmp_path / "masks" / f"{entry['case']}_seg.nii.gz")
    score_masks_command(str(tmp_path / "masks"), str(tiny_phantom_dataset), str(tmp_path / "scored"))
    digest = hashlib.sha256((tiny_phantom_dataset / "dataset.json").read_bytes()).hexdigest()
    assert json.loads((tmp_path / "scored" / SCORE_RECORD).read_text())["dataset_json_sha256"] == digest
    cv = _write_cases(tmp_path / "cv", {e["case"]: 0.5 for e in entries}, {e["case"]: e["fold"] for e in entries})
    (cv / RUN_RECORD).write_text(json.dumps({"dataset_json_sha256": "1" * 64}))
    with pytest.raises(ValueError, match=rf"ran on different datasets \(dataset.json SHA-256 1{{64}} against {digest}"):
        compare_cross_validations(str(cv), str(tmp_path / "scored"))
    (cv / RUN_RECORD).write_text(json.dumps({"dataset_json_sha256": digest}))
    assert compare_cross_validations(str(cv), str(tmp_path / "scored"))[1]["dice_vs_reference_improved"] > 0


def test_compare_cv_refuses_cases_the_reference_lacks(tmp_path):
    from custom.ablation import compare_cross_validations

    folds = {"a": 0, "z": 0}
    reference = _write_cases(tmp_path / "reference", {"a": 0.5}, folds)
    other = _write_cases(tmp_path / "other", {"a": 0.6, "z": 0.6}, folds)
    with pytest.raises(ValueError, match=r"no rows for the cases \['z'\]"):
        compare_cross_validations(str(reference), str(other))


def test_every_fold_of_a_dataset_of_more_folds_than_train_json_passes_the_bundle_checks(
    tiny_phantom_dataset, tmp_path, monkeypatch
):
    """prepare --folds 5 is documented; cv trained and evaluated folds 0-3 of such a dataset, then train.json's
    num_folds (4) refused fold 4. Each bundle run here passes the bundle's own check_settings first."""
    dataset_dir = tmp_path / "dataset"
    shutil.copytree(tiny_phantom_dataset, dataset_dir)
    dataset = json.loads((dataset_dir / "dataset.json").read_text())
    patients = sorted({entry["patient"] for entry in dataset["training"]})
    for entry in dataset["training"]:  # one patient per fold, the last fold takes the rest
        entry["fold"] = min(patients.index(entry["patient"]), 4)
    dataset["num_folds"] = 5
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset))
    runs = fake_bundle(monkeypatch)
    fake = custom.crossval._run_bundle

    def checked(config_files, arguments, overrides, log_file):
        custom.crossval.check_overrides(config_files, arguments, overrides)
        fake(config_files, arguments, overrides, log_file)

    monkeypatch.setattr(custom.crossval, "_run_bundle", checked)
    run_cross_validation(str(dataset_dir), str(tmp_path / "cv"))
    assert [run["fold"] for run in runs] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_each_fold_command_is_printed_as_a_shell_runs_it(tmp_path, monkeypatch, capsys):
    """The printed line of a fold's bundle run, pasted into a shell, is that run (it printed the config list and list
    overrides unquoted: `--config_file ['a.json', 'b.json']` reached a shell as several words)."""
    import shlex
    import subprocess

    ran = []
    monkeypatch.setattr(custom.crossval.subprocess, "run", lambda command, **_: ran.append(command)
                        or subprocess.CompletedProcess(command, 0))  # fmt: skip
    configs = ["/b/configs/train.json", "/my configs/demo.json"]
    custom.crossval._run_bundle(configs, {"output_dir": "runs/fold 0"}, {"patch_size": [64, 64]}, tmp_path / "log")
    assert shlex.split(capsys.readouterr().out) == ran[0]
