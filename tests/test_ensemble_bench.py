"""python -m custom ensemble-bench on tiny sizes: configurations, identities, outputs."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom.__main__ import main
from custom.clinical import voxel_volume_ml
from custom.deploy import LESION_THRESHOLD, MIN_LESION_ML, lesion_mask, read_case
from custom.ensemble_bench import fold_checkpoints, run_ensemble_bench
from custom.handlers import load_network_checkpoint

TINY_NETWORK = {
    "network_def": {
        "_target_": "UNet", "spatial_dims": 2, "in_channels": 5, "out_channels": 2,
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance",
    },
    "lesion_threshold": LESION_THRESHOLD, "min_lesion_ml": MIN_LESION_ML,  # inference.json's post-processing
}  # fmt: skip


@pytest.fixture()
def identical_folds(tmp_path):
    """A cv folder whose two folds hold the same tiny network, and the inference config it fits."""
    config = tmp_path / "tiny_inference.json"
    config.write_text(json.dumps(TINY_NETWORK))
    parser = ConfigParser()
    parser.read_config(str(config))
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    for fold in (0, 1):
        (tmp_path / "cv" / f"fold_{fold}" / "models").mkdir(parents=True)
        torch.save(state, tmp_path / "cv" / f"fold_{fold}" / "models" / "model.pt")
    return tmp_path / "cv", config


@pytest.fixture()
def two_labelled_cases(tiny_phantom_dataset, tmp_path):
    """A dataset folder listing two of the tiny phantom's labelled cases (absolute paths), to keep the test short."""
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    entries = [
        {**e, "image": str(tiny_phantom_dataset / e["image"]), "label": str(tiny_phantom_dataset / e["label"])}
        for e in dataset["training"][:2]
    ]
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "dataset.json").write_text(json.dumps({**dataset, "training": entries, "testing": []}))
    return tmp_path / "two"


def test_ensemble_bench_of_identical_folds(identical_folds, two_labelled_cases, tmp_path):
    cv, config = identical_folds
    summary = run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config))
    by_name = {e["configuration"]: e for e in summary}
    assert list(by_name) == [
        "fold 0", "fold 0 + flips", "fold 1", "fold 1 + flips", "ensemble", "ensemble + flips",
        "single fold (mean of folds)", "single fold + flips (mean of folds)",
    ]  # fmt: skip
    configurations = ("fold 0", "fold 0 + flips", "ensemble", "ensemble + flips")
    assert [by_name[n]["predictions"] for n in configurations] == [1, 4, 2, 8]
    for name in ("dice", "ece", "avd_mask_ml", "avd_prob_ml"):
        # the ensemble of identical models equals one model, with and without flips, up to the float32 rounding of
        # the mean of N maps (relative 1e-10 on a volume summed in float64)
        assert by_name["ensemble"][name] == pytest.approx(by_name["fold 0"][name], rel=1e-9, abs=1e-9)
        assert by_name["ensemble + flips"][name] == pytest.approx(by_name["fold 0 + flips"][name], rel=1e-9, abs=1e-9)
    assert by_name["ensemble"]["uncertainty_wrong"] == pytest.approx(0, abs=1e-7)
    assert 0 <= by_name["fold 0"]["ece"] <= 1
    with open(tmp_path / "out" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 2  # six configurations x two labelled cases
    for row in rows:
        assert float(row["avd_prob_ml"]) == pytest.approx(abs(float(row["prob_ml"]) - float(row["label_ml"])))
    record = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert record["cases"] == 2 and record["summary"][0]["uncertainty_wrong"] is None
    assert "| ensemble + flips | 8 |" in (tmp_path / "out" / "summary.md").read_text()


def test_without_flips_only_the_unflipped_configurations(identical_folds, two_labelled_cases, tmp_path):
    cv, config = identical_folds
    summary = run_ensemble_bench(
        str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config), flips=False, max_cases=1
    )
    assert [(e["configuration"], e["predictions"], e["cases"]) for e in summary] == [
        ("fold 0", 1, 1), ("fold 1", 1, 1), ("ensemble", 2, 1), ("single fold (mean of folds)", 1, 1)
    ]  # fmt: skip


