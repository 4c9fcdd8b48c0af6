"""Training lifecycle of configs/train.json: where weights go, runs of any length, resume, fine-tunes, kill -9."""

import hashlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, TINY_TRAINING, bundle_workflow, error_chain
from ignite.engine import Engine, Events

from custom import config_check
from custom.crossval import override_arguments
from custom.data.datalist import IMAGE_DIGEST, fold_datalist, load_dataset_json, scored_dataset_sha256
from custom.data.isles2018 import prepare_isles2018
from custom.data.phantom import write_phantom
from custom.lifecycle import CrashSafeCheckpointSaver, ValidationAtIntervalAndEnd, latest_checkpoint
from custom.losses import WeightedCEGeneralizedDiceLoss
from custom.monailabel_app import serve_weights, unpack_served_bundle
from custom.package import package_bundle
from custom.training_record import (
    FINE_TUNED_IMAGES,
    TRAINING_RECORD,
    case_digests,
    check_held_out,
    check_record,
    read_record,
    trained_images_among,
    write_training_record,
)


def _workflow(dataset_dir, bundle_root=BUNDLE, **override):
    workflow = monai.bundle.ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "train.json"),
        meta_file=str(bundle_root / "configs" / "metadata.json"), logging_file=False, workflow_type="train",
        bundle_root=str(bundle_root), dataset_dir=str(dataset_dir),
        **{**TINY_TRAINING, **override},
    )  # fmt: skip
    workflow.initialize()
    return workflow


def test_validation_runs_at_interval_and_after_last_epoch():
    validated = []

    class Validator:
        def run(self, epoch):
            validated.append(epoch)

    handler = ValidationAtIntervalAndEnd(interval=2)
    handler.validator = Validator()
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    trainer.run([0], max_epochs=5)
    assert validated == [2, 4, 5]


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path):
    """A write that dies half-way (here: an object pickle cannot store) leaves model.pt as it was.

    MONAI's own CheckpointSaver removes model.pt first and leaves a truncated file (checked by hand)."""

    class Weights:
        broken = False

        def state_dict(self):
            return {"w": torch.arange(3.0), **({"unpicklable": lambda: 0} if self.broken else {})}

        def load_state_dict(self, state):
            pass

    weights = Weights()
    handler = CrashSafeCheckpointSaver(
        save_dir=str(tmp_path), save_dict={"model": weights}, save_final=True, final_filename="model.pt"
    )
    engine = Engine(lambda engine, batch: None)
    handler.completed(engine)
    saved = (tmp_path / "model.pt").read_bytes()
    weights.broken = True
    with pytest.raises(Exception):
        handler.completed(engine)
    assert (tmp_path / "model.pt").read_bytes() == saved
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_schedule_follows_the_trainers_max_epochs(tiny_phantom_dataset, tmp_path):
    """MONAI Label overrides train#trainer#max_epochs only; the schedule must fit that run, not ``epochs``."""
    workflow = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), epochs=300, warmup_epochs=10,
                         **{"train#trainer#max_epochs": 3})  # fmt: skip
    scheduler = workflow.parser.get_parsed_content("lr_scheduler")
    iterations = len(workflow.parser.get_parsed_content("train#dataloader"))
    assert scheduler.t_total == 3 * iterations
    assert scheduler.warmup_steps <= scheduler.t_total / 10


def test_short_default_run_ends_with_model_and_keeps_shipped_weights(tiny_phantom_dataset, tmp_path):
    """A run shorter than val_interval, with the default ckpt_dir and output_dir: model.pt and the logs written
    under runs/fold0/, bundle/models (the shipped weights, their export and their training record) untouched."""
    bundle_root = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle_root / "configs")
    shutil.copytree(BUNDLE / "models", bundle_root / "models")
    shipped = {path.name: path.read_bytes() for path in (bundle_root / "models").iterdir()}
    assert sorted(shipped) == ["model.pt", "model.ts", TRAINING_RECORD]
    workflow = _workflow(tiny_phantom_dataset, bundle_root=bundle_root, epochs=1, val_interval=10)
    workflow.run()
    assert {path.name: path.read_bytes() for path in (bundle_root / "models").iterdir()} == shipped
    assert workflow.parser.get_parsed_content("validate#evaluator").state.best_metric_epoch == 1
    state = torch.load(bundle_root / "runs" / "fold0" / "model.pt", weights_only=True)
    assert state.keys() == workflow.parser.get_parsed_content("network").state_dict().keys()
    # TensorBoard logs beside the fold's checkpoints, not in a folder shared by every fold and by inference.json
    assert list((bundle_root / "runs" / "fold0" / "logs").glob("events.out.tfevents.*"))
    assert not (bundle_root / "eval").exists()


def _monailabel_fine_tune(served, train_cases, validate_cases, epochs=2):
    """What MONAI Label 0.8.5's BundleTrainTask does to the served copy, without the server: the same overrides
    and the same call (``monai.bundle.run`` with the Slicer plugin's empty ``run_id``)."""
    weights = served / "models" / "model.pt"
    train_config = monai.bundle.ConfigParser.load_config_file(served / "configs" / "train.json")
    train_handlers = train_config["train"]["handlers"]
    train_handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(weights),
                              "load_dict": {"model": "$@network"}, "strict": False})  # fmt: skip
    sys.path.insert(0, str(served))
    try:
        monai.bundle.run(
            run_id="", init_id=None, final_id=None, meta_file=str(served / "configs" / "metadata.json"),
            config_file=str(served / "configs" / "train.json"), logging_file=False,
            **{"bundle_root": str(served), "train#trainer#max_epochs": epochs, "device": torch.device("cpu"),
               "train#dataset#data": train_cases, "validate#dataset#data": validate_cases,
               "train#handlers": train_handlers,
               **{k: v for k, v in TINY_TRAINING.items() if k not in ("epochs", "val_interval")}},
        )  # fmt: skip
    finally:
        sys.path.remove(str(served))


def _served_copy(tmp_path):
    """The copy of the packaged bundle that ``python -m custom monailabel-app`` serves."""
    return unpack_served_bundle(package_bundle(tmp_path / "ctp_stroke.zip"), tmp_path / "model")


