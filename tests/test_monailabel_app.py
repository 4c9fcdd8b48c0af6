"""What MONAI Label reads from the bundle, and the app preparation that does not need the server."""

import asyncio
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import traceback
import types
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO, inference_network
from monai.bundle import ConfigParser

from custom.__main__ import main as command_line
from custom.monailabel_app import (
    REFUSAL_REPORTING_IMPORTS,
    REFUSAL_REPORTING_MODULE,
    check_served_bundle,
    plan_studies,
    prepare_monailabel_app,
    serve_weights,
    start_server_command,
    unpack_served_bundle,
    write_studies,
)
from custom.package import package_bundle
from custom.training_record import (
    FINE_TUNED_IMAGES,
    TRAINING_RECORD,
    check_held_out,
    read_record,
    write_training_record,
)


def test_metadata_says_what_monailabel_reads():
    """BundleInferTask takes the first input and output keys, the non-background channel_def labels and the
    dimension from the length of spatial_shape."""
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert "monailabel" in meta["supported_apps"]
    image_key, image = next(iter(meta["network_data_format"]["inputs"].items()))
    pred_key, pred = next(iter(meta["network_data_format"]["outputs"].items()))
    assert (image_key, pred_key) == ("image", "pred")
    assert len(image["spatial_shape"]) == 2
    assert {v.lower(): int(k) for k, v in pred["channel_def"].items() if v.lower() != "background"} == {"lesion": 1}


def test_served_copy_trains_into_its_models_folder(tmp_path):
    served = unpack_served_bundle(package_bundle(tmp_path / "ctp_stroke.zip"), tmp_path / "model")
    assert served == tmp_path / "model" / "ctp_stroke"
    config = json.loads((served / "configs" / "train.json").read_text())
    assert config["ckpt_dir"] == "$@bundle_root + '/models'"
    assert config["train"]["datalist"] == config["validate"]["datalist"] == []
    assert json.loads((CONFIGS / "train.json").read_text())["ckpt_dir"] != config["ckpt_dir"]
    assert (served / "custom" / "lifecycle.py").is_file() and (served / "models" / "model.pt").is_file()
    with pytest.raises(FileExistsError, match="ctp_stroke"):
        unpack_served_bundle(tmp_path / "ctp_stroke.zip", tmp_path / "model")


def test_an_archive_of_a_served_copy_leaves_out_monailabels_run_config(tmp_path, caplog):
    """MONAI Label's multi-GPU fine-tune writes configs/monailabel_train.json into the served copy (train.json with its
    overrides: the server's absolute study paths), and `python -m custom package` of the copy packed it with the
    bundle's configs. The archive leaves it out, saying so; the archive is served again as the first was."""
    served = unpack_served_bundle(package_bundle(tmp_path / "ctp_stroke.zip"), tmp_path / "model")
    run_config = served / "configs" / "monailabel_train.json"
    run_config.write_text(json.dumps({"train": {"dataset": {"data": [{"image": "/srv/studies/case_1.nii.gz"}]}}}))
    archive = package_bundle(tmp_path / "fine_tuned" / "ctp_stroke.zip", bundle_root=served)
    names = zipfile.ZipFile(archive).namelist()
    assert "ctp_stroke/configs/train.json" in names and "ctp_stroke/configs/monailabel_train.json" not in names
    assert f"leaving '{run_config}' out of the archive: MONAI Label's config of the served copy's last multi-GPU " \
           "fine-tune" in caplog.text
    check_served_bundle(unpack_served_bundle(archive, tmp_path / "handed_on"))


