"""Fixed-budget accuracy benchmark: the bundle against what a user would run instead, on an independent test phantom.

Why it exists: cross-validation on the demo phantom selects checkpoints and defaults on the cases it then
scores. This benchmark keeps a test set that nothing is tuned on: a training phantom (checkpoints are
selected on fold 0 of it, an inner validation split) and a test phantom drawn from another seed, every
case labelled and used only for scoring. Every method gets the same wall-clock training budget and the
same data, and every method's masks are scored by the same code (``custom.metrics.case_metrics``):

- ``bundle``: ``python -m monai.bundle run training`` with train.json as shipped and ``time_budget_s`` set (the
  run fits its epochs and learning-rate schedule to the budget, ``custom.time_budget``); the test set is
  segmented with inference.json.
- ``monai_unet``: the plain recipe a MONAI user writes (``UNet`` + ``DiceCELoss``, percentile normalisation,
  flips, ``SupervisedTrainer``), stopped by the same time limit.
- ``nnunet_2d``: nnU-Net v2 ``2d`` (dataset conversion, ``nnUNetv2_plan_and_preprocess``, nnU-Net's trainer
  with its epoch count fitted to the budget after one measured epoch, ``nnUNetv2_predict``).
- ``threshold``: the rCBF < 30 % rule of ``custom.baseline`` (no training).

``python -m custom accuracy-bench --help`` lists the options; docs/results.md has the commands and results.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically, write_text_atomically
from custom.baseline import run_baseline
from custom.config_check import whole_number
from custom.crossval import configuration_differences, file_sha256, override_arguments
from custom.data.datalist import (
    fold_datalist, load_dataset_json, output_case_name, refuse_earlier_outputs, scored_dataset_sha256
)
from custom.data.isles2018 import prepare_isles2018
from custom.data.phantom import write_phantom
from custom.data.studies import read_nifti, require_same_grid
from custom.deploy import write_mask
from custom.metrics import case_metrics
from custom.reporting import (
    paired_comparison,
    read_case_csv,
    same_case_statistics,
    summarise,
    write_case_csv,
    write_markdown,
)
from custom.training_record import INPUT_SETTINGS
from custom.wording import counted

REPO = Path(__file__).resolve().parent.parent
BUNDLE_ROOT = REPO / "bundle"
METHODS = ("bundle", "monai_unet", "nnunet_2d", "threshold")
DESCRIPTIONS = {
    "bundle": "the bundle (train.json defaults, epochs fitted to the budget)",
    "monai_unet": "plain MONAI UNet + DiceCELoss recipe",
    "nnunet_2d": "nnU-Net v2, 2d configuration",
    "threshold": "threshold rule rCBF < 30 % within Tmax > 6 s",
}
TABLE_METRICS = ("dice", "hd95_mm", "avd_ml", "lesion_f1")
INNER_VALIDATION_FOLD = 0
# bundle overrides that inference.json shares with train.json (besides network_def#...)
INFERENCE_KEYS = ("num_workers", *INPUT_SETTINGS, "lesion_threshold", "min_lesion_ml")
INFERENCE_ONLY_KEYS = ("lesion_threshold", "min_lesion_ml")  # post-processing: kept out of the training runs
# Full size as in the issue; --quick: seconds-long runs for the end-to-end test.
FULL = {"train_cases": 40, "test_cases": 60, "size": 256}
QUICK = {"train_cases": 8, "test_cases": 4, "size": 64}
QUICK_BUNDLE_OVERRIDES = {"num_workers": 0, "batch_size": 2, "samples_per_volume": 2, "patch_size": [32, 32]}
NNUNET_DATASET_ID = 990
NNUNET_DATASET = f"Dataset{NNUNET_DATASET_ID}_CTPPhantom"
# What score-masks scored (the labels' dataset.json, by SHA-256 as the run records of cv and baseline), beside its table
SCORE_RECORD = "score_masks_run.json"


def _run(command: list[str], log_file: Path, env: dict | None = None) -> None:
    """Run ``command`` with its output appended to ``log_file``; raise naming the log if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(shlex.join(command), flush=True)  # quoted as a shell needs it
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environment.get("PYTHONPATH", "")) if p)
    with open(log_file, "a") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"'{command[0]} ...' failed with exit code {completed.returncode}; see '{log_file}'")


def _differences(recorded: dict, current: dict) -> list[str]:
    """cv's ``configuration_differences`` over the keys of ``current`` that ``recorded`` holds: a record of an
    earlier version lacks some (not checked), and facts.json holds facts besides the settings."""
    shared = [key for key in current if key in recorded]
    return configuration_differences({key: recorded[key] for key in shared}, {key: current[key] for key in shared})