def _labelled_studies(dataset_dir):
    """The dataset's training cases as MONAI Label's datastore gives them: image and label paths only."""
    return [{"image": e["image"], "label": e["label"]} for e in fold_datalist(dataset_dir, -1, "train")]


@pytest.mark.parametrize("validation_cases", [2, 0])
def test_monailabel_fine_tune_updates_the_served_weights(tiny_phantom_dataset, tmp_path, validation_cases):
    """A MONAI Label fine-tune replaces the served model.pt; MONAI Label's ``val_split`` can leave no validation
    case, then the final weights are saved. The served copy's model.ts, an export of the weights it replaced, stayed
    beside them (a copy of the served bundle deployed through it ran the old weights): it is removed. The served copy
    holds the shipped weights' training record; the fine-tune keeps it (their input settings, fold, dataset and
    training images) and adds the digests of its training studies."""
    served, cases = _served_copy(tmp_path), _labelled_studies(tiny_phantom_dataset)
    weights = served / "models" / "model.pt"
    shipped = weights.read_bytes()
    assert (served / "models" / "model.ts").is_file()
    shipped_record = read_record(BUNDLE / "models" / "model.pt")
    assert read_record(weights) == shipped_record
    _monailabel_fine_tune(served, cases[validation_cases:], cases[:validation_cases])
    assert weights.read_bytes() != shipped
    assert not (served / "models" / "model.ts").exists()
    state = torch.load(weights, weights_only=True)
    assert state.keys() == torch.load(BUNDLE / "models" / "model.pt", weights_only=True).keys()
    record = read_record(weights)
    assert {key: record[key] for key in shipped_record} == shipped_record
    assert record[FINE_TUNED_IMAGES] == {image: [digest] for image, digest in
                                         case_digests(cases[validation_cases:]).items()}  # fmt: skip


def test_fine_tuned_served_weights_are_not_evaluated_on_images_they_learnt(tiny_phantom_dataset, tmp_path):
    """Each MONAI Label fine-tune replaced the served fold model's record with one naming no dataset and no images:
    ``check_held_out`` (evaluate.json, ensemble-bench) then scored the fine-tuned weights on the images the fold model
    was trained on, and on the fine-tunes' own studies, without a word. The fine-tune's record keeps the served
    weights' (fold, dataset, ``trained_images``) and adds its studies' digests to those of the earlier fine-tunes: both
    are refused, held-out images (validation studies included) pass. A dataset run replacing the fine-tuned weights
    under the served record's fold and dataset removes them at its start (its record would not name the studies)."""
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
    run = tmp_path / "fold0"
    run.mkdir()
    write_training_record(run, settings, 0, tiny_phantom_dataset,
                          trained_cases=fold_datalist(tiny_phantom_dataset, 0, "train"))  # fmt: skip
    shutil.copyfile(BUNDLE / "models" / "model.pt", run / "model.pt")
    served = _served_copy(tmp_path)
    serve_weights(served, run / "model.pt")
    weights, record = served / "models" / "model.pt", served / "models" / TRAINING_RECORD
    other_phantom = write_phantom(tmp_path / "other_raw", cases=8, test_cases=0, seed=4, size=64)
    studies = prepare_isles2018(Path(other_phantom) / "TRAINING", tmp_path / "studies", folds=2)
    labelled = {
        fold: [{"image": e["image"], "label": e["label"]} for e in fold_datalist(studies, fold, "validate")]
        for fold in (0, 1)
    }

    def refusal(dataset_dir, fold):
        try:
            check_held_out(weights, fold, dataset_dir, fold_datalist(dataset_dir, fold, "validate"))
        except ValueError as err:
            return str(err)
        return None

    _monailabel_fine_tune(served, labelled[1], labelled[0][:1], epochs=1)
    learnt = f"it was trained on every fold but 0 of '{tiny_phantom_dataset / 'dataset.json'}' and fine-tuned in " \
             f"MONAI Label on 4 studies, recorded in '{record}'). Their scores would be those of cases it learnt: " \
             "evaluate it on images it was not trained on"
    assert f"checkpoint '{weights}' was trained on 4 of the 4 images of config id 'fold' 1 of " \
           f"'{tiny_phantom_dataset / 'dataset.json'}': case_4.nii.gz" in refusal(tiny_phantom_dataset, 1)
    assert learnt in refusal(tiny_phantom_dataset, 1)
    assert f"checkpoint '{weights}' was trained on 4 of the 4 images of config id 'fold' 1 of " \
           f"'{studies / 'dataset.json'}'" in refusal(studies, 1)
    assert refusal(tiny_phantom_dataset, 0) is None and refusal(studies, 0) is None
    assert len(trained_images_among(read_record(weights), case_digests(labelled[1]))) == 4  # as ensemble-bench asks

    _monailabel_fine_tune(served, labelled[0], [], epochs=1)
    assert learnt.replace("on 4 studies", "on 8 studies") in refusal(studies, 0)
    assert refusal(studies, 1) and refusal(tiny_phantom_dataset, 1) and refusal(tiny_phantom_dataset, 0) is None

    write_training_record(weights.parent, settings, 0, tiny_phantom_dataset,
                          trained_cases=fold_datalist(tiny_phantom_dataset, 0, "train"))  # fmt: skip
    assert not weights.exists()


def _relabelled(cases, folder, relabel):
    """``cases`` with each label rewritten by ``relabel(data, affine)`` into ``folder``."""
    folder.mkdir()
    changed = []
    for index, case in enumerate(cases):
        label = nib.load(case["label"])
        data, affine = relabel(np.asarray(label.dataobj), label.affine)
        path = folder / f"label_{index}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)
        changed.append({**case, "label": str(path)})
    return changed


def _mirrored(data, affine):
    """The same label in world space, stored with its first voxel axis reversed (another orientation)."""
    flipped = affine.copy()
    flipped[:, 0] = -affine[:, 0]
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (data.shape[0] - 1)
    return data[::-1].copy(), flipped


