"""Prepare a ready-to-start MONAI Label app that serves and fine-tunes this bundle.

Why it exists: MONAI Label 0.8.5 cannot share the project's environment (its torchvision needs another torch), its
``monaibundle`` sample app finds bundles only as folders under ``APP_DIR/model/``, and a served bundle
must write its fine-tuned weights to its own ``models/model.pt`` (the file MONAI Label loads and
reloads), while a plain training run must not overwrite the shipped weights. This module runs in the
project's environment and drives MONAI Label's own command line from its separate environment
(``.ci/monailabel_env`` builds it): the sample app is copied with ``monailabel apps --download`` (its bundle tasks
extended by :mod:`custom.monailabel_tasks`, so that the bundle's refusals reach the client), the bundle archive of
:mod:`custom.package` is unpacked under ``APP_DIR/model/<name>/`` and that copy's ``ckpt_dir`` is pointed at its
``models/`` folder. Optionally a studies folder is filled with a
converted dataset's 5-channel images, with 3D CT and Tmax volumes beside it for viewers that do not
display 4D NIfTI.
"""

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically, write_text_atomically
from custom.data.datalist import load_dataset_json, output_case_name, shared_case_name
from custom.package import package_bundle
from custom.training_record import EXPORTS, INPUT_SETTINGS, TRAINING_RECORD, record_of

BUNDLE_NAME = "ctp_stroke"
DEFAULT_VENV = Path.home() / ".cache" / "ctp-monailabel" / "venv"
VENV_VARIABLE = "CTP_MONAILABEL_VENV"
# The served copy's fine-tunes write here: the file MONAI Label's BundleTrainTask loads first and
# BundleInferTask reloads when its modification time changes.
SERVED_CKPT_DIR = "$@bundle_root + '/models'"
VIEW_CHANNELS = {"ct": 0, "tmax": 4}  # channel index in the converter's (H, W, D, 5) images
# report_refusals puts custom/monailabel_tasks.py at REFUSAL_REPORTING_MODULE of the app and replaces each import
# line of MONAI Label 0.8.5's sample app main.py by the import of the task that extends it.
REFUSAL_REPORTING_MODULE = "lib/refusal_reporting.py"
REFUSAL_REPORTING_IMPORTS = {
    "from monailabel.tasks.infer.bundle import BundleInferTask\n":
        "from lib.refusal_reporting import RefusalReportingInferTask as BundleInferTask\n",
    "from monailabel.tasks.train.bundle import BundleTrainTask\n":
        "from lib.refusal_reporting import RefusalReportingTrainTask as BundleTrainTask\n",
}  # fmt: skip


def monailabel_venv(venv=None) -> Path:
    """The MONAI Label environment: ``venv``, else ``$CTP_MONAILABEL_VENV``, else ``~/.cache/ctp-monailabel/venv``."""
    venv = Path(venv or os.environ.get(VENV_VARIABLE) or DEFAULT_VENV)
    if not (venv / "bin" / "monailabel").is_file():
        raise FileNotFoundError(
            f"no MONAI Label environment at '{venv}' (bin/monailabel missing): build it with .ci/monailabel_env "
            f"or name another with --venv or ${VENV_VARIABLE}"
        )
    return venv