def _fold_0_network_and_scored_cases(cv, dataset_dir, out):
    """Fold 0's network (eval mode) and, per case ensemble-bench scored into ``out``: its ``cases.csv`` row and the
    case's volume and affine as the runner reads them."""
    network = ConfigParser(TINY_NETWORK).get_parsed_content("network_def")
    load_network_checkpoint(cv / "fold_0" / "models" / "model.pt", network)
    entries = json.loads((dataset_dir / "dataset.json").read_text())["training"]
    with open(out / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    return network.eval(), [(row, *read_case(entry["image"])) for row, entry in zip(rows, entries)]


def test_masks_are_post_processed_as_the_shipped_inference(identical_folds, two_labelled_cases, tmp_path):
    """ensemble-bench scored the argmax mask, with the lesions that inference.json's ``min_lesion_ml`` removes: its
    masks are now those of the shipped inference (``custom.deploy.lesion_mask``), by default with ``--config_file``'s
    ``min_lesion_ml``."""
    cv, config = identical_folds
    removes_all = tmp_path / "removes_all.json"
    removes_all.write_text(json.dumps({**TINY_NETWORK, "min_lesion_ml": 1e6}))
    options = {"flips": False, "folds": 1}
    run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "all"), config_file=str(removes_all), **options)
    with open(tmp_path / "all" / "cases.csv") as f:
        assert [float(row["mask_ml"]) for row in csv.DictReader(f)] == [0.0, 0.0]
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["min_lesion_ml"] == 1e6
    unset = tmp_path / "network_only.json"
    unset.write_text(json.dumps({"network_def": TINY_NETWORK["network_def"]}))
    with pytest.raises(ValueError, match="network_only.json' has no 'min_lesion_ml'.*--min_lesion_ml"):
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "unset"), config_file=str(unset))

    run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(removes_all),
                       min_lesion_ml=MIN_LESION_ML, **options)
    network, scored = _fold_0_network_and_scored_cases(cv, two_labelled_cases, tmp_path / "out")
    with torch.no_grad():
        for row, volume, affine in scored:
            expected = lesion_mask(network, volume, affine, min_lesion_ml=MIN_LESION_ML)
            assert float(row["mask_ml"]) == pytest.approx(expected.sum() * voxel_volume_ml(affine)) and expected.any()


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_masks_are_thresholded_as_the_shipped_inference(identical_folds, two_labelled_cases, tmp_path, threshold):
    """ensemble-bench took the argmax of the mean probabilities whatever the config's ``lesion_threshold``: its masks
    are now thresholded as inference does them (``custom.deploy.lesion_mask``), by default at ``--config_file``'s."""
    cv, _ = identical_folds
    config = tmp_path / "thresholded.json"
    config.write_text(json.dumps({**TINY_NETWORK, "lesion_threshold": threshold, "min_lesion_ml": 0}))
    run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config),
                       flips=False, folds=1)  # fmt: skip
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["lesion_threshold"] == threshold
    network, scored = _fold_0_network_and_scored_cases(cv, two_labelled_cases, tmp_path / "out")
    with torch.no_grad():
        for row, volume, affine in scored:
            expected = lesion_mask(network, volume, affine, min_lesion_ml=0, lesion_threshold=threshold)
            argmax = lesion_mask(network, volume, affine, min_lesion_ml=0, lesion_threshold=LESION_THRESHOLD)
            assert expected.sum() != argmax.sum()  # the threshold decides this case's mask
            assert float(row["mask_ml"]) == pytest.approx(expected.sum() * voxel_volume_ml(affine))


def test_cases_a_fold_model_was_trained_on_are_refused(identical_folds, two_labelled_cases, tmp_path):
    """Scored on the cross-validation's own dataset, the bench reported the Dice of cases the fold models were
    trained on, without a word: a fold model whose training record names one of the images to score (by its voxels)
    is refused before any model is loaded, naming it; cases none of the folds trained on are scored."""
    from custom.training_record import TRAINING_RECORD, run_record

    cv, config = identical_folds
    cases = json.loads((two_labelled_cases / "dataset.json").read_text())["training"]
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
    record = run_record(settings, 1, two_labelled_cases, trained_cases=[{"image": cases[1]["image"]}])
    (cv / "fold_1" / "models" / TRAINING_RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError) as raised:
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config))
    message = str(raised.value)
    assert f"fold model '{cv / 'fold_1' / 'models' / 'model.pt'}' was trained on 1 of the 2 cases to score" in message
    assert Path(cases[1]["image"]).name in message and "a dataset none of the folds saw" in message
    assert not (tmp_path / "out").exists()
    summary = run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "first"), config_file=str(config),
                                 max_cases=1, flips=False)  # fmt: skip
    assert summary[0]["cases"] == 1


@pytest.mark.parametrize("setting", [{"spacing_mm": 0.9}, {"adjacent_slices": 1}], ids=lambda s: next(iter(s)))
def test_fold_models_trained_with_other_input_settings_are_refused_naming_them(
    identical_folds, two_labelled_cases, tmp_path, setting
):
    """The bench feeds every fold the runner's input, the 5 maps on their own grid: a fold trained with ``spacing_mm``
    (5 channels, so it loads) was scored on inputs it never saw, without a word; one trained with slice context
    failed in load_state_dict naming no setting. Both are refused by the fold's training record, before any
    output."""
    from custom.deploy import RUNNER_INPUT_SETTINGS
    from custom.training_record import TRAINING_RECORD, run_record

    cv, config = identical_folds
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None, **setting}
    (cv / "fold_1" / "models" / TRAINING_RECORD).write_text(json.dumps(run_record(settings, 1, tmp_path / "none")))
    with pytest.raises(ValueError) as raised:
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config))
    (key, value), = setting.items()
    message = str(raised.value)
    assert f"checkpoint '{cv / 'fold_1' / 'models' / 'model.pt'}' was trained with other settings" in message
    assert f"{key}: trained with {value!r}, this run {RUNNER_INPUT_SETTINGS[key]!r} (--{key} {value})" in message
    assert "is not scored by ensemble-bench" in message and "python -m custom cv" in message
    assert not (tmp_path / "out").exists()