@pytest.mark.parametrize(
    "problem", ["no labels", "no lesion", "no lesion to validate on", "another orientation", "label 255"]
)
def test_monailabel_fine_tune_refuses_unusable_labels_naming_them(tiny_phantom_dataset, tmp_path, problem):
    """MONAI Label sets the datasets' data itself, past fold_datalist: its studies are screened by the same rules
    before anything is cached or trained, the served model.pt untouched (without the screening the labels without
    lesion replaced it with a network predicting none, a mirrored label was trained on, no labels failed inside
    MONAI's DataLoader, and validation studies without lesion replaced it with the model picked on empty labels,
    status DONE)."""
    served, cases = _served_copy(tmp_path), _labelled_studies(tiny_phantom_dataset)
    weights = served / "models" / "model.pt"
    shipped = weights.read_bytes()
    if problem == "no labels":
        train, validate, expected = [], [], "MONAI Label gave the fine-tune no labelled study to train on"
    elif problem == "no lesion":
        train = _relabelled(cases[1:], tmp_path / "labels", lambda data, affine: (np.zeros_like(data), affine))
        validate, expected = cases[:1], f"none of the labels of MONAI Label's {len(train)} training studies holds"
    elif problem == "no lesion to validate on":
        train = cases[2:]
        validate = _relabelled(cases[:2], tmp_path / "labels", lambda data, affine: (np.zeros_like(data), affine))
        expected = (
            f"none of the labels of MONAI Label's 2 validation studies holds a lesion voxel ({validate[0]['label']}, "
            f"{validate[1]['label']}): the fine-tune would pick the model.pt it serves on empty labels"
        )
    else:
        relabel = _mirrored if problem == "another orientation" else lambda data, affine: (data * 255, affine)
        train = _relabelled(cases[1:2], tmp_path / "labels", relabel) + cases[2:]
        validate = cases[:1]
        expected = "affine differs from" if problem == "another orientation" else "label values must be 0 or 1"
    with pytest.raises(Exception) as raised:
        _monailabel_fine_tune(served, train, validate)
    message = error_chain(raised.value)
    assert expected in message
    if problem not in ("no labels", "no lesion", "no lesion to validate on"):
        assert f"{tmp_path / 'labels' / 'label_0.nii.gz'}: " in message
    assert weights.read_bytes() == shipped
    assert sorted(path.name for path in weights.parent.iterdir()) == ["model.pt", "model.ts", TRAINING_RECORD]
    assert (weights.parent / TRAINING_RECORD).read_bytes() == (BUNDLE / "models" / TRAINING_RECORD).read_bytes()


def _event_files(folder):
    return sorted(path.name for path in folder.glob("events.out.tfevents.*"))


def test_whole_slices_of_cases_of_different_in_plane_sizes_train(tiny_phantom_dataset, tmp_path):
    """``--patch_size [-1, -1]`` on training cases of different in-plane sizes stopped the first epoch in the
    DataLoader's collate, naming no file; batches are padded to their largest slice (MONAI's pad_list_data_collate)."""
    dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "dataset")
    training = [entry for entry in fold_datalist(dataset, 0, "train")]
    for entry, (height, width) in zip(training, [(64, 64), (64, 48), (48, 64), (48, 48)]):  # each batch mixes sizes
        for key in ("image", "label"):
            image = nib.load(entry[key])
            nib.save(image.slicer[:height, :width], entry[key])
    workflow = _workflow(dataset, patch_size=[-1, -1], epochs=1, ckpt_dir=str(tmp_path / "models"),
                         output_dir=str(tmp_path / "logs"))
    workflow.run()
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 1
    assert (tmp_path / "models" / "model.pt").is_file()


def test_a_new_run_into_a_used_ckpt_dir_is_refused_unless_asked_to_overwrite(tiny_phantom_dataset, tmp_path):
    """A second run with the same ckpt_dir, neither resuming nor told --overwrite True, keeps the first run's files;
    told --overwrite True, it replaces them, the first run's later periodic checkpoints and TensorBoard logs
    included."""
    ckpt_dir, logs = tmp_path / "models", tmp_path / "logs"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=2).run()
    first_run = {path.name: path.read_bytes() for path in ckpt_dir.iterdir()}
    assert set(first_run) == {"model.pt", "latest_checkpoint_epoch=1.pt", "latest_checkpoint_epoch=2.pt",
                              TRAINING_RECORD}  # fmt: skip
    first_logs = _event_files(logs)
    assert first_logs

    second = _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=1, seed=7)
    with pytest.raises(Exception) as raised:
        second.run()
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    assert f"config id 'ckpt_dir': '{ckpt_dir}' holds checkpoints of an earlier run" in message
    assert "(latest_checkpoint_epoch=1.pt, latest_checkpoint_epoch=2.pt, model.pt)" in message
    assert f"--resume_ckpt '{ckpt_dir / 'latest_checkpoint_epoch=2.pt'}'" in message and "--overwrite True" in message
    assert {path.name: path.read_bytes() for path in ckpt_dir.iterdir()} == first_run
    assert _event_files(logs) == first_logs

    replacing = _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=1, seed=7,
                          overwrite=True)  # fmt: skip
    replacing.run()
    assert sorted(path.name for path in ckpt_dir.iterdir()) == [
        "latest_checkpoint_epoch=1.pt", "model.pt", TRAINING_RECORD
    ]  # fmt: skip
    assert (ckpt_dir / "model.pt").read_bytes() != first_run["model.pt"]
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "latest_checkpoint_epoch=1.pt"
    replacing_logs = _event_files(logs)
    assert replacing_logs and not set(replacing_logs) & set(first_logs)  # TensorBoard shows the new run only


def _run_stopped_in_first_iteration(workflow):
    """Run ``workflow`` and stop it as Ctrl-C would, in its first iteration: before any validation or checkpoint."""

    def stop(engine):
        raise KeyboardInterrupt("stopped in the first iteration")

    workflow.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED(once=1), stop)
    with pytest.raises(KeyboardInterrupt):
        workflow.run()