def unpack_served_bundle(archive, model_dir, input_settings=None) -> Path:
    """Unzip a bundle archive into ``model_dir`` and point the copy's ``ckpt_dir`` at its ``models/``.

    The archive's single top folder is the bundle name; returns the bundle root. The copy's
    ``configs/train.json`` changes: plain runs of the repository's bundle keep training outside
    ``models/``, a MONAI Label fine-tune of the served copy updates ``models/model.pt``; its datalists
    are emptied, MONAI Label's datastore provides the cases, screened by
    :func:`custom.data.datalist.check_labelled_studies` before they are cached. ``input_settings`` (a subset of
    ``INPUT_SETTINGS`` -> value) are written into the copy's ``train.json`` and ``inference.json``
    alike: MONAI Label runs the configs as they are, and weights trained with extra input channels
    need the same keys to be served and fine-tuned.
    """
    input_settings = dict(input_settings or {})
    unknown = sorted(set(input_settings) - set(INPUT_SETTINGS))
    if unknown:
        raise ValueError(f"input settings {unknown} are not among {list(INPUT_SETTINGS)}")
    model_dir = Path(model_dir)
    with zipfile.ZipFile(archive) as zipped:
        tops = {Path(name).parts[0] for name in zipped.namelist()}
        if len(tops) != 1:
            raise ValueError(f"bundle archive '{archive}' must hold one folder, found {sorted(tops)}")
        bundle_root = model_dir / tops.pop()
        if bundle_root.exists():
            raise FileExistsError(f"'{bundle_root}' exists; remove it or prepare another app folder")
        zipped.extractall(model_dir)
    train_config = bundle_root / "configs" / "train.json"
    config = json.loads(train_config.read_text())
    config["ckpt_dir"] = SERVED_CKPT_DIR
    config["overwrite"] = True  # each fine-tune starts from the served model.pt and replaces it
    # MONAI Label supplies train#dataset#data and validate#dataset#data from its datastore. The Slicer
    # plugin posts an empty run_id, with which MONAI parses the whole config, datalists included: they
    # must not point at a dataset folder the server does not have.
    # MONAI Label sets those datasets' data itself, past fold_datalist's screening: each dataset requires the
    # screening of MONAI Label's studies, so it runs before the first study is cached, whatever the run_id.
    config["check_labelled_studies"] = {
        "_target_": "custom.data.datalist.check_labelled_studies",
        "train": "@train#dataset#data",
        "validate": "@validate#dataset#data",
    }
    for section in ("train", "validate"):
        config[section]["datalist"] = []
        config[section]["dataset"]["_requires_"] = "@check_labelled_studies"
    # a fine-tune trains on from the served weights: its record keeps theirs and adds its studies' digests
    config["training_record"]["fine_tuned_cases"] = "@check_labelled_studies"
    config.update(input_settings)
    write_text_atomically(train_config, json.dumps(config, indent=4) + "\n")
    if input_settings:
        inference_config = bundle_root / "configs" / "inference.json"
        config = json.loads(inference_config.read_text())
        config.update(input_settings)
        write_text_atomically(inference_config, json.dumps(config, indent=4) + "\n")
    return bundle_root


def serve_weights(bundle_root, ckpt_path) -> None:
    """Make ``ckpt_path`` (a checkpoint of ``train.json``, or a plain state dict) the served copy's
    ``models/model.pt``, the file MONAI Label loads first, with the training record beside it, if any; the copy's
    ``model.ts`` and ``model.onnx`` (``EXPORTS``), exports of other weights, and the record of the archive's weights are
    removed (each fine-tune removes the exports too, docs/monailabel.md)."""
    models = Path(bundle_root) / "models"
    models.mkdir(exist_ok=True)
    write_atomically(models / "model.pt", lambda temporary: shutil.copyfile(ckpt_path, temporary))
    for name in EXPORTS:
        (models / name).unlink(missing_ok=True)
    if record_of(ckpt_path).is_file():
        write_atomically(models / TRAINING_RECORD, lambda temporary: shutil.copyfile(record_of(ckpt_path), temporary))
    else:
        (models / TRAINING_RECORD).unlink(missing_ok=True)


def report_refusals(app, venv) -> None:
    """Make the sample app in ``app`` build its bundle tasks from ``custom.monailabel_tasks``, so that the bundle's
    refusal of a study reaches the client (inference: HTTP 422 and the message, not a bare 500; a fine-tune: its log
    ends with the message): the module is copied to ``REFUSAL_REPORTING_MODULE`` and ``main.py`` imports its tasks
    under the names of MONAI Label's (``REFUSAL_REPORTING_IMPORTS``). A ``main.py`` without each of those import lines
    once (another MONAI Label than 0.8.5) is refused before anything is written, naming it and the environment
    ``venv`` whose ``monailabel apps --download`` gave it."""
    main = Path(app) / "main.py"
    text = main.read_text(encoding="utf-8")
    missing = [line.strip() for line in REFUSAL_REPORTING_IMPORTS if text.count(line) != 1]
    if missing:
        raise ValueError(
            f"the monaibundle sample app of the MONAI Label environment '{venv}' is not MONAI Label 0.8.5's: its "
            f"main.py does not hold each of the lines {missing} once, which this command replaces by the tasks of "
            f"{REFUSAL_REPORTING_MODULE}; use the environment .ci/monailabel_env builds (nothing was written)"
        )
    shutil.copyfile(Path(__file__).with_name("monailabel_tasks.py"), Path(app) / REFUSAL_REPORTING_MODULE)
    for line, replacement in REFUSAL_REPORTING_IMPORTS.items():
        text = text.replace(line, replacement)
    write_text_atomically(main, text)


