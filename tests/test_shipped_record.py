"""The training record of the shipped weights (``bundle/models/training_inputs.json``): the input settings, fold
and training images of ``python -m custom accuracy-bench --out runs/accuracy --budget_s 720`` (version 0.3.0), by
which evaluation, inference and MONAI Label serving check ``bundle/models/model.pt`` as they check a training run's
weights (``custom.training_record``)."""

import json
import zipfile
from pathlib import Path

import pytest
from conftest import BUNDLE, CONFIGS, bundle_workflow, error_chain
from monai.bundle import ConfigParser

from custom.data.datalist import fold_datalist
from custom.package import package_bundle
from custom.training_record import INPUT_SETTINGS, TRAINING_RECORD, check_held_out, read_record

SHIPPED_MODEL = BUNDLE / "models" / "model.pt"
SHIPPED_RECORD = BUNDLE / "models" / TRAINING_RECORD


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_the_shipped_record_holds_the_default_input_settings(config):
    """The shipped weights are run with the configs' defaults: a retrain with other defaults must update the record
    (or the shipped weights would be refused by every default run)."""
    defaults = json.loads((CONFIGS / config).read_text())
    assert {key: read_record(SHIPPED_MODEL)[key] for key in INPUT_SETTINGS} == {key: defaults[key] for key in
                                                                                INPUT_SETTINGS}  # fmt: skip


def test_the_shipped_record_holds_the_loss_of_train_jsons_defaults():
    """A resume from the shipped weights compares the loss's config ids with the record's: the record holds those
    train.json's defaults give now (``config_values``: its loss's ids with the defaults of its signature filled in),
    so a default run, or one setting a loss argument to its default, is not refused for its loss."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["loss_ids"] = {"_target_": "custom.config_check.config_values", "root_id": "loss"}
    assert read_record(SHIPPED_MODEL)["loss"] == parser.get_parsed_content("loss_ids")


def test_the_shipped_record_names_no_path_of_the_machine_it_was_written_on():
    """Its dataset and images are named as ``accuracy-bench --out runs/accuracy`` writes them, from the repository
    root, with the SHA-256 of that dataset.json and the digests of the 30 images of folds 1 to 3."""
    record = read_record(SHIPPED_MODEL)
    assert record["fold"] == 0 and record["dataset_json"] == "runs/accuracy/train/dataset/dataset.json"
    assert len(record["trained_images"]) == 30
    assert all(image.startswith("runs/accuracy/train/dataset/imagesTr/") for image in record["trained_images"])


@pytest.mark.parametrize("setting", [{"contralateral_channels": "mirror"}, {"adjacent_slices": 1}, {"spacing_mm": 0.9}],
                         ids=["contralateral_channels mirror", "adjacent_slices 1", "spacing_mm 0.9"])
def test_the_shipped_weights_are_refused_with_other_input_settings_naming_their_record(tiny_phantom_dataset,
                                                                                       tmp_path, setting):
    """Without a record the shipped 5-channel weights met the 10- or 15-channel network of another setting in
    ``load_state_dict`` (a list of mismatched weights); now the setting is named, with the override to pass."""
    entry = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["testing"][0]
    image = str(tiny_phantom_dataset / (entry["image"] if isinstance(entry, dict) else entry))
    workflow = bundle_workflow(["inference.json"], "infer", datalist=[image], output_dir=str(tmp_path / "out"),
                               num_workers=0, **setting)  # fmt: skip
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    message = error_chain(raised.value)
    assert f"checkpoint '{SHIPPED_MODEL}' was trained with other settings than this run's (recorded in " \
           f"'{SHIPPED_RECORD}')" in message
    (key, value), = setting.items()
    trained = read_record(SHIPPED_MODEL)[key]
    assert f"{key}: trained with {trained!r}, this run {value!r} (--{key} {trained})" in message
    assert not (tmp_path / "out").exists()


def test_the_shipped_weights_are_not_evaluated_on_the_images_they_were_trained_on(tmp_path):
    """The first cases of a phantom of seed 2026 are those of the benchmark's 40-case training phantom: case_1 and
    case_2 (its folds 2 and 3) were trained on and are refused by evaluate.json; case_3 (its fold 0, the inner
    validation split) and case_4 (another slab count than the 40-case cohort drew: other voxels) pass."""
    from custom.data.isles2018 import prepare_isles2018
    from custom.data.phantom import write_phantom

    raw = Path(write_phantom(tmp_path / "raw", cases=4, test_cases=0, seed=2026, size=256))
    dataset = Path(prepare_isles2018(raw / "TRAINING", tmp_path / "dataset", patients=raw / "patients.csv", folds=2))
    workflow = bundle_workflow(["train.json", "evaluate.json"], "train", dataset_dir=str(dataset), fold=-1,
                               output_dir=str(tmp_path / "eval"), num_workers=0, cache_rate=0.0)  # fmt: skip
    with pytest.raises(Exception) as raised:
        workflow.initialize()
        workflow.run()
    message = error_chain(raised.value)
    assert f"checkpoint '{SHIPPED_MODEL}' was trained on 2 of the 4 images of config id 'fold' -1 of " \
           f"'{dataset / 'dataset.json'}': case_1.nii.gz, case_2.nii.gz (same voxels; it was trained on every fold " \
           f"but 0 of 'runs/accuracy/train/dataset/dataset.json', recorded in '{SHIPPED_RECORD}')" in message
    assert not (tmp_path / "eval").exists()
    held_out = [case for case in fold_datalist(dataset, -1, "validate") if case["case"] in ("case_3", "case_4")]
    check_held_out(SHIPPED_MODEL, -1, dataset, held_out)


def test_the_bundle_archive_carries_the_shipped_record(tmp_path):
    archive = zipfile.ZipFile(package_bundle(tmp_path / "ctp_stroke.zip"))
    assert archive.read(f"ctp_stroke/models/{TRAINING_RECORD}") == SHIPPED_RECORD.read_bytes()