def test_a_replacing_run_of_other_settings_leaves_no_earlier_model_under_its_record(tiny_phantom_dataset, tmp_path):
    """``--overwrite True`` with other input settings wrote this run's record at its start while the replaced run's
    model.pt stayed until the first validation: a run stopped before it left weights of ``--adjacent_slices 0``
    recorded as ``1`` (loaded as this run's, unchecked). That model.pt is removed at the start; a replacing run with
    the same settings, fold and dataset, as each MONAI Label fine-tune of its served copy, keeps it."""
    ckpt_dir, logs = tmp_path / "models", tmp_path / "logs"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=1).run()
    first_model = (ckpt_dir / "model.pt").read_bytes()

    def stopped_before_validation(**override):
        _run_stopped_in_first_iteration(_workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs),
                                                  overwrite=True, **override))  # fmt: skip
        return json.loads((ckpt_dir / TRAINING_RECORD).read_text())

    assert stopped_before_validation()["adjacent_slices"] == 0
    assert (ckpt_dir / "model.pt").read_bytes() == first_model  # the record describes it as it did
    assert stopped_before_validation(adjacent_slices=1)["adjacent_slices"] == 1
    assert not (ckpt_dir / "model.pt").exists()


def test_a_replacing_run_leaves_no_unrecorded_model_under_its_record(tiny_phantom_dataset, tmp_path):
    """A ``model.pt`` without a record (runs up to 0.3.11, a ``model.pt`` copied alone) replaced with
    ``--overwrite True`` by a run on a dataset stayed until that run's first validation: a run stopped before it left
    those weights under a record naming this run's fold and dataset.json. It is removed at the start (a served
    MONAI Label copy without a record, whose fine-tunes name no dataset, keeps it:
    ``test_monailabel_fine_tune_updates_the_served_weights``). So is one recorded by a served copy's fine-tune of
    0.3.12, which names no dataset (it was kept)."""
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    shutil.copyfile(BUNDLE / "models" / "model.pt", ckpt_dir / "model.pt")
    _run_stopped_in_first_iteration(_workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir),
                                              output_dir=str(tmp_path / "logs"), overwrite=True))  # fmt: skip
    assert json.loads((ckpt_dir / TRAINING_RECORD).read_text())["dataset_json_sha256"] is not None
    assert not (ckpt_dir / "model.pt").exists()
    shutil.copyfile(BUNDLE / "models" / "model.pt", ckpt_dir / "model.pt")
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
    (ckpt_dir / TRAINING_RECORD).write_text(json.dumps({**settings, "fold": 0, "dataset_json": None,
                                                        "dataset_json_sha256": None, "trained_images": None}))
    write_training_record(ckpt_dir, settings, 0, tiny_phantom_dataset)
    assert not (ckpt_dir / "model.pt").exists()


def test_a_run_into_the_shipped_models_folder_replaces_the_weights_and_their_record(tiny_phantom_dataset, tmp_path):
    """``--ckpt_dir models --overwrite True`` from the bundle root (README): the shipped weights and their record (the
    benchmark's training phantom) give way to this run's; stopped before its first validation, the run leaves its
    record and no model.pt (the shipped weights would sit under it). Without ``--overwrite True`` it is refused."""
    models = shutil.copytree(BUNDLE / "models", tmp_path / "bundle_models")
    with pytest.raises(Exception) as refused:
        _workflow(tiny_phantom_dataset, ckpt_dir=str(models), output_dir=str(tmp_path / "logs")).run()
    assert "--overwrite True" in error_chain(refused.value)
    assert read_record(models / "model.pt") == read_record(BUNDLE / "models" / "model.pt")
    _run_stopped_in_first_iteration(_workflow(tiny_phantom_dataset, ckpt_dir=str(models),
                                              output_dir=str(tmp_path / "logs"), overwrite=True))  # fmt: skip
    record = json.loads((models / TRAINING_RECORD).read_text())
    assert record["dataset_json"] == str(tiny_phantom_dataset / "dataset.json")
    trained = fold_datalist(tiny_phantom_dataset, 0, "train")
    assert record["trained_images"].keys() == {case["image"] for case in trained}
    assert not (models / "model.pt").exists()


def test_a_new_run_into_used_logs_is_refused(tiny_phantom_dataset, tmp_path):
    """A run with a new ckpt_dir but the output_dir of an earlier run would draw its curves over that run's in
    TensorBoard: refused before it logs or writes anything, naming the id, the folder and how many event files (up to
    0.3.15 its ckpt_dir was made first, holding its training_inputs.json)."""
    logs = tmp_path / "logs"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path / "first"), output_dir=str(logs), epochs=1).run()
    first_logs = _event_files(logs)
    with pytest.raises(Exception) as raised:
        _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path / "second"), output_dir=str(logs), epochs=1).run()
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    earlier = f"({len(first_logs)} events.out.tfevents.* files)"
    assert f"config id 'output_dir': '{logs}' holds TensorBoard logs of an earlier run {earlier}" in message
    assert "--overwrite True" in message and "--output_dir" in message
    assert _event_files(logs) == first_logs
    assert not (tmp_path / "second").exists()


def test_a_resumed_run_keeps_the_newest_periodic_checkpoints_of_both_runs(tiny_phantom_dataset, tmp_path):
    """n_saved (2) counts the resumed run's periodic checkpoints with its own: after 3 + 2 epochs, epochs 4 and 5.
    The TensorBoard logs of both runs stay: the resumed run's curves go on from the first run's."""
    logs = tmp_path / "logs"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(logs), epochs=3).run()
    assert latest_checkpoint(tmp_path).name == "latest_checkpoint_epoch=3.pt"
    first_logs = _event_files(logs)
    _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(logs), epochs=5,
              resume_ckpt=str(latest_checkpoint(tmp_path))).run()  # fmt: skip
    assert sorted(path.name for path in tmp_path.glob("*.pt")) == [
        "latest_checkpoint_epoch=4.pt", "latest_checkpoint_epoch=5.pt", "model.pt"
    ]  # fmt: skip
    assert set(first_logs) < set(_event_files(logs))