def phantom_dataset(folder: Path, cases: int, seed: int, size: int, folds: int) -> Path:
    """A converted dataset of ``cases`` labelled phantom cases in ``folder/dataset`` (reused when present).

    Every case is written to the ISLES 2018 TRAINING split (so it has a label) and converted by the real
    converter, exactly as a user's data would be. Its settings are recorded in ``folder/phantom.json``; a dataset
    of other settings is refused rather than reused (the table would name the requested seed and sizes).
    """
    dataset_dir, record = folder / "dataset", folder / "phantom.json"
    settings = {"cases": cases, "seed": seed, "size": size, "folds": folds}
    if (dataset_dir / "dataset.json").is_file():
        if not record.is_file():
            print(f"reusing the dataset '{dataset_dir}' (no '{record}': its settings are not checked)", flush=True)
            return dataset_dir
        differences = _differences(json.loads(record.read_text()), settings)
        if differences:
            raise ValueError(f"'{dataset_dir}' is a phantom of other settings ({'; '.join(differences)}; see "
                             f"'{record}'): choose another --out or repeat the recorded settings")
        print(f"reusing the dataset '{dataset_dir}'", flush=True)
        return dataset_dir
    raw = Path(write_phantom(folder / "isles2018", cases=cases, test_cases=0, seed=seed, size=size, overwrite=True))
    prepare_isles2018(raw / "TRAINING", dataset_dir, patients=raw / "patients.csv", folds=folds, overwrite=True)
    write_text_atomically(record, json.dumps(settings, indent=2) + "\n")
    return dataset_dir


# ---------------------------------------------------------------------------------------------- the bundle


def ignite_epoch_seconds(log_text: str, engine: str) -> list[float]:
    """Seconds per epoch of ``engine`` ("SupervisedTrainer" or "SupervisedEvaluator") from Ignite's log lines
    ``... ignite.engine.engine.<engine> - INFO - Epoch[N] Complete. Time taken: HH:MM:SS.fff``."""
    pattern = rf"engine\.{engine} - INFO - Epoch\[\d+\] Complete\. Time taken: (\d+):(\d+):([\d.]+)"
    return [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in re.findall(pattern, log_text)]


def _bundle_command(config: str, arguments: dict) -> list[str]:
    configs = [str(BUNDLE_ROOT / "configs" / config)]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), *override_arguments(arguments)]


def training_overrides(overrides: dict) -> dict:
    """The bench's bundle overrides that ``train.json`` uses: all but the inference-only ones."""
    return {key: value for key, value in overrides.items() if key not in INFERENCE_ONLY_KEYS}


def run_bundle(train_dataset: Path, test_images: list[str], out: Path, budget_s: int, overrides: dict) -> dict:
    """Train the bundle for ``budget_s`` seconds (``time_budget_s``: the run fits its epochs and schedule to
    it), segment ``test_images`` with inference.json into ``out/masks/<image>_seg.nii.gz``; returns facts
    about the run."""
    models, train_logs, masks = out / "models", out / "train_logs", out / "masks"
    for folder in (models, train_logs, masks):  # a method is rerun whole
        shutil.rmtree(folder, ignore_errors=True)
    for log in ("train.log", "inference.log"):
        (out / log).unlink(missing_ok=True)
    train_arguments = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(train_dataset),
        "fold": INNER_VALIDATION_FOLD,
        "ckpt_dir": str(models),
        "output_dir": str(train_logs),
        **training_overrides(overrides),
        "time_budget_s": budget_s,
    }
    started = time.time()
    _run(_bundle_command("train.json", train_arguments) + ["training"], out / "train.log")
    train_s = time.time() - started
    # model.pt is the best validated model; the last epoch is always validated, also when the budget stops it
    checkpoint = models / "model.pt"
    if not checkpoint.is_file():
        raise RuntimeError(f"the bundle saved no '{checkpoint}'; see '{out / 'train.log'}'")
    train_log = (out / "train.log").read_text()
    datalist = write_text_atomically(out / "test_images.json", json.dumps(test_images, indent=1))
    infer_arguments = {
        "bundle_root": str(BUNDLE_ROOT),
        "datalist": f"%{datalist}",
        "ckpt_path": str(checkpoint),
        "output_dir": str(masks),
        # overrides that mean the same in inference.json (the network and its inputs)
        **{k: v for k, v in overrides.items() if k in INFERENCE_KEYS or k.startswith("network_def")},
    }
    _run(_bundle_command("inference.json", infer_arguments) + ["run"], out / "inference.log")
    return {"train_seconds": round(train_s, 1),
            "epochs_run": len(ignite_epoch_seconds(train_log, "SupervisedTrainer")),
            "validations": len(ignite_epoch_seconds(train_log, "SupervisedEvaluator"))}