def test_an_earlier_runs_tables_are_replaced_only_when_asked(identical_folds, two_labelled_cases, tmp_path):
    cv, config = identical_folds
    out = tmp_path / "out"
    run_ensemble_bench(str(cv), str(two_labelled_cases), str(out), config_file=str(config), flips=False)
    earlier = {name: (out / name).read_bytes() for name in ("cases.csv", "summary.json", "summary.md")}
    with pytest.raises(FileExistsError, match=r"--out '.*out' holds 3 file\(s\) of an earlier run .*cases.csv"):
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(out), config_file=str(config), flips=False,
                           max_cases=1, folds=1)
    assert {name: (out / name).read_bytes() for name in earlier} == earlier
    summary = run_ensemble_bench(str(cv), str(two_labelled_cases), str(out), config_file=str(config), flips=False,
                                 max_cases=1, folds=1, overwrite=True)
    assert summary[0]["cases"] == 1 and json.loads((out / "summary.json").read_text())["cases"] == 1


def test_training_entries_without_label_are_refused_naming_them(identical_folds, two_labelled_cases, tmp_path):
    cv, config = identical_folds
    dataset = json.loads((two_labelled_cases / "dataset.json").read_text())
    del dataset["training"][1]["label"]
    (two_labelled_cases / "dataset.json").write_text(json.dumps(dataset))
    case = dataset["training"][1]["case"]
    with pytest.raises(ValueError, match=f"without a 'label': \\['{case}'\\]"):
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config))


def test_missing_fold_models_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fold model.*fold_0"):
        fold_checkpoints(tmp_path)
    (tmp_path / "fold_0" / "models").mkdir(parents=True)
    (tmp_path / "fold_0" / "models" / "model.pt").write_bytes(b"")
    assert fold_checkpoints(tmp_path) == [tmp_path / "fold_0" / "models" / "model.pt"]
    with pytest.raises(FileNotFoundError, match="fold_1"):
        fold_checkpoints(tmp_path, folds=2)


def test_command_line_refuses_unknown_options():
    with pytest.raises(SystemExit, match="unknown option '--foldz'"):
        main(["ensemble-bench", "--foldz", "2"])


def _half_label(label, affine):
    return label * 0.5, affine, "label values must be 0 or 1, found \\[0.5\\]"


def _mirrored_label(label, affine):
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = label.shape[0] - 1
    return label[::-1].copy(), affine @ flip, "affine differs from"


@pytest.mark.parametrize("spoil", [_half_label, _mirrored_label], ids=["label 0.5", "mirrored label"])
def test_a_label_training_would_refuse_is_refused_before_any_model_runs(
    identical_folds, two_labelled_cases, tmp_path, spoil
):
    """A label of 0.5 was read as 0 (the case scored as lesion-free) and a label stored mirrored with its affine
    adjusted was scored voxel by voxel against the image's grid, both without a word; now the cases are screened with
    the checks of ``python -m custom check`` before a model is loaded, naming the label, and nothing is written."""
    cv, config = identical_folds
    dataset = json.loads((two_labelled_cases / "dataset.json").read_text())
    image = nib.load(dataset["training"][1]["label"])
    data, affine, problem = spoil(np.asarray(image.dataobj).astype(np.float32), image.affine)
    spoilt = tmp_path / "spoilt_label.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), spoilt)
    dataset["training"][1]["label"] = str(spoilt)
    (two_labelled_cases / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ValueError, match=f"cases to score cannot be used:\\n  - {spoilt}: {problem}"):
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value", [("max_cases", -1), ("folds", 0), ("batch_size", 0), ("bins", -3), ("bins", 2.5)]
)
def test_a_count_option_that_is_not_a_whole_number_of_at_least_1_is_refused_naming_it(
    identical_folds, two_labelled_cases, tmp_path, option, value
):
    """``--max_cases -1`` scored every case but the last (a negative slice) without a word; ``--folds 0`` was
    reported as a missing fold_0 model; ``--batch_size 0`` and ``--bins -3`` or ``2.5`` failed deep in range or
    numpy. Each is refused naming the option, and nothing is written."""
    cv, config = identical_folds
    with pytest.raises(ValueError, match=f"^--{option} must be a whole number >= 1, got {value}$"):
        run_ensemble_bench(str(cv), str(two_labelled_cases), str(tmp_path / "out"), config_file=str(config),
                           **{option: value})
    assert not (tmp_path / "out").exists()