def test_a_run_resumed_from_a_checkpoint_of_another_folder_is_refused(tiny_phantom_dataset, tmp_path):
    """It would restore that run's best Dice, which its own validations need not beat: its ckpt_dir could end
    without a model.pt. Refused before training, naming the id, both folders and the --ckpt_dir to use."""
    _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path / "first"), output_dir=str(tmp_path / "logs"), epochs=1).run()
    elsewhere = tmp_path / "copied" / "start.pt"
    elsewhere.parent.mkdir()
    shutil.copyfile(latest_checkpoint(tmp_path / "first"), elsewhere)
    second = tmp_path / "second"
    with pytest.raises(Exception) as raised:
        _workflow(tiny_phantom_dataset, ckpt_dir=str(second), output_dir=str(second / "logs"), epochs=2,
                  resume_ckpt=str(elsewhere)).run()  # fmt: skip
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    assert f"config id 'resume_ckpt': '{elsewhere}' is not in ckpt_dir '{second}'" in message
    assert f"add --ckpt_dir '{elsewhere.parent}'" in message
    assert not second.exists()


def test_a_run_resumed_in_the_folder_of_another_fold_dataset_or_input_settings_is_refused(tiny_phantom_dataset,
                                                                                          tmp_path):
    """``--fold 1 --ckpt_dir runs/f0 --resume_ckpt runs/f0/<periodic checkpoint>`` restored fold 0's best Dice and
    trained fold 1 on from fold 0's weights, replacing fold 0's model.pt, without a word; so did another dataset,
    and other input settings of the same channel count. The record training writes beside its checkpoints refuses
    each before the dataset is cached, naming the checkpoint, the record, both values and the override; the folder
    is left as it was. The dataset is compared by the part of dataset.json that decides training (its training
    cases, folds, labels, modality): a dataset.json changed only in its testing list and description was refused
    too, and is resumed; a record without that part's hash (up to 0.3.15) compares the whole file."""
    ckpt_dir = tmp_path / "f0"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "logs"), epochs=1).run()
    record = json.loads((ckpt_dir / TRAINING_RECORD).read_text())
    assert record == {
        "contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None, "fold": 0,
        "dataset_json": str(tiny_phantom_dataset / "dataset.json"),
        "dataset_json_sha256": hashlib.sha256((tiny_phantom_dataset / "dataset.json").read_bytes()).hexdigest(),
        "scored_dataset_sha256": scored_dataset_sha256(load_dataset_json(tiny_phantom_dataset)),
        "trained_images": {e["image"]: e[IMAGE_DIGEST] for e in fold_datalist(tiny_phantom_dataset, 0, "train")},
        "loss": {"loss#_target_": "custom.losses.WeightedCEGeneralizedDiceLoss", "loss#gdl_batch": True,
                 **{f"loss#{name}": parameter.default for name, parameter in
                    inspect.signature(WeightedCEGeneralizedDiceLoss).parameters.items() if name != "gdl_batch"}},
    }  # fmt: skip
    before = {path.name: path.read_bytes() for path in ckpt_dir.iterdir() if path.is_file()}
    checkpoint = latest_checkpoint(ckpt_dir)
    other_dataset = shutil.copytree(tiny_phantom_dataset, tmp_path / "other")
    _edit_dataset_json(other_dataset, lambda contents: contents["labels"].update({"2": "other"}))
    scored = "training cases, folds and labels of SHA-256"
    attempts = {
        "fold": ({"fold": 1}, "fold: trained with 0, this run 1 (--fold 0)"),
        "dataset": ({"dataset_dir": other_dataset},
                    f"dataset: trained on '{tiny_phantom_dataset / 'dataset.json'}' ({scored} "
                    f"{record['scored_dataset_sha256'][:12]}...), this run's dataset.json has {scored} "
                    f"{scored_dataset_sha256(load_dataset_json(other_dataset))[:12]}... "
                    f"(--dataset_dir '{tiny_phantom_dataset}')"),
        "input settings": ({"adjacent_slices": 1}, "adjacent_slices: trained with 0, this run 1 (--adjacent_slices 0)"),
        "spacing": ({"spacing_mm": 0.9}, "spacing_mm: trained with None, this run 0.9 (--spacing_mm None)"),
    }  # fmt: skip
    for name, (override, expected) in attempts.items():
        dataset_dir = override.pop("dataset_dir", tiny_phantom_dataset)
        with pytest.raises(Exception) as raised:
            _workflow(dataset_dir, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "logs"), epochs=2,
                      resume_ckpt=str(checkpoint), **override).run()  # fmt: skip
        message = error_chain(raised.value)
        assert f"checkpoint '{checkpoint}' was trained with other settings than this run's (recorded in " \
               f"'{ckpt_dir / TRAINING_RECORD}') and is not resumed" in message, name
        assert expected in message, name
        assert "train with this run's settings into another --ckpt_dir, without --resume_ckpt" in message, name
        assert {path.name: path.read_bytes() for path in ckpt_dir.iterdir() if path.is_file()} == before, name

    testing_changed = shutil.copytree(tiny_phantom_dataset, tmp_path / "testing_changed")
    _edit_dataset_json(testing_changed, lambda contents: contents.update(
        testing=contents["testing"][:1], numTest=1, description="testing list cut to one case"))
    earlier = {key: value for key, value in record.items() if key != "scored_dataset_sha256"}  # as up to 0.3.15
    (ckpt_dir / TRAINING_RECORD).write_text(json.dumps(earlier))
    with pytest.raises(Exception) as raised:
        _workflow(testing_changed, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "logs"), epochs=2,
                  resume_ckpt=str(checkpoint)).run()  # fmt: skip
    message = error_chain(raised.value)
    assert f"dataset: trained on '{tiny_phantom_dataset / 'dataset.json'}' (SHA-256 " \
           f"{record['dataset_json_sha256'][:12]}...), this run's dataset.json has SHA-256 " in message
    (ckpt_dir / TRAINING_RECORD).write_text(json.dumps(record))
    workflow = _workflow(testing_changed, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "logs"), epochs=2,
                         resume_ckpt=str(checkpoint))  # fmt: skip
    workflow.run()
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2