def check_served_bundle(bundle_root, weights=None) -> None:
    """Build the served copy's inference preprocessing and network from its ``configs/inference.json`` and load
    ``weights`` (default: its ``models/model.pt``) into the network.

    Why it exists: MONAI Label starts and lists a bundle whose weights do not fit its configs (weights trained
    with other ``contralateral_channels`` or ``adjacent_slices``, a bad setting) and fails only at the first
    inference, inside the server, or, where the channel count agrees (``difference`` and ``mirror``), never; here
    the preparation fails instead, naming the file or the setting. Weights with a training record beside them
    (``custom.training_record``) must match the served settings.
    """
    from monai.bundle import ConfigParser

    from custom.handlers import load_network_checkpoint

    bundle_root = Path(bundle_root)
    config_file = bundle_root / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(config_file)
    parser["bundle_root"] = str(bundle_root)
    try:
        parser.get_parsed_content("preprocessing")
        network = parser.get_parsed_content("network_def")
    except Exception as err:
        settings = ", ".join(f"{key}={parser.get(key)!r}" for key in INPUT_SETTINGS)
        cause = f"\n  {err.__cause__}" if err.__cause__ else ""
        raise ValueError(f"'{config_file}' ({settings}) does not build: {err}{cause}") from err
    input_settings = {key: parser.get_parsed_content(key) for key in INPUT_SETTINGS}
    load_network_checkpoint(weights or bundle_root / "models" / "model.pt", network, input_settings=input_settings)


def plan_studies(dataset_dir, studies, views=None) -> list[tuple[Path, Path, dict]]:
    """Check that every image of a converted dataset (training and testing) can be copied to ``studies``; returns,
    per image, its source, its study file and its view files, for :func:`write_studies`. Nothing is written.

    Why it is apart from the writing: ``prepare_monailabel_app`` checks the studies before it builds the app folder,
    so a refused dataset or an existing study file leaves no app folder behind that the corrected rerun would be
    refused for. MONAI Label names a study after its file (``case_3.nii.gz`` -> ``case_3``). The views are a 3D CT
    and a 3D Tmax volume per study (``<id>_ct.nii.gz``, ``<id>_tmax.nii.gz``) in ``views`` (default:
    ``<studies>_views`` beside it; not inside ``studies``, where MONAI Label would list them as studies). Existing
    files are refused, and so are two images of one study id: nothing is overwritten.
    """
    dataset_dir, studies = Path(dataset_dir), Path(studies)
    views = Path(views) if views else studies.with_name(studies.name + "_views")
    dataset = load_dataset_json(dataset_dir)
    images = [e["image"] for e in dataset.get("training", [])] + [
        e["image"] if isinstance(e, dict) else e for e in dataset.get("testing", [])
    ]
    if not images:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}' lists no images")
    sources = [dataset_dir / relative for relative in images]
    shared = shared_case_name(sources)
    if shared:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}' lists '{shared[1]}' and '{shared[2]}': both would be "
                         f"study '{shared[0]}' (MONAI Label names a study after its file); rename one")
    for source in sources:
        shape = nib.load(source).shape
        if len(shape) != 4 or shape[3] != 5:
            raise ValueError(f"'{source}' has shape {shape}; expected (H, W, D, 5)")
    plan = [
        (source, studies / source.name, {view: views / f"{study_id}_{view}.nii.gz" for view in VIEW_CHANNELS})
        for source, study_id in zip(sources, map(output_case_name, sources))
    ]
    for path in [target for _, target, _ in plan] + [path for _, _, paths in plan for path in paths.values()]:
        if path.exists():
            raise FileExistsError(f"'{path}' exists; use empty studies and views folders")
    return plan


def write_studies(plan) -> list[str]:
    """Copy each image of :func:`plan_studies`'s ``plan`` to its study file and write its 3D CT and Tmax views (same
    grid and affine); returns the study ids."""
    for source, target, paths in plan:
        write_atomically(target, lambda temporary, source=source: shutil.copyfile(source, temporary))
        image = nib.load(source)
        volume = np.asarray(image.dataobj, dtype=np.float32)
        for view, channel in VIEW_CHANNELS.items():
            view_image = nib.Nifti1Image(volume[..., channel], image.affine)
            write_atomically(paths[view], lambda temporary, v=view_image: nib.save(v, temporary))
    return [output_case_name(source) for source, _, _ in plan]