def test_served_copy_takes_the_input_settings_of_its_weights(tmp_path):
    """Weights trained with slice context and hemisphere differences (30 input channels) are served with both
    keys in the copy's train.json and inference.json; the shipped 5-channel weights do not fit those configs,
    and the check says so before a server starts: their training record, served with them, names both settings
    (weights copied without it are refused by the network's shape)."""
    archive = package_bundle(tmp_path / "ctp_stroke.zip")
    settings = {"contralateral_channels": "difference", "adjacent_slices": 1}
    served = unpack_served_bundle(archive, tmp_path / "model", settings)
    for name in ("train.json", "inference.json"):
        config = json.loads((served / "configs" / name).read_text())
        assert {key: config[key] for key in settings} == settings, name
    with pytest.raises(ValueError) as raised:
        check_served_bundle(served)
    assert f"(recorded in '{served / 'models' / TRAINING_RECORD}')" in str(raised.value)
    assert "contralateral_channels: trained with None, this run 'difference' (--contralateral_channels None)" in \
        str(raised.value)  # fmt: skip
    assert "adjacent_slices: trained with 0, this run 1 (--adjacent_slices 0)" in str(raised.value)
    (served / "models" / TRAINING_RECORD).unlink()
    with pytest.raises(ValueError, match="model.pt' does not fit model .*contralateral_channels or adjacent_slices"):
        check_served_bundle(served)

    trained = tmp_path / "thirty_channels.pt"
    torch.save({"model": inference_network(in_channels=30).state_dict()}, trained)
    (served / "models" / "model.onnx").write_bytes(b"an export an archive may carry")
    serve_weights(served, trained)
    assert (served / "models" / "model.pt").read_bytes() == trained.read_bytes()
    assert not (served / "models" / "model.ts").exists() and not (served / "models" / "model.onnx").exists()
    check_served_bundle(served)


def test_served_weights_of_other_recorded_input_settings_are_refused(tiny_phantom_dataset, tmp_path):
    """Weights trained with ``--contralateral_channels difference`` fit the 10-channel network of ``mirror``, and were
    served with it without a word. Their training record refuses it, naming the weights, the record and the setting;
    served with the recorded settings, the record goes with the weights into the served copy, and weights without a
    record leave none there (it would be another run's)."""
    run = tmp_path / "difference_run"
    run.mkdir()
    write_training_record(run, {"contralateral_channels": "difference", "adjacent_slices": 0, "spacing_mm": None}, 0,
                          tiny_phantom_dataset)  # fmt: skip
    trained = run / "model.pt"
    torch.save(inference_network(in_channels=10).state_dict(), trained)
    archive = package_bundle(tmp_path / "ctp_stroke.zip")
    mirror = unpack_served_bundle(archive, tmp_path / "mirror", {"contralateral_channels": "mirror"})
    serve_weights(mirror, trained)
    with pytest.raises(ValueError) as raised:
        check_served_bundle(mirror, trained)
    assert f"checkpoint '{trained}' was trained with other settings than this run's (recorded in " \
           f"'{run / TRAINING_RECORD}')" in str(raised.value)
    assert "contralateral_channels: trained with 'difference', this run 'mirror'" in str(raised.value)

    served = unpack_served_bundle(archive, tmp_path / "difference", {"contralateral_channels": "difference"})
    serve_weights(served, trained)
    check_served_bundle(served, trained)
    check_served_bundle(served)  # the served copy's own record
    assert (served / "models" / TRAINING_RECORD).read_bytes() == (run / TRAINING_RECORD).read_bytes()
    unrecorded = tmp_path / "unrecorded.pt"
    unrecorded.write_bytes(trained.read_bytes())
    serve_weights(served, unrecorded)
    assert not (served / "models" / TRAINING_RECORD).exists()


@pytest.mark.parametrize("first_record", ["digest lists", "one digest per study"])
def test_a_study_replaced_under_its_name_stays_known_to_the_fine_tuned_weights(tmp_path, first_record):
    """The served copy's record kept one digest per datastore path: after a study was re-uploaded under its name (a
    corrected version) and fine-tuned on again, the weights were evaluated on the first version without a word. Every
    version stays known, in records written with a single digest per study too."""
    served_models, study = tmp_path / "models", tmp_path / "studies" / "case_1.nii.gz"
    served_models.mkdir()
    (served_models / "model.pt").write_bytes(b"the served weights")
    study.parent.mkdir()
    first_upload = tmp_path / "first_upload.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(160, dtype=np.float32).reshape(4, 4, 2, 5), np.eye(4)), first_upload)
    shutil.copyfile(first_upload, study)
    settings = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}

    def fine_tune():
        write_training_record(served_models, settings, 0, tmp_path / "no_dataset",
                              fine_tuned_cases=[{"image": str(study), "label": "unread"}])  # fmt: skip

    fine_tune()
    if first_record == "one digest per study":
        record = json.loads((served_models / TRAINING_RECORD).read_text())
        record[FINE_TUNED_IMAGES] = {image: digests[0] for image, digests in record[FINE_TUNED_IMAGES].items()}
        (served_models / TRAINING_RECORD).write_text(json.dumps(record))
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2, 5), dtype=np.float32), np.eye(4)), study)  # the corrected study
    fine_tune()

    cases = [{"image": str(first_upload)}, {"image": str(study)}]
    with pytest.raises(ValueError) as raised:
        check_held_out(served_models / "model.pt", 0, tmp_path / "evaluated", cases)
    assert f"was trained on 2 of the 2 images of config id 'fold' 0 of '{tmp_path / 'evaluated' / 'dataset.json'}': " \
           f"first_upload.nii.gz (trained as '{study}'), case_1.nii.gz (same voxels; it was fine-tuned in MONAI " \
           "Label on 1 study" in str(raised.value)
    assert len(read_record(served_models / "model.pt")[FINE_TUNED_IMAGES][str(study)]) == 2  # both versions' digests