def _edit_dataset_json(dataset: Path, change) -> None:
    contents = json.loads((dataset / "dataset.json").read_text())
    change(contents)
    (dataset / "dataset.json").write_text(json.dumps(contents, indent=2))


_TRAINED = {"contralateral_channels": None, "adjacent_slices": 0, "fold": 0, "dataset_json": "/data/dataset.json",
            "dataset_json_sha256": "a" * 64, "scored_dataset_sha256": "b" * 64, "loss": {"loss#lambda_gdl": 1.0}}
_RESUMING = {key: _TRAINED[key] for key in ("contralateral_channels", "adjacent_slices", "fold", "dataset_json_sha256",
                                            "scored_dataset_sha256", "loss")}  # write_training_record's comparison
_SERVED = {**_TRAINED, "dataset_json": None, "dataset_json_sha256": None, "scored_dataset_sha256": None}
_UP_TO_0_3_15 = {key: value for key, value in _TRAINED.items() if key not in ("scored_dataset_sha256", "loss")}
_WHOLE_FILE = ("dataset: trained on '/data/dataset.json' (SHA-256 aaaaaaaaaaaa...), this run's dataset.json has "
               "SHA-256 cccccccccccc... (--dataset_dir '/data')")
_SCORED_PART = ("dataset: trained on '/data/dataset.json' (training cases, folds and labels of SHA-256 "
                "bbbbbbbbbbbb...), this run's dataset.json has training cases, folds and labels of SHA-256 "
                "dddddddddddd... (--dataset_dir '/data')")


@pytest.mark.parametrize("record, settings, lines", [
    (_TRAINED, _RESUMING, []),
    # a record of MONAI Label's served copy (no dataset.json) names no dataset to compare
    (_SERVED, {**_RESUMING, "dataset_json_sha256": "c" * 64, "scored_dataset_sha256": "d" * 64}, []),
    # up to 0.3.15: no scored part, the whole dataset.json compared; no loss, the loss not compared
    (_UP_TO_0_3_15, {**_RESUMING, "scored_dataset_sha256": "d" * 64, "loss": {"loss#lambda_gdl": 0}}, []),
    (_UP_TO_0_3_15, {**_RESUMING, "dataset_json_sha256": "c" * 64},
     [_WHOLE_FILE]),
    # the scored part compared in place of the whole file: a testing-list change accepted, a training change refused
    (_TRAINED, {**_RESUMING, "dataset_json_sha256": "c" * 64}, []),
    (_TRAINED, {**_RESUMING, "dataset_json_sha256": "c" * 64, "scored_dataset_sha256": "d" * 64}, [_SCORED_PART]),
    # a comparison without the scored part compares the whole file, even where the record holds its hash
    ({**_TRAINED, "scored_dataset_sha256": "d" * 64}, {key: value for key, value in _RESUMING.items()
                                                       if key != "scored_dataset_sha256"}, []),
    (_TRAINED, {key: value for key, value in _RESUMING.items() if key != "scored_dataset_sha256"} | {
        "dataset_json_sha256": "c" * 64}, [_WHOLE_FILE]),
    # a run that recorded a dataset resumed by one without dataset.json: compared
    (_TRAINED, {**_RESUMING, "dataset_json_sha256": None, "scored_dataset_sha256": None},
     ["dataset: trained on '/data/dataset.json' (training cases, folds and labels of SHA-256 bbbbbbbbbbbb...), this "
      "run's dataset.json has training cases, folds and labels of SHA-256 None... (--dataset_dir '/data')"]),
    # a loss compared only where both sides name one
    ({**_TRAINED, "loss": None}, {**_RESUMING, "loss": {"loss#lambda_gdl": 0}}, []),
    (_TRAINED, {**_RESUMING, "loss": None}, []),
    (_TRAINED, {**_RESUMING, "loss": {"loss#lambda_gdl": 0, "loss#gdl_batch": False}},
     ["loss#gdl_batch: not set in training, this run False (leave --loss#gdl_batch out)",
      "loss#lambda_gdl: trained with 1.0, this run 0 (--loss#lambda_gdl 1.0)"]),
    # every difference, in the order of the settings; the input settings alone (as a loading run compares them)
    (_TRAINED, {**_RESUMING, "adjacent_slices": 1, "fold": 2, "scored_dataset_sha256": "d" * 64},
     ["adjacent_slices: trained with 0, this run 1 (--adjacent_slices 0)",
      "fold: trained with 0, this run 2 (--fold 0)", _SCORED_PART]),
    (_SERVED, {"contralateral_channels": "mirror", "adjacent_slices": 0},
     ["contralateral_channels: trained with None, this run 'mirror' (--contralateral_channels None)"]),
])  # fmt: skip
def test_a_record_is_compared_on_what_it_and_the_run_both_name(tmp_path, record, settings, lines):
    """``check_record``'s comparison, case by case (the resume tests above run them through train.json): a record
    without dataset.json (MONAI Label's served copy) or without a loss, and a run without a loss, are not compared on
    them; a record of 0.3.15 or earlier is compared by the whole dataset.json, a later one by its scored part only."""
    checkpoint = tmp_path / "model.pt"
    (tmp_path / TRAINING_RECORD).write_text(json.dumps(record))
    if not lines:
        check_record(checkpoint, settings, action="resumed")
        return
    with pytest.raises(ValueError) as raised:
        check_record(checkpoint, settings, action="resumed", otherwise="\nor not")
    assert str(raised.value) == (
        f"checkpoint '{checkpoint}' was trained with other settings than this run's (recorded in "
        f"'{tmp_path / TRAINING_RECORD}') and is not resumed; pass the overrides in brackets:\n  "
        + "\n  ".join(lines) + "\nor not"
    )