# ------------------------------------------------------------------------- the plain MONAI recipe (a peer)


def plain_unet_transforms(keys: list[str], training: bool):
    """The plain recipe's transforms: percentile normalisation per channel; for training, whole-slice crops
    (1:1 lesion : background centres) and flips."""
    from monai import transforms as mt

    steps = [
        mt.LoadImaged(keys, image_only=True),
        mt.EnsureChannelFirstd(keys),
        mt.ScaleIntensityRangePercentilesd(
            "image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        ),
    ]
    if training:
        steps += [
            mt.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(-1, -1, 1), pos=1, neg=1, num_samples=4),
            mt.SqueezeDimd(keys, dim=3),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=0),
            mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
        ]
    return mt.Compose(steps)


def plain_unet_network():
    """MONAI's UNet as the tutorials build it: 2D, five levels, residual units, batch norm."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=5, out_channels=2, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def train_plain_unet(dataset_dir: Path, out: Path, budget_s: int, val_interval: int, num_workers: int) -> dict:
    """Train the plain recipe on the training folds for ``budget_s`` seconds, validating every ``val_interval``
    epochs and at the end, and keep the checkpoint with the best validation Dice on the inner fold as
    ``out/model.pt``; returns facts about the run."""
    import torch
    from ignite.engine import Events
    from ignite.handlers import TimeLimit
    from monai.data import CacheDataset, DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import CheckpointSaver, MeanDice, ValidationHandler, from_engine
    from monai.inferers import SliceInferer
    from monai.losses import DiceCELoss
    from monai.transforms import Activationsd, AsDiscreted, Compose
    from monai.utils import set_determinism

    started = time.time()
    set_determinism(seed=0)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    network = plain_unet_network().to(device)
    keys = ["image", "label"]
    train_data = CacheDataset(
        fold_datalist(dataset_dir, INNER_VALIDATION_FOLD, "train"), plain_unet_transforms(keys, True)
    )
    validate_data = CacheDataset(
        fold_datalist(dataset_dir, INNER_VALIDATION_FOLD, "validate"), plain_unet_transforms(keys, False)
    )
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=DataLoader(validate_data, batch_size=1, num_workers=num_workers),
        network=network,
        inferer=SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=16),
        postprocessing=Compose([Activationsd("pred", softmax=True),
                                AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2)]),
        key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                  output_transform=from_engine(["pred", "label"]))},
        val_handlers=[CheckpointSaver(str(out), {"model": network}, save_key_metric=True,
                                      key_metric_filename="model.pt")],
    )
    validation = ValidationHandler(val_interval, evaluator)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1_000_000,  # the time limit ends the run
        train_data_loader=DataLoader(train_data, batch_size=4, shuffle=True, num_workers=num_workers),
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=[validation],
    )
    trainer.add_event_handler(Events.COMPLETED, validation)  # the model the time limit stopped at is a candidate too
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(budget_s))  # its clock starts here, data cached
    trainer.run()
    if not (out / "model.pt").is_file():
        raise RuntimeError(f"the plain recipe saved no '{out / 'model.pt'}' (no validation Dice above 0?)")
    return {"train_seconds": round(time.time() - started, 1), "epochs_run": trainer.state.epoch,
            "val_interval": val_interval, "best_validation_dice": round(float(evaluator.state.best_metric), 4)}


def predict_plain_unet(model_path: Path, test_entries: list[dict], test_dataset: Path, masks: Path) -> None:
    """Segment every test case slice by slice with the plain recipe's model into ``masks/<case>.nii.gz``."""
    import torch
    from ignite.handlers import Checkpoint
    from monai.inferers import SliceInferer

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    network = plain_unet_network().to(device).eval()
    Checkpoint.load_objects({"model": network}, torch.load(model_path, map_location=device, weights_only=True))
    inferer = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=16)
    preprocess = plain_unet_transforms(["image"], training=False)
    for entry in test_entries:
        image = preprocess({"image": str(test_dataset / entry["image"])})["image"]
        if image.shape[1] % 16 or image.shape[2] % 16:
            raise ValueError(f"{entry['image']}: the plain recipe needs H and W divisible by 16, got {image.shape}")
        with torch.no_grad():
            logits = inferer(image[None].to(device), network)
        write_mask(logits[0].argmax(0).cpu().numpy(), image.affine.numpy(), masks / f"{entry['case']}.nii.gz")