def test_served_copy_refuses_bad_input_settings(tmp_path):
    archive = package_bundle(tmp_path / "ctp_stroke.zip")
    with pytest.raises(ValueError, match=r"\['adjacent_slice'\] are not among"):
        unpack_served_bundle(archive, tmp_path / "model", {"adjacent_slice": 1})
    served = unpack_served_bundle(archive, tmp_path / "model", {"contralateral_channels": "mirrored"})
    with pytest.raises(ValueError, match="(?s)contralateral_channels='mirrored'.*mode must be one of .*got 'mirrored'"):
        check_served_bundle(served)


def test_studies_and_3d_views(tiny_phantom_dataset, tmp_path):
    ids = write_studies(plan_studies(tiny_phantom_dataset, tmp_path / "studies"))
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    assert len(ids) == len(dataset["training"]) + len(dataset["testing"])
    image = nib.load(tiny_phantom_dataset / dataset["testing"][0]["image"])
    study_id = dataset["testing"][0]["case"]
    assert (tmp_path / "studies" / f"{study_id}.nii.gz").read_bytes() == (
        tiny_phantom_dataset / dataset["testing"][0]["image"]
    ).read_bytes()
    tmax = nib.load(tmp_path / "studies_views" / f"{study_id}_tmax.nii.gz")
    assert tmax.shape == image.shape[:3] and np.allclose(tmax.affine, image.affine)
    assert np.array_equal(tmax.get_fdata(dtype=np.float32), np.asarray(image.dataobj, dtype=np.float32)[..., 4])
    with pytest.raises(FileExistsError, match="exists"):
        plan_studies(tiny_phantom_dataset, tmp_path / "studies")


def test_studies_refuse_an_existing_view_before_writing_anything(tiny_phantom_dataset, tmp_path):
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    views = tmp_path / "studies_views"
    views.mkdir()
    earlier = views / f"{dataset['testing'][0]['case']}_ct.nii.gz"
    earlier.write_bytes(b"a correction")
    with pytest.raises(FileExistsError, match=f"'{earlier}' exists"):
        plan_studies(tiny_phantom_dataset, tmp_path / "studies")
    assert earlier.read_bytes() == b"a correction"
    assert sorted(p.name for p in views.iterdir()) == [earlier.name]
    assert not (tmp_path / "studies").exists() or not any((tmp_path / "studies").iterdir())


def test_two_images_of_one_study_id_are_refused_naming_both(tiny_phantom_dataset, tmp_path):
    """A dataset whose testing image has the file name of a training image (imagesTr/case_1.nii.gz and
    imagesTs/case_1.nii.gz; ``check`` passed it up to 0.3.12) gave two studies 'case_1': the testing image was
    written over the training image, and the count printed both."""
    dataset_dir = tmp_path / "dataset"
    shutil.copytree(tiny_phantom_dataset, dataset_dir)
    dataset = json.loads((dataset_dir / "dataset.json").read_text())
    training_image = dataset["training"][0]["image"]
    testing_image = str(Path(dataset["testing"][0]["image"]).with_name(Path(training_image).name))
    shutil.copyfile(dataset_dir / dataset["testing"][0]["image"], dataset_dir / testing_image)
    dataset["testing"][0]["image"] = testing_image
    (dataset_dir / "dataset.json").write_text(json.dumps(dataset))
    study_id = Path(training_image).name.split(".nii")[0]
    with pytest.raises(ValueError, match=f"'{dataset_dir / training_image}' and '{dataset_dir / testing_image}': "
                                         f"both would be study '{study_id}'"):
        plan_studies(dataset_dir, tmp_path / "studies")