def test_a_run_resumed_with_another_loss_is_refused_naming_each_id(tiny_phantom_dataset, tmp_path):
    """``--resume_ckpt`` with other loss switches or numbers (``--loss#gdl_batch False``, ``--loss#lambda_gdl 0``)
    trained on from the checkpoint with another objective without a word. The record names the loss's config ids,
    with the defaults of its signature filled in: refused before the dataset is cached, naming each differing id with
    both values and the override; the folder is left as it was. An argument set to its default (``--loss#lambda_gdl
    1.0``) equals one left out (it was refused as "not set in training"). A record written before the loss was
    recorded (up to 0.3.15) resumes as before."""
    ckpt_dir, logs = tmp_path / "run", tmp_path / "logs"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=1).run()
    before = {path.name: path.read_bytes() for path in ckpt_dir.iterdir() if path.is_file()}
    checkpoint = latest_checkpoint(ckpt_dir)
    with pytest.raises(Exception) as raised:
        _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=2,
                  resume_ckpt=str(checkpoint), **{"loss#gdl_batch": False, "loss#lambda_gdl": 0}).run()  # fmt: skip
    message = error_chain(raised.value)
    assert f"checkpoint '{checkpoint}' was trained with other settings than this run's (recorded in " \
           f"'{ckpt_dir / TRAINING_RECORD}') and is not resumed" in message
    assert "loss#gdl_batch: trained with True, this run False (--loss#gdl_batch True)" in message
    assert "loss#lambda_gdl: trained with 1.0, this run 0 (--loss#lambda_gdl 1.0)" in message
    assert {path.name: path.read_bytes() for path in ckpt_dir.iterdir() if path.is_file()} == before

    # an argument set to its default equals one left out (it was refused as "not set in training")
    workflow = _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=2,
                         resume_ckpt=str(checkpoint), **{"loss#lambda_gdl": 1.0})  # fmt: skip
    workflow.run()
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 2

    record = json.loads((ckpt_dir / TRAINING_RECORD).read_text())
    del record["loss"]  # as written up to 0.3.15
    (ckpt_dir / TRAINING_RECORD).write_text(json.dumps(record))
    workflow = _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(logs), epochs=3,
                         resume_ckpt=str(latest_checkpoint(ckpt_dir)), **{"loss#lambda_gdl": 0})  # fmt: skip
    workflow.run()
    assert workflow.parser.get_parsed_content("train#trainer").state.epoch == 3
    assert read_record(ckpt_dir / "model.pt")["loss"]["loss#lambda_gdl"] == 0


def test_a_checkpoint_is_not_evaluated_on_its_training_images_in_another_conversion(tiny_phantom_dataset, tmp_path):
    """The held-out check compared dataset.json's SHA-256 only: once the dataset was converted again (``--folds``,
    ``--seed``, ``--patients`` added later, as docs/data.md advises), fold 0's model of the first conversion was
    evaluated on the cases it was trained on, now in a fold of the second, without a word. The record names the
    voxels of each image it trained on: evaluation refuses exactly the folds holding one of them, before anything is
    written, naming how many and which; folds of only held-out images pass, and so does another phantom whose cases
    have the same names."""
    ckpt_dir = tmp_path / "fold0"
    _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "logs"), epochs=1).run()
    reconverted = prepare_isles2018(  # the same studies in 3 folds: fold 0 (case_2, case_3) held out, fold 1 not
        tiny_phantom_dataset.parent / "isles2018" / "TRAINING", tmp_path / "three_folds", folds=3,
        patients=tiny_phantom_dataset.parent / "isles2018" / "patients.csv",
    )  # fmt: skip
    other_phantom = write_phantom(tmp_path / "other_raw", cases=8, test_cases=0, seed=4, size=64)
    other = prepare_isles2018(Path(other_phantom) / "TRAINING", tmp_path / "other", folds=2)

    def evaluate(dataset_dir, fold):
        output_dir = tmp_path / f"eval_{Path(dataset_dir).name}_{fold}"
        workflow = bundle_workflow(
            ["train.json", "evaluate.json"], "train", dataset_dir=str(dataset_dir), fold=fold, num_workers=0,
            ckpt_path=str(ckpt_dir / "model.pt"), output_dir=str(output_dir),
        )  # fmt: skip
        workflow.initialize()
        workflow.run()
        return output_dir

    with pytest.raises(Exception) as raised:
        evaluate(reconverted, 1)
    message = error_chain(raised.value)
    assert f"checkpoint '{ckpt_dir / 'model.pt'}' was trained on 1 of the 3 images of config id 'fold' 1 of " \
           f"'{Path(reconverted) / 'dataset.json'}': case_4.nii.gz (same voxels; it was trained on every fold but 0 " \
           f"of '{tiny_phantom_dataset / 'dataset.json'}', recorded in '{ckpt_dir / TRAINING_RECORD}')" in message
    assert f"evaluate it on the dataset it was trained on (--dataset_dir '{tiny_phantom_dataset}' --fold 0)" in message
    assert not (tmp_path / "eval_three_folds_1").exists()
    assert (evaluate(reconverted, 0) / "metrics.csv").is_file()
    assert (evaluate(other, 1) / "metrics.csv").is_file()  # case_4 .. of another phantom: not what it learnt


def test_resume_keeps_the_best_metric(tiny_phantom_dataset, tmp_path):
    """After --resume_ckpt a validation worse than the recorded best must not replace model.pt."""
    first = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "logs"), epochs=2,
                      val_interval=1)  # fmt: skip
    first.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate()
    )
    first.run()
    checkpoint_path = latest_checkpoint(tmp_path)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["best_metric"]["best_metric_epoch"] == 1
    # Record an unbeatable best so that the resumed validation is certainly worse.
    checkpoint["best_metric"]["best_metric"] = 1.0
    checkpoint["best_metric"]["best_model_saver"]["_saved"] = [(1.0, "model.pt")]
    torch.save(checkpoint, checkpoint_path)
    best_model = (tmp_path / "model.pt").read_bytes()

    resumed = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "logs"), epochs=2,
                        val_interval=1, resume_ckpt=str(checkpoint_path))  # fmt: skip
    resumed.run()
    validator = resumed.parser.get_parsed_content("validate#evaluator")
    assert validator.state.epoch == 2  # the resumed run did validate
    assert (validator.state.best_metric, validator.state.best_metric_epoch) == (1.0, 1)
    assert (tmp_path / "model.pt").read_bytes() == best_model