def monailabel_command(venv) -> list[str]:
    """MONAI Label's command line run by its environment's Python.

    Equivalent to ``monailabel`` with the environment activated; the ``bin/monailabel`` script itself
    runs whichever ``python`` comes first on ``PATH``.
    """
    return [str(Path(venv) / "bin" / "python"), "-m", "monailabel.main"]


def monailabel_environment() -> dict:
    """This process's environment without ``PYTHONPATH``, so that the server imports the bundle's own
    ``custom/`` and never a copy of this repository."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def start_server_command(app_dir, studies, venv, port=8000, name=BUNDLE_NAME) -> list[str]:
    """MONAI Label's ``start_server`` line for the app, offline, on the loopback interface."""
    return monailabel_command(venv) + [
        "start_server",
        "--app", str(app_dir), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
        "--conf", "models", name, "--conf", "sam2", "false", "--conf", "zoo_source", "github",
    ]  # fmt: skip


def prepare_monailabel_app(app_dir: str, studies: str | None = None, dataset_dir: str | None = None,
                           archive: str | None = None, bundle_root: str = "bundle", venv: str | None = None,
                           port=8000, ckpt_path: str | None = None, contralateral_channels=None,
                           adjacent_slices=None, spacing_mm=None):  # fmt: skip
    """Prepare ``app_dir`` (must not exist) for ``monailabel start_server``; returns the start line.

    Args:
        app_dir: the app folder to create: MONAI Label's ``monaibundle`` sample app, the bundle in
            ``model/ctp_stroke/``.
        studies: the studies folder the server will serve (default ``<app_dir>/studies``).
        dataset_dir: a converted dataset (``python -m custom prepare``); its images are copied to
            ``studies`` and 3D CT / Tmax views written beside it. Without it ``studies`` is created empty.
        archive: a bundle archive (``python -m custom package``) to serve; default: package ``bundle_root``.
        venv: the MONAI Label environment (default ``$CTP_MONAILABEL_VENV`` or ``~/.cache/ctp-monailabel/venv``).
        port: the port written into the printed command.
        ckpt_path: weights to serve instead of the archive's (e.g. ``runs/fold0/model.pt`` of a training run).
        contralateral_channels, adjacent_slices, spacing_mm: the input settings the served weights were trained with
            (``train.json``'s keys), written into the served copy's configs; ``None`` keeps the archive's.

    The served weights are loaded into the served configs' network before anything is moved into place,
    so weights that do not fit the settings fail here, naming the file.
    """
    venv = monailabel_venv(venv)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_path}' does not exist")
    app_dir = Path(app_dir).absolute()
    studies = Path(studies).absolute() if studies else app_dir / "studies"
    if app_dir.exists():
        raise FileExistsError(f"app folder '{app_dir}' exists; name a new one")
    studies_plan = plan_studies(dataset_dir, studies) if dataset_dir is not None else []  # before the app is built
    with tempfile.TemporaryDirectory(dir=app_dir.parent if app_dir.parent.exists() else None) as scratch:
        copied = subprocess.run(
            monailabel_command(venv) + ["apps", "--download", "--name", "monaibundle", "--output", scratch],
            capture_output=True, text=True, env=monailabel_environment(),
        )  # fmt: skip
        sample_app = Path(scratch) / "monaibundle"
        if copied.returncode != 0 or not sample_app.is_dir():
            output = copied.stdout + copied.stderr
            raise RuntimeError(f"`monailabel apps --download --name monaibundle` failed:\n{output}")
        report_refusals(sample_app, venv)
        if archive is None:
            archive = package_bundle(Path(scratch) / f"{BUNDLE_NAME}.zip", bundle_root=bundle_root)
        given = {"contralateral_channels": contralateral_channels, "adjacent_slices": adjacent_slices,
                 "spacing_mm": spacing_mm}
        input_settings = {key: value for key, value in given.items() if value is not None}
        served = unpack_served_bundle(archive, sample_app / "model", input_settings)
        if ckpt_path is not None:
            serve_weights(served, ckpt_path)
        check_served_bundle(served, ckpt_path)  # names the given file, not its copy in the scratch folder
        name = served.name
        app_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(sample_app), app_dir)
    studies.mkdir(parents=True, exist_ok=True)
    if dataset_dir is not None:
        ids = write_studies(studies_plan)
        print(f"studies: {len(ids)} in '{studies}'; CT and Tmax views: '{studies.with_name(studies.name + '_views')}'")
    return shlex.join(start_server_command(app_dir, studies, venv, port, name))