def fake_monailabel_venv(folder, imports="".join(REFUSAL_REPORTING_IMPORTS)):
    """A MONAI Label environment whose ``python -m monailabel.main apps --download ... --output DIR`` writes a sample
    app to ``DIR/monaibundle`` with only ``main.py``'s ``imports`` (default: 0.8.5's of MONAI Label's bundle tasks) and
    an empty ``lib/``: enough for ``prepare_monailabel_app`` without the 8 GB environment."""
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "monailabel").touch()
    python = folder / "bin" / "python"
    python.write_text(f'#!/bin/sh\nfor last; do :; done\nmkdir -p "$last/monaibundle/lib"\n'
                      f'printf "{imports}" > "$last/monaibundle/main.py"\n')
    python.chmod(0o755)
    return folder


def test_refused_studies_leave_no_app_folder(tiny_phantom_dataset, tmp_path):
    """`monailabel-app` moved the app folder into place before it checked the studies: a dataset_dir typo or a study
    file of an earlier preparation was refused after the app folder was written, and the corrected rerun was then
    refused for that app folder ("exists; name a new one")."""
    venv, app, studies = fake_monailabel_venv(tmp_path / "venv"), tmp_path / "app", tmp_path / "studies"
    with pytest.raises(FileNotFoundError, match="dataset_dir .*typo' does not exist"):
        prepare_monailabel_app(app, studies=studies, dataset_dir=tmp_path / "typo", venv=venv)
    assert not app.exists()
    studies.mkdir()
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    earlier = studies / Path(dataset["testing"][0]["image"]).name
    earlier.write_bytes(b"an earlier study")
    with pytest.raises(FileExistsError, match=f"'{earlier}' exists"):
        prepare_monailabel_app(app, studies=studies, dataset_dir=tiny_phantom_dataset, venv=venv)
    assert not app.exists() and earlier.read_bytes() == b"an earlier study"

    earlier.unlink()
    prepare_monailabel_app(app, studies=studies, dataset_dir=tiny_phantom_dataset, venv=venv)
    assert (app / "model" / "ctp_stroke" / "models" / "model.pt").is_file() and earlier.is_file()


def test_a_main_py_of_another_monailabel_is_refused_in_one_line_leaving_nothing(tmp_path):
    """A sample app whose main.py imports MONAI Label's tasks otherwise than 0.8.5's (the two lines cannot be swapped)
    was refused with a RuntimeError, a traceback through ``python -m custom monailabel-app``: it is a one-line refusal
    naming main.py, the environment and the lines expected, and the command leaves no app, studies or scratch
    folder."""
    other = "from monailabel.tasks.infer.bundle import BundleInferTask, BundleTrainTask\n"
    venv = fake_monailabel_venv(tmp_path / "venv", imports=other)
    with pytest.raises(SystemExit) as refused:
        command_line(["monailabel-app", str(tmp_path / "app"), "--venv", str(venv), "--studies", str(tmp_path / "s")])
    expected = [line.strip() for line in REFUSAL_REPORTING_IMPORTS]
    assert refused.value.code.startswith(
        f"python -m custom monailabel-app: error: the monaibundle sample app of the MONAI Label environment '{venv}' "
        f"is not MONAI Label 0.8.5's: its main.py does not hold each of the lines {expected} once"
    ), refused.value.code
    assert sorted(path.name for path in tmp_path.iterdir()) == ["venv"]


def test_start_line_is_offline_and_loopback(tmp_path):
    command = start_server_command(tmp_path / "app", tmp_path / "studies", tmp_path / "venv", port=8123)
    line = " ".join(command)
    assert "--host 127.0.0.1 --port 8123" in line
    for conf in ("models ctp_stroke", "sam2 false", "zoo_source github"):
        assert f"--conf {conf}" in line