def test_resume_with_more_epochs_follows_the_configured_schedule_to_its_end(tiny_phantom_dataset, tmp_path):
    """A finished 2-epoch run resumed with --epochs 4 ends with its warm-up/cosine schedule finished at epoch 4.

    The checkpoint's scheduler state holds the 2-epoch length; followed past its end, MONAI's cosine climbs
    back to the peak learning rate. The same happens to a run fitted by time_budget_s and resumed without it."""
    first = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "logs"), epochs=2)
    first.run()
    peak = first.parser.get_parsed_content("learning_rate")

    resumed = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "logs"), epochs=4,
                        resume_ckpt=str(latest_checkpoint(tmp_path)))  # fmt: skip
    optimizer = resumed.parser.get_parsed_content("optimizer")
    learning_rates = {}

    def record_learning_rate(engine):
        learning_rates[engine.state.epoch] = optimizer.param_groups[0]["lr"]

    def record_first_step_learning_rate(engine):
        learning_rates.setdefault("first step", optimizer.param_groups[0]["lr"])

    trainer = resumed.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED, record_learning_rate)
    trainer.add_event_handler(Events.ITERATION_STARTED, record_first_step_learning_rate)
    resumed.run()
    schedule = resumed.parser.get_parsed_content("lr_scheduler")
    # the first resumed step runs at the configured schedule's rate, not the finished run's last one (0)
    first_step_rate = learning_rates.pop("first step")
    assert first_step_rate == pytest.approx(peak * schedule.lr_lambda(2 * trainer.state.epoch_length))
    assert first_step_rate > 0.1 * peak
    assert list(learning_rates) == [3, 4]
    assert schedule.t_total == 4 * trainer.state.epoch_length
    assert learning_rates[3] > learning_rates[4]
    assert learning_rates[4] < 0.05 * peak


def _training_state(workflow):
    """Epoch, iteration, learning rate, optimizer moments and best-metric record of a training workflow."""
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    validator = workflow.parser.get_parsed_content("validate#evaluator")
    return {
        "epoch": trainer.state.epoch,
        "iteration": trainer.state.iteration,
        "lr": optimizer.param_groups[0]["lr"],
        "exp_avg": [s["exp_avg"].clone() for s in optimizer.state.values()],
        "best": (validator.state.best_metric, validator.state.best_metric_epoch),
    }


@pytest.mark.integration
def test_kill_9_then_resume_continues_with_the_same_state(tiny_phantom_dataset, tmp_path):
    """Training killed with SIGKILL resumes from its last completed epoch with the uninterrupted run's state."""
    epochs = 4
    settings = {"epochs": epochs, "val_interval": 1}
    uninterrupted = _workflow(tiny_phantom_dataset, ckpt_dir=str(tmp_path / "full"), output_dir=str(tmp_path / "l1"),
                              **settings)  # fmt: skip
    per_epoch = {}
    uninterrupted.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_COMPLETED, lambda engine: per_epoch.update({engine.state.epoch: _training_state(uninterrupted)})
    )
    uninterrupted.run()

    ckpt_dir = tmp_path / "killed"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json"),
               "--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_phantom_dataset), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(tmp_path / "l2"), *override_arguments({**TINY_TRAINING, **settings})]  # fmt: skip
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in training.stdout:  # CheckpointSaver logs this once the epoch's checkpoint is written
            if "Saved checkpoint at epoch: 2" in line:
                break
        else:
            pytest.fail("training ended before it was killed")
    finally:
        os.kill(training.pid, signal.SIGKILL)
        training.wait()
    resume = latest_checkpoint(ckpt_dir)
    completed = int(resume.stem.split("=")[1])
    assert completed == 2

    resumed = _workflow(tiny_phantom_dataset, ckpt_dir=str(ckpt_dir), output_dir=str(tmp_path / "l3"),
                        resume_ckpt=str(resume), **settings)  # fmt: skip
    at_start = {}  # after the checkpoint is loaded (at STARTED), before the first resumed iteration
    resumed.parser.get_parsed_content("train#trainer").add_event_handler(
        Events.EPOCH_STARTED, lambda engine: at_start or at_start.update(_training_state(resumed))
    )
    resumed.run()
    expected = per_epoch[completed]
    assert (at_start["epoch"] - 1, at_start["iteration"]) == (expected["epoch"], expected["iteration"])
    assert at_start["lr"] == pytest.approx(expected["lr"])
    assert at_start["best"] == pytest.approx(expected["best"])
    assert all(torch.allclose(a, b) for a, b in zip(at_start["exp_avg"], expected["exp_avg"]))
    final = _training_state(resumed)
    assert (final["epoch"], final["iteration"]) == (per_epoch[epochs]["epoch"], per_epoch[epochs]["iteration"])
    assert final["lr"] == pytest.approx(per_epoch[epochs]["lr"])


def test_only_rank_0_claims_the_log_dir(tmp_path, monkeypatch):
    """In a multi-GPU run every rank resolves the log folder, rank 0 alone logs: only rank 0 may refuse the run
    or remove files, the others wait for it (the barrier: test_bundle.py's
    test_multi_gpu_configs_run_distributed_on_cpu)."""
    events = tmp_path / "events.out.tfevents.1796596707.host.1.0"
    events.write_bytes(b"")
    monkeypatch.setattr(config_check.idist, "get_rank", lambda: 1)
    assert config_check.claim_log_dir(tmp_path, tmp_path / "models") == str(tmp_path)
    config_check.claim_log_dir(tmp_path, tmp_path / "models", overwrite=True)
    assert events.exists()
    monkeypatch.setattr(config_check.idist, "get_rank", lambda: 0)
    with pytest.raises(FileExistsError, match="config id 'output_dir'"):
        config_check.claim_log_dir(tmp_path, tmp_path / "models")
    config_check.claim_log_dir(tmp_path, tmp_path / "models", overwrite=True)
    assert not events.exists()