# ------------------------------------------------------------------------------------- nnU-Net v2 (a peer)


def nnunet_environment(root: Path) -> dict:
    """nnU-Net's three folders, set as environment variables for its commands (it reads them at import)."""
    return {name: str(root / folder) for name, folder in
            (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results"))}


def _split_channels(image_path: Path, case: str, folder: Path) -> None:
    """Write a (H, W, D, C) image as nnU-Net's one file per channel, ``<case>_<CCCC>.nii.gz``."""
    image = nib.load(image_path)
    data = np.asanyarray(image.dataobj)
    for channel in range(data.shape[3]):
        target = folder / f"{case}_{channel:04d}.nii.gz"
        channel_image = nib.Nifti1Image(np.ascontiguousarray(data[..., channel]), image.affine)
        write_atomically(target, lambda temporary, img=channel_image: nib.save(img, temporary))


def write_nnunet_raw(train_dataset: Path, test_dataset: Path, raw_root: Path) -> tuple[Path, dict]:
    """Convert the training dataset (with labels) and the test images to nnU-Net's raw format; returns the test
    image folder and the split (fold 0 = the inner validation fold, as for the other methods)."""
    train, test = load_dataset_json(train_dataset, ("modality", "training")), load_dataset_json(test_dataset)
    folder = raw_root / NNUNET_DATASET
    for entry in train["training"]:
        _split_channels(train_dataset / entry["image"], entry["case"], folder / "imagesTr")
        label = nib.load(train_dataset / entry["label"])
        write_mask(np.asanyarray(label.dataobj), label.affine, folder / "labelsTr" / f"{entry['case']}.nii.gz")
    for entry in test["training"]:
        _split_channels(test_dataset / entry["image"], entry["case"], folder / "imagesTs")
    description = {
        "channel_names": train["modality"],
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(train["training"]),
        "file_ending": ".nii.gz",
    }
    write_text_atomically(folder / "dataset.json", json.dumps(description, indent=2))
    split = {
        "train": [e["case"] for e in train["training"] if e["fold"] != INNER_VALIDATION_FOLD],
        "val": [e["case"] for e in train["training"] if e["fold"] == INNER_VALIDATION_FOLD],
    }
    return folder / "imagesTs", split


def train_nnunet_for_budget(budget_s: float, iterations_per_epoch: int, val_iterations: int, facts_file: str) -> None:
    """Train nnU-Net's default trainer (2d, fold 0) for ``budget_s`` seconds; run in a process whose environment
    names nnU-Net's folders.

    nnU-Net has no time limit and plans 1000 epochs of 250 iterations. Here one epoch is trained and timed,
    then the epoch count (and the poly learning-rate schedule, which runs over it) is set to the budget divided by
    that epoch's time, rounded up; training stops at the first iteration past the budget (that epoch's
    pseudo-Dice validation still runs). nnU-Net's own epoch steps (train, pseudo-Dice validation, checkpoint_best,
    checkpoint_final) are called as its ``run_training`` does.
    """
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = get_trainer_from_args(str(NNUNET_DATASET_ID), "2d", INNER_VALIDATION_FOLD, device=device)
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.on_train_start()
    started, iterations = time.time(), 0
    while trainer.current_epoch < trainer.num_epochs and time.time() - started < budget_s:
        epoch_started = time.time()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = []
        for _ in range(trainer.num_iterations_per_epoch):
            outputs.append(trainer.train_step(next(trainer.dataloader_train)))
            iterations += 1
            if time.time() - started > budget_s:
                break
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            batches = range(trainer.num_val_iterations_per_epoch)
            trainer.on_validation_epoch_end([trainer.validation_step(next(trainer.dataloader_val)) for _ in batches])
        trainer.on_epoch_end()
        epoch_s = time.time() - epoch_started
        if trainer.current_epoch == 1:
            # round up: the iteration check above cuts the last epoch at the budget, so no budget is left unused
            trainer.num_epochs = max(1, math.ceil(budget_s / epoch_s))
            trainer.lr_scheduler.max_steps = trainer.num_epochs
    train_s = time.time() - started
    trainer.on_train_end()
    facts = {"budgeted_loop_seconds": round(train_s, 1), "epochs_planned": trainer.num_epochs,
             "epochs_run": trainer.current_epoch, "iterations_per_epoch": iterations_per_epoch,
             "iterations_run": iterations,
             "batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size)}
    write_text_atomically(facts_file, json.dumps(facts, indent=2))


def run_nnunet(train_dataset: Path, test_dataset: Path, out: Path, budget_s: int, iterations: tuple[int, int]) -> dict:
    """nnU-Net v2 2d end to end in ``out/nnunet`` (raw, preprocessed, results); masks in ``out/masks``."""
    import torch

    if importlib.util.find_spec("nnunetv2") is None:
        raise RuntimeError("nnU-Net v2 is not installed in this environment: pip install -e '.[bench]' (nnunetv2)")

    root = out / "nnunet"
    shutil.rmtree(root, ignore_errors=True)
    env = nnunet_environment(root)
    test_images, split = write_nnunet_raw(train_dataset, test_dataset, Path(env["nnUNet_raw"]))
    bin_dir = Path(sys.executable).parent
    log_file = out / "nnunet.log"
    plan = [str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(NNUNET_DATASET_ID), "-c", "2d"]
    _run(plan + ["-np", "1", "-npfp", "1", "--verify_dataset_integrity"], log_file, env)
    write_text_atomically(Path(env["nnUNet_preprocessed"]) / NNUNET_DATASET / "splits_final.json", json.dumps([split]))
    facts_file = out / "nnunet_training.json"
    call = (f"from custom.accuracy_bench import train_nnunet_for_budget; "
            f"train_nnunet_for_budget({budget_s}, {iterations[0]}, {iterations[1]}, {str(facts_file)!r})")
    started = time.time()
    _run([sys.executable, "-c", call], log_file, env)
    wall_s = time.time() - started
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _run([str(bin_dir / "nnUNetv2_predict"), "-i", str(test_images), "-o", str(out / "masks"), "-d",
          str(NNUNET_DATASET_ID), "-c", "2d", "-f", str(INNER_VALIDATION_FOLD), "-chk", "checkpoint_final.pth",
          "-device", device, "-npp", "1", "-nps", "1", "--disable_progress_bar"], log_file, env)
    facts = json.loads(facts_file.read_text())
    return {**facts, "train_seconds": round(wall_s, 1)}


# ------------------------------------------------------------------------------------------- scoring


def score_masks(dataset_dir: Path, entries: list[dict], method: str, mask_path) -> list[dict]:
    """Per-case metrics of one method: ``mask_path(entry)`` names its mask of each labelled entry of ``dataset_dir``."""
    rows = []
    for entry in entries:
        path = Path(mask_path(entry))
        if not path.is_file():
            raise FileNotFoundError(f"{method}: no mask '{path}' for scored case '{entry['case']}'")
        label_path = dataset_dir / entry["label"]
        label_image, label = read_nifti(label_path)
        pred_image, pred = read_nifti(path)
        try:  # another orientation or grid, scored voxel by voxel, would give a wrong Dice without a word
            require_same_grid(path, pred_image, pred, label_path, label_image, label, reference="its label's")
        except ValueError as err:
            raise ValueError(f"{method}: mask {err}") from err
        row = {"method": method, "case": entry["case"], "patient": entry.get("patient", "")}
        try:
            row.update(case_metrics(pred, label, label_image.affine))
        except ValueError as err:  # a non-binary mask or label: name the files
            raise ValueError(f"{method}: mask '{path}' scored against label '{label_path}': {err}") from err
        rows.append(row)
    return rows


def score_masks_command(masks: str, dataset_dir: str, out: str, method: str = "masks", fold: int | None = None,
                        overwrite: bool = False) -> str:
    """Score a folder of masks against every label of a converted dataset's ``training`` list (or, with ``fold``,
    of that cross-validation fold only: a validation split) with the benchmark's metrics
    (``custom.metrics.case_metrics``); writes ``out/cases.csv``, prints the means and returns its path.

    Why it exists: to score any tool's masks (the bundle's inference with other settings, the runner, nnU-Net,
    vendor software) on the same cases and metrics as ``accuracy-bench``; ``python -m custom compare-cv`` then
    compares two such folders case by case. A case's mask is ``<case>_seg.nii.gz`` (as ``inference.json`` and
    the runner name it) or ``<case>.nii.gz``, where ``<case>`` is the image's file name without ``.nii.gz``;
    a case without a mask, or with both, is an error, and an existing ``out/cases.csv`` is refused unless
    ``overwrite`` (then it is removed before the masks are scored: no earlier table stays beside this run's record).
    Beside it, ``out/score_masks_run.json`` records the dataset (its folder, dataset.json SHA-256 and the SHA-256 of
    its training cases, folds and labels, ``datalist.scored_dataset_sha256``: the part scored), the masks folder, the
    method and the fold, so that ``compare-cv`` refuses to pair the table with a run of another dataset, and pairs it
    with a cv run of the same dataset whose testing list differs (refused up to 0.3.15).
    """
    masks, dataset_dir, out = Path(masks), Path(dataset_dir), Path(out)
    dataset = load_dataset_json(dataset_dir, ("training",))
    entries = dataset["training"]
    if fold is not None:
        if not whole_number(fold):  # True == 1: --fold True scored fold 1
            raise ValueError(f"--fold must be a whole number, got {fold!r}")
        folds = sorted({e.get("fold") for e in entries}, key=str)
        entries = [e for e in entries if e.get("fold") == fold]
        if not entries:
            raise ValueError(f"fold {fold!r} not found in '{dataset_dir / 'dataset.json'}' (folds present: {folds})")

    def candidates(entry: dict) -> list[Path]:
        case = output_case_name(entry["image"])
        return [masks / f"{case}_seg.nii.gz", masks / f"{case}.nii.gz"]

    def mask_path(entry: dict) -> Path:
        return next((path for path in candidates(entry) if path.is_file()), candidates(entry)[0])

    missing = [str(mask_path(e)) for e in entries if not mask_path(e).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(entries)} cases of '{dataset_dir}' have no mask in "
                                f"'{masks}': {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # both names of one case (a mask corrected by hand saved beside the original): scoring either would be a guess
    doubled = [" and ".join(p.name for p in candidates(e)) for e in entries if all(p.is_file() for p in candidates(e))]
    if doubled:
        raise ValueError(f"'{masks}' holds two masks of {len(doubled)} case(s): {'; '.join(doubled[:5])}"
                         f"{' ...' if len(doubled) > 5 else ''}; keep one of each pair, or score each in a folder")
    # the dataset's label folder given as MASKS (`score-masks DS/labelsTr DS OUT`): each label was scored against
    # itself, Dice 1.000 on every case without a word
    labels = [str(mask_path(e)) for e in entries if mask_path(e).resolve() == (dataset_dir / e["label"]).resolve()]
    if labels:
        raise ValueError(f"{len(labels)} of the {len(entries)} masks in '{masks}' are the label files they would be "
                         f"scored against (e.g. '{labels[0]}'): pass the folder of the masks to score, not the "
                         "dataset's labels")
    refuse_earlier_outputs(out, [], overwrite, postfixes=(), tables=("cases.csv",), setting="--out")
    rows = score_masks(dataset_dir, entries, method, mask_path)
    record = {"dataset_dir": str(dataset_dir.resolve()), "masks": str(masks.resolve()), "method": method,
              "fold": fold, "dataset_json_sha256": file_sha256(dataset_dir / "dataset.json"),
              "scored_dataset_sha256": scored_dataset_sha256(dataset)}
    write_text_atomically(out / SCORE_RECORD, json.dumps(record, indent=2) + "\n")  # first: no table without it
    write_case_csv(rows, str(out / "cases.csv"))
    overall = summarise(rows, TABLE_METRICS, group_key="method")[-1]
    for metric in TABLE_METRICS:
        print(f"{metric}: {overall[f'{metric}_mean']:.3f} ± {overall[f'{metric}_std']:.3f} "
              f"(median {overall[f'{metric}_median']:.3f}, n={overall[f'{metric}_n']})")
    print(f"{counted(len(rows), 'case')} scored")
    return str(out / "cases.csv")


def describe(method: str, facts: dict) -> str:
    """The table's label of a method; a bundle run with overrides names them, since it is not train.json's defaults
    (a tuning run's table said it was)."""
    overrides = facts.get("overrides") or {}
    if method != "bundle" or not overrides:
        return DESCRIPTIONS[method]
    listed = " ".join(f"--{key} {value}" for key, value in overrides.items())
    return f"the bundle (train.json with {listed}, epochs fitted to the budget)"


def comparison_rows(cases: dict[str, list[dict]], facts: dict[str, dict], reference: str) -> list[dict]:
    """One row per method: mean, std and median of the table metrics over the test cases, HD95 over the cases
    where every method has one (``same_case_statistics``, so the means compare the same cases), and the paired Dice
    difference to ``reference``."""
    statistics = same_case_statistics(cases, TABLE_METRICS)
    result = []
    for method, rows in cases.items():
        row = {"method": method, "description": describe(method, facts.get(method, {})), "cases": len(rows),
               **statistics[method]}
        comparison = paired_comparison(cases[reference], rows, "dice")
        row.update({f"dice_vs_{reference}_{k}": v for k, v in comparison.items() if k != "metric"})
        row.update(facts.get(method, {}))
        result.append(row)
    return result


def comparison_markdown(rows: list[dict], reference: str) -> str:
    """The benchmark table: metric means ± std (median) and the paired Dice difference to ``reference``."""
    header = ["method", "test cases", "Dice", "HD95 mm (same cases)", "AVD mL", "lesion F1",
              f"Dice - {reference} (paired mean ± std; better / worse)", "training wall s", "epochs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['method']}: {row['description']}", str(row["cases"])]
        for metric in TABLE_METRICS:
            cell = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f} ({row[f'{metric}_median']:.3f})"
            cells.append(cell + (f", n={row[f'{metric}_n']}" if metric == "hd95_mm" else ""))
        prefix = f"dice_vs_{reference}_"
        cells.append(f"{row[prefix + 'mean_difference']:+.3f} ± {row[prefix + 'std_difference']:.3f}; "
                     f"{row[prefix + 'improved']} / {row[prefix + 'worse']}")
        cells.append(str(row.get("train_seconds", "-")))
        cells.append(str(row.get("epochs_run", "-")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the command


def run_accuracy_bench(
    out: str = "runs/accuracy",
    budget_s: int | None = None,
    quick: bool = False,
    methods: str | list[str] = ",".join(METHODS),
    train_cases: int | None = None,
    test_cases: int | None = None,
    size: int | None = None,
    train_seed: int = 2026,
    test_seed: int = 9026,
    monai_unet_val_interval: int | None = None,
    score_on: str = "test",
    **bundle_overrides,
) -> list[dict]:
    """Train every method for the same wall-clock budget on a training phantom and score it on a test phantom.

    Args:
        out: run folder: ``train/`` and ``test/`` (the phantoms), one folder per method (logs, models,
            ``masks/``, ``cases.csv``, ``facts.json``), and ``accuracy.md`` / ``accuracy.csv``.
        budget_s: training seconds per method (default 720; 15 with ``--quick``).
        quick: tiny sizes (8 training cases, 4 test cases, 64 x 64, small batches) for the end-to-end test.
        methods: comma-separated subset of bundle, monai_unet, nnunet_2d, threshold.
        train_cases, test_cases, size: phantom sizes (default 40, 60, 256).
        train_seed, test_seed: phantom seeds; they must differ, so the test patients are new patients.
        monai_unet_val_interval: epochs between validations of the plain recipe (default 5; 1 with ``--quick``).
        score_on: ``test``: segment and score the test phantom; ``inner``: segment and score the training
            phantom's inner validation fold instead (the cases that select the checkpoints), for choosing
            defaults without looking at the test phantom; nnU-Net, which predicts only the test phantom, is
            refused there.
        bundle_overrides: bundle overrides for the ``bundle`` method's training, e.g. ``--loss#ce_max_weight 1``;
            ``network_def#...``, ``num_workers``, the input settings (``contralateral_channels``,
            ``adjacent_slices``, ``spacing_mm``), ``lesion_threshold`` and ``min_lesion_ml`` reach its inference too.

    A method whose ``cases.csv`` exists in ``out`` is reused, not rerun (delete its folder to rerun); one whose
    ``facts.json`` records another budget, ``score_on``, plain-recipe validation interval or (bundle) other
    overrides is refused before any work, and so is a phantom of other settings. A method that fails is reported
    and the others still run; the command then raises.
    """
    if train_seed == test_seed:
        raise ValueError("train_seed and test_seed must differ: the test phantom must hold other patients")
    sizes = QUICK if quick else FULL
    budget_s = int(budget_s if budget_s is not None else (15 if quick else 720))
    if budget_s <= 0:
        raise ValueError(f"--budget_s must be a positive number of seconds, got {budget_s}")
    names = [m for m in (methods.split(",") if isinstance(methods, str) else list(methods)) if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if score_on not in ("test", "inner"):
        raise ValueError(f"--score_on must be 'test' or 'inner', got {score_on!r}")
    if score_on == "inner" and "nnunet_2d" in names:
        raise ValueError("--score_on inner: nnunet_2d predicts only the test phantom; leave it out of --methods")
    out = Path(out).resolve()
    overrides = {**(QUICK_BUNDLE_OVERRIDES if quick else {}), **bundle_overrides}
    val_interval = monai_unet_val_interval or (1 if quick else 5)

    def settings(method: str) -> dict:
        """What decides a method's results besides the phantoms, recorded in its facts.json and checked on reuse."""
        recorded = {"budget_s": budget_s if method != "threshold" else 0, "scored_on": score_on}
        if method == "bundle":
            recorded["overrides"] = json.loads(json.dumps(overrides, default=str))
        if method == "monai_unet":
            recorded["val_interval"] = val_interval
        return recorded

    for method in names:  # before any work: a reused method of other settings would be reported as this run's
        facts_file = out / method / "facts.json"
        if (out / method / "cases.csv").is_file():
            if not facts_file.is_file():  # its run stopped, or failed, between the two (run_baseline writes a table)
                raise ValueError(f"'{out / method}' holds a cases.csv but no facts.json, so its settings are unknown "
                                 "(a run that stopped or failed before recording them): delete the folder to rerun it")
            differences = _differences({"scored_on": "test", **json.loads(facts_file.read_text())}, settings(method))
            if differences:
                raise ValueError(f"'{out / method}' holds {method} results of other settings ({'; '.join(differences)}"
                                 f"; see '{facts_file}'): choose another --out, or delete the folder to rerun it")
    size = size or sizes["size"]
    train_folds = 2 if quick else 4  # fold 0 is the inner validation split
    train_dataset = phantom_dataset(out / "train", train_cases or sizes["train_cases"], train_seed, size, train_folds)
    if score_on == "test":
        scored_dataset = phantom_dataset(out / "test", test_cases or sizes["test_cases"], test_seed, size, 2)
        scored_entries = load_dataset_json(scored_dataset, ("training",))["training"]
        scored = f"{len(scored_entries)} test cases (phantom seed {test_seed})"
    else:
        scored_dataset = train_dataset
        scored_entries = [
            e for e in load_dataset_json(train_dataset, ("training",))["training"] if e["fold"] == INNER_VALIDATION_FOLD
        ]
        scored = f"the {len(scored_entries)} cases of the inner validation fold (not the test phantom)"

    def run_method(method: str, folder: Path) -> tuple[dict, object]:
        """Run one method; returns its facts and the function naming its mask of a scored entry."""
        masks = folder / "masks"
        by_case = lambda entry: masks / f"{entry['case']}.nii.gz"  # noqa: E731
        if method == "bundle":
            images = [str(scored_dataset / e["image"]) for e in scored_entries]
            facts = run_bundle(train_dataset, images, folder, budget_s, overrides)
            return facts, lambda entry: masks / f"{output_case_name(entry['image'])}_seg.nii.gz"
        if method == "monai_unet":
            facts = train_plain_unet(train_dataset, folder, budget_s, val_interval=val_interval,
                                     num_workers=0 if quick else 2)
            predict_plain_unet(folder / "model.pt", scored_entries, scored_dataset, masks)
            return facts, by_case
        if method == "nnunet_2d":
            return run_nnunet(train_dataset, scored_dataset, folder, budget_s, (5, 2) if quick else (50, 10)), by_case
        run_baseline(str(scored_dataset), str(folder), save_masks=True)
        return {}, by_case

    cases, facts, failures = {}, {}, {}
    for method in names:
        folder = out / method
        if (folder / "cases.csv").is_file():
            print(f"{method}: reusing '{folder / 'cases.csv'}'", flush=True)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                method_facts, mask_path = run_method(method, folder)
            except Exception as error:  # one failing peer must not cost the others' hours
                failures[method] = f"{type(error).__name__}: {error}"
                print(f"{method} FAILED: {failures[method]}", flush=True)
                continue
            method_facts = {**settings(method), **method_facts}
            write_text_atomically(folder / "facts.json", json.dumps(method_facts, indent=2, default=str))
            write_case_csv(score_masks(scored_dataset, scored_entries, method, mask_path), str(folder / "cases.csv"))
        cases[method] = read_case_csv(str(folder / "cases.csv"))
        facts[method] = json.loads((folder / "facts.json").read_text())

    if cases:
        reference = "bundle" if "bundle" in cases else next(iter(cases))
        rows = comparison_rows(cases, facts, reference)
        title = f"# Accuracy at a {budget_s} s training budget: {scored}, trained on phantom seed {train_seed}\n\n"
        write_case_csv(rows, str(out / "accuracy.csv"))
        write_markdown(title + comparison_markdown(rows, reference), str(out / "accuracy.md"))
        print(title + comparison_markdown(rows, reference))
    if failures:
        raise RuntimeError(f"methods failed: {failures}")
    return rows