def test_filelock_is_declared_for_the_environments_that_run_the_app_tasks():
    """The app's training task locks with filelock's ``FileLock(..., blocking=False)``, which filelock 3.13.4 refuses
    (``TypeError``; 3.14.0 added it) and no install list named: it came through torch's ``filelock`` and MONAI Label
    0.8.5's ``filelock>=3.11.0``. The label extra, the test extra (this file runs the task) and .ci/monailabel_env,
    which builds the server's environment, declare it."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    for extra in ("label", "test"):
        assert "filelock>=3.14" in setup["options.extras_require"][extra].split(), extra
    assert '"filelock>=3.14"' in (REPO / ".ci" / "monailabel_env").read_text()


def _refusal_reporting_tasks(app, monkeypatch, infer, train):
    """The prepared app's ``lib/refusal_reporting.py``, imported with ``infer`` and ``train`` (stand-ins for MONAI
    Label's ``BundleInferTask`` and ``BundleTrainTask``, which the project's environment does not have) as its bases."""
    modules = ("monailabel", "monailabel.tasks", "monailabel.tasks.infer", "monailabel.tasks.infer.bundle",
               "monailabel.tasks.train", "monailabel.tasks.train.bundle")  # fmt: skip
    for name in modules:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["monailabel.tasks.infer.bundle"].BundleInferTask = infer
    sys.modules["monailabel.tasks.train.bundle"].BundleTrainTask = train
    spec = importlib.util.spec_from_file_location("refusal_reporting", app / REFUSAL_REPORTING_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _project_modules() -> set[str]:
    return {name for name in sys.modules if name.split(".")[0] == "custom"}


@pytest.fixture
def served_tasks(tmp_path, monkeypatch):
    """The tasks of an app ``monailabel-app`` prepared (with a fake MONAI Label environment), over stand-ins that run
    what MONAI Label runs: the served copy's inference preprocessing transform by transform (``run_transforms``, no
    Compose), then ``network`` (a MONAI transform standing in for the network: ``image`` unchanged unless a test sets
    it), and the served train.json's screening of the studies MONAI Label gives it (none here) unless ``fail`` is set.
    As in MONAI Label's server, ``custom`` is the served bundle's copy (imported from the bundle folder), not the
    project's; the project's modules are put back after the test. The real server:
    ``integration/test_monailabel.py``."""
    from monai.transforms import Lambdad, apply_transform

    app = tmp_path / "app"
    prepare_monailabel_app(app, venv=fake_monailabel_venv(tmp_path / "venv"))
    assert (app / "main.py").read_text() == "".join(REFUSAL_REPORTING_IMPORTS.values())
    served = app / "model" / "ctp_stroke"
    project = _project_modules()
    for name in project:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(served))

    class BundleInferTask:
        network = staticmethod(lambda image: image)

        def __call__(self, request):
            parser = ConfigParser()
            parser.read_config(served / "configs" / "inference.json")
            parser["bundle_root"] = str(served)
            data = {"image": request["image"]}
            for transform in parser.get_parsed_content("preprocessing").transforms:
                data = transform(data)
            apply_transform(Lambdad("image", self.network), data)
            return "mask.nii.gz", {}

    class BundleTrainTask:
        fail = None
        bundle_path, bundle_config_path = str(served), str(served / "configs" / "train.json")

        def __init__(self):  # as MONAI Label's: train.json read once, when the task is made
            self.bundle_config = self._load_bundle_config(self.bundle_path, self.bundle_config_path)

        @staticmethod
        def _load_bundle_config(path, config):
            parser = ConfigParser()
            parser.read_config(config)
            parser.config.update({"bundle_root": path})
            return parser

        def __call__(self, request, datastore):
            # MONAI Label's multi-GPU path sets its overrides into the task's config, validation studies only where
            # val_split leaves some, and runs torchrun with that config
            self.validated_on = self.bundle_config.get("validate#dataset#data")
            if "validate" in request:
                self.bundle_config.set(request["validate"], "validate#dataset#data")
            parser = ConfigParser()
            parser.read_config(served / "configs" / "train.json")
            parser.update({"bundle_root": str(served), "train#dataset#data": [], "validate#dataset#data": []})
            if self.fail:
                self.fail()
            parser.get_parsed_content("check_labelled_studies")

    yield _refusal_reporting_tasks(app, monkeypatch, BundleInferTask, BundleTrainTask)
    for name in _project_modules() - project:
        del sys.modules[name]


def _study(folder, nan=False) -> Path:
    study = folder / ("case_nan.nii.gz" if nan else "case_1.nii.gz")
    volume = np.zeros((32, 32, 2, 5), dtype=np.float32)
    volume[8:24, 8:24] = 1.0  # the brain
    if nan:
        volume[12, 12, 1, 2] = np.nan
    nib.save(nib.Nifti1Image(volume, np.eye(4)), study)
    return study


def test_the_bundles_refusals_reach_the_monailabel_client(served_tasks, tmp_path, caplog):
    """MONAI Label 0.8.5 answers every error of an inference with a bare HTTP 500 ``Internal Server Error``: a study
    with a NaN voxel (or a missing map, sagittal slices) showed 3D Slicer that, and the bundle's refusal naming the file
    reached the server's console only; the prepared app's inference task answers HTTP 422 with the refusal. A refused
    fine-tune's log (the client gets its last 20 lines, the Slicer plugin the last) ended with MONAI's wrapper and its
    traceback; it ends with the refusal."""
    from fastapi import HTTPException

    study = _study(tmp_path, nan=True)
    with pytest.raises(HTTPException) as raised:
        served_tasks.RefusalReportingInferTask()({"image": str(study)})
    assert (raised.value.status_code, raised.value.detail) == (422, f"{study}: 1 NaN or Inf values in the CBV channel")
    assert f"the bundle refused the inference of {study}: {raised.value.detail}" in caplog.text
    served_code = tmp_path / "app" / "model" / "ctp_stroke" / "custom"
    assert Path(sys.modules["custom.deploy"].__file__) == served_code / "deploy.py"  # recognised as the project's

    with pytest.raises(ValueError) as raised:
        served_tasks.RefusalReportingTrainTask()({"model": "ctp_stroke"}, None)
    assert traceback.format_exception(raised.value)[-1] == "ValueError: MONAI Label gave the fine-tune no labelled " \
                                                           "study to train on: submit labels (tag 'final')\n"
    assert "Failed to instantiate component 'custom.data.datalist.check_labelled_studies'" in caplog.text

    def missing_dataset():  # a refusal of the project's that is an OSError keeps its type (it became a ValueError)
        from custom.data.datalist import load_dataset_json

        load_dataset_json(tmp_path / "no_dataset")

    served_tasks.BundleTrainTask.fail = staticmethod(missing_dataset)
    with pytest.raises(FileNotFoundError) as raised:
        served_tasks.RefusalReportingTrainTask()({"model": "ctp_stroke"}, None)
    assert traceback.format_exception(raised.value)[-1] == \
        f"FileNotFoundError: dataset_dir '{tmp_path / 'no_dataset'}' does not exist (convert data with `python -m " \
        "custom prepare`)\n"


def _truncated(study) -> Path:
    """``study``'s file cut in half, as a broken copy leaves it: nibabel reads its header, not its voxels."""
    truncated = study.with_name("case_truncated.nii.gz")
    truncated.write_bytes(study.read_bytes()[: study.stat().st_size // 2])
    return truncated


def test_other_inference_errors_reach_the_client_naming_the_study_and_the_error(served_tasks, tmp_path, caplog):
    """Any other error of an inference (a corrupt study file the bundle does not screen, a failure in a transform or
    the network) reached 3D Slicer as a bare HTTP 500 ``Internal Server Error``, and a ValueError of a library
    (numpy's here, inside a MONAI transform) was answered HTTP 422 as if the bundle had refused the study. Both are
    HTTP 500 naming the study and the original error, its traceback in the server's log; a refusal is only what the
    project's code raises (``custom.deploy.is_refusal``, of the served copy)."""
    from fastapi import HTTPException

    study = _study(tmp_path)
    served_tasks.RefusalReportingInferTask()({"image": str(study)})  # the stand-ins run a good study
    truncated = _truncated(study)
    with pytest.raises(HTTPException) as raised:
        served_tasks.RefusalReportingInferTask()({"image": str(truncated)})
    assert (raised.value.status_code, raised.value.detail) == (
        500, f"the inference of {truncated} failed: EOFError: Compressed file ended before the end-of-stream marker "
             "was reached (the traceback is in the server's log)")  # fmt: skip

    served_tasks.BundleInferTask.network = staticmethod(lambda image: np.quantile(image, 2.0))
    with pytest.raises(HTTPException) as raised:
        served_tasks.RefusalReportingInferTask()({"image": str(study)})
    assert (raised.value.status_code, raised.value.detail) == (
        500, f"the inference of {study} failed: ValueError: Quantiles must be in the range [0, 1] (the traceback is "
             "in the server's log)")  # fmt: skip
    assert "Traceback (most recent call last)" in caplog.text and "np.quantile(image, 2.0)" in caplog.text


def test_a_fine_tune_run_in_the_server_is_answered_with_its_refusal_or_error(served_tasks, caplog):
    """``POST /train/<model>?run_sync=true`` runs the fine-tune in the server's request handler: its refusal (no
    labelled study) and any other error were a bare HTTP 500. They are answered as an inference's are; a fine-tune in a
    process of its own still ends its log with the refusal (previous test)."""
    from fastapi import HTTPException

    async def in_the_server(task):
        return task({"model": "ctp_stroke"}, None)

    with pytest.raises(HTTPException) as raised:
        asyncio.run(in_the_server(served_tasks.RefusalReportingTrainTask()))
    assert (raised.value.status_code, raised.value.detail) == (
        422, "MONAI Label gave the fine-tune no labelled study to train on: submit labels (tag 'final')")

    served_tasks.BundleTrainTask.fail = staticmethod(lambda: torch.zeros(2) @ torch.zeros(3))
    with pytest.raises(HTTPException) as raised:
        asyncio.run(in_the_server(served_tasks.RefusalReportingTrainTask()))
    assert raised.value.status_code == 500
    assert raised.value.detail.startswith("the fine-tune of ctp_stroke failed: RuntimeError: inconsistent tensor size")
    assert "Traceback (most recent call last)" in caplog.text


def test_a_multi_gpu_fine_tune_runs_torchrun_of_its_environment_and_fails_when_it_fails(served_tasks, tmp_path, capfd):
    """MONAI Label 0.8.5 ran ``torchrun`` from ``PATH`` (``FileNotFoundError`` under the documented start line, which
    does not activate the environment) and ignored its exit status (a refused or failed multi-GPU fine-tune ended DONE).
    MONAI Label's command line is run with this environment's Python, and its failure fails the fine-tune in one line
    naming the cause: a refused fine-tune's log ended with the traceback of ``RuntimeError: the multi-GPU fine-tune
    failed: torchrun exited with status 1; ...``, the refusal above it among the ranks' output. A fine-tune of its own
    process exits with status 1 and the first error of the ranks (the original one of the chain, not MONAI's wrapper),
    or torchrun's status where no rank printed one; one run in the server raises it (HTTP 500)."""
    task, json_file, refused = served_tasks.RefusalReportingTrainTask(), tmp_path / "valid.json", tmp_path / "rank.py"
    json_file.write_text("{}")
    refused.write_text(  # as a rank refused by the bundle ends: the refusal, then MONAI's wrapper raised from it
        'try:\n    raise ValueError("no labelled study\\n  the labels")\nexcept ValueError as err:\n'
        '    raise RuntimeError("Failed to instantiate component") from err\n'
    )
    torchrun = ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=1"]
    env = {key: value for key, value in os.environ.items() if key != "PATH"}  # no torchrun to find
    task.run_multi_gpu({}, torchrun + ["-m", "json.tool", str(json_file)], env)  # a tiny program
    with pytest.raises(SystemExit) as exited:
        task.run_multi_gpu({}, torchrun + [str(refused)], env)
    assert exited.value.code == "the multi-GPU fine-tune failed: ValueError: no labelled study (torchrun exited with " \
                                "status 1); each rank's output is above in the log"
    assert "RuntimeError: Failed to instantiate component" in capfd.readouterr().out  # the ranks' output: the log

    async def in_the_server():  # json.tool fails on an empty file, printing no traceback
        task.run_multi_gpu({}, torchrun + ["-m", "json.tool", os.devnull], env)

    with pytest.raises(RuntimeError) as raised:
        asyncio.run(in_the_server())
    assert str(raised.value) == "the multi-GPU fine-tune failed: torchrun exited with status 1; each rank's output " \
                                "is above in the log"
    assert "Expecting value" in capfd.readouterr().out


def test_one_fine_tune_of_the_served_bundle_runs_at_a_time(served_tasks, tmp_path):
    """MONAI Label 0.8.5 answers HTTP 429 to a second fine-tune only where it was not asked to queue it: ``POST
    /train/ctp_stroke?run_sync=true&enqueue=true`` ran in the server beside a background fine-tune (a process of its
    own), both writing the served ``models/model.pt`` and ``latest_checkpoint_epoch=N.pt`` of the same names. A
    fine-tune while another process fine-tunes the bundle is refused before it starts: HTTP 429 in the server, a
    RuntimeError (the last line of its log) in a background one; it runs once the other has ended, and a fine-tune
    that failed leaves the bundle free."""
    from fastapi import HTTPException

    served = tmp_path / "app" / "model" / "ctp_stroke"
    models, started = served / "models", []
    served_tasks.BundleTrainTask.fail = staticmethod(lambda: started.append("fine-tune"))
    holder = subprocess.Popen(  # the background fine-tune: another process holding the bundle's lock
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.read()", str(served_tasks.fine_tune_lock(served))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"

        async def in_the_server(task):
            return task({"model": "ctp_stroke"}, None)

        busy = f"another fine-tune of ctp_stroke is running, which writes the same '{models / 'model.pt'}': wait " \
               "until it ends (GET /train/ gives its status) or stop it (DELETE /train/), then ask again"
        with pytest.raises(HTTPException) as raised:
            asyncio.run(in_the_server(served_tasks.RefusalReportingTrainTask()))
        assert (raised.value.status_code, raised.value.detail) == (429, busy)
        with pytest.raises(RuntimeError) as raised:
            served_tasks.RefusalReportingTrainTask()({"model": "ctp_stroke"}, None)
        assert traceback.format_exception(raised.value)[-1] == f"RuntimeError: {busy}\n"
        assert started == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    for _ in range(2):  # the lock is free again once the holder has ended, and after a refused fine-tune
        with pytest.raises(ValueError, match="MONAI Label gave the fine-tune no labelled study to train on"):
            served_tasks.RefusalReportingTrainTask()({"model": "ctp_stroke"}, None)
    assert started == ["fine-tune", "fine-tune"]


def test_the_fine_tune_lock_stays_outside_the_served_bundle(served_tasks, tmp_path):
    """The lock of the served copy's fine-tunes (filelock's ``FileLock``, whose file stays on release: deleting it is
    unsafe) was an empty ``models/.fine_tune.lock`` left in the served bundle after each fine-tune, debris in any copy
    of it. It lies beside the bundle folder, in the app's ``model/``."""
    served = tmp_path / "app" / "model" / "ctp_stroke"
    models = sorted((served / "models").iterdir())
    with pytest.raises(ValueError, match="MONAI Label gave the fine-tune no labelled study to train on"):
        served_tasks.RefusalReportingTrainTask()({"model": "ctp_stroke"}, None)
    assert sorted((served / "models").iterdir()) == models and not list(served.rglob(".*"))
    assert served_tasks.fine_tune_lock(served) == served.parent / ".ctp_stroke.fine_tune.lock"
    assert sorted(path.name for path in served.parent.iterdir()) == [".ctp_stroke.fine_tune.lock", "ctp_stroke"]


def test_each_fine_tune_in_the_server_starts_from_train_json_as_it_is_on_disk(served_tasks):
    """MONAI Label 0.8.5 reads train.json once per task and each fine-tune changes that copy; fine-tunes requested with
    ``run_sync=true`` share the server's task, so a multi-GPU one with ``val_split`` -1 (no validation studies) was
    validated on those of the fine-tune before it (seen with a real server: ``val_mean_dice`` of a study it also
    trained on). Each fine-tune reads train.json again."""
    task, earlier = served_tasks.RefusalReportingTrainTask(), [{"image": "case_5.nii.gz", "label": "label_5.nii.gz"}]
    on_disk = task.bundle_config.get("validate#dataset#data")
    for request in ({"model": "ctp_stroke", "validate": earlier}, {"model": "ctp_stroke"}):
        with pytest.raises(ValueError, match="MONAI Label gave the fine-tune no labelled study to train on"):
            task(request, None)
        assert task.validated_on == on_disk == "@validate#datalist"
