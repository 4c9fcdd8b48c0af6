"""Figures of a cross-validation run: learning curves per fold and a montage of best, median and worst cases.

Why it exists: MONAI writes TensorBoard logs and masks, but the results page needs static PNGs made by a
command anyone can re-run. matplotlib is imported inside the functions (the ``figures`` extra).
"""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically
from custom.data.datalist import dataset_key, load_dataset_json, scored_dataset_sha256
from custom.reporting import read_case_csv


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files in ``log_dir``, as (epoch, value) pairs sorted by epoch.

    A resumed fold logs the epochs after its checkpoint again, into a second event file beside the interrupted
    run's: of an epoch logged more than once, the value with the latest wall time (the last run's) is kept, so
    the curve is what the final run did, not both runs drawn over each other."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, dict[int, tuple[float, float]]] = {}  # tag -> epoch -> (wall time, value)
    for event_file in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps = latest.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                if event.step not in steps or event.wall_time >= steps[event.step][0]:
                    steps[event.step] = (event.wall_time, event.value)
    return {tag: [(step, steps[step][1]) for step in sorted(steps)] for tag, steps in latest.items()}


def plot_curves(cv_dir: str, out: str) -> str:
    """Training loss and validation Dice per epoch for every fold of a ``python -m custom cv`` run."""
    plt = _pyplot()
    fold_dirs = sorted(Path(cv_dir).glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    if not fold_dirs:
        raise FileNotFoundError(f"no fold_* folders in '{cv_dir}'")
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for fold_dir in fold_dirs:
        series = _scalars(fold_dir / "train")
        for axis, tag in ((loss_axis, "train_loss"), (dice_axis, "val_mean_dice")):
            if tag not in series:
                raise ValueError(f"'{fold_dir / 'train'}' has no '{tag}' scalars")
            epochs, values = zip(*series[tag])
            # a line through one point is invisible: the loss of a one-epoch fold is drawn as its marker
            marker = "." if tag == "val_mean_dice" or len(epochs) == 1 else None
            axis.plot(epochs, values, marker=marker, label=fold_dir.name)
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="loss")  # any loss: ablation variants, overrides
    dice_axis.set(title="validation Dice (per volume, 3D)", xlabel="epoch", ylabel="mean Dice", ylim=(0, 1))
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    write_atomically(out, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
    return out


def _lesion_slice(label: np.ndarray, pred: np.ndarray) -> int:
    area = (label > 0).sum(axis=(0, 1)) + (pred > 0).sum(axis=(0, 1))
    return int(area.argmax())


def require_cv_dataset(cv_dir: Path, dataset_dir: Path) -> None:
    """Refuse a ``dataset_dir`` whose dataset.json is not the one the cross-validation in ``cv_dir`` ran on, by the
    SHA-256 its ``run_configuration.json`` records (``custom.crossval.run_configuration``): another dataset would
    pair its images and labels with the cv's Dice and masks. It compares the part that decides the folds' results
    (``scored_dataset_sha256``: training cases, folds, labels) where the record holds it (from 0.3.15), the whole
    file otherwise: a testing list changed after the run pairs nothing otherwise. A ``cv_dir`` without that record
    is refused too."""
    from custom.crossval import RUN_RECORD
    from custom.crossval import file_sha256

    record_path = cv_dir / RUN_RECORD
    try:
        record = json.loads(record_path.read_text())
        key = dataset_key(record)
        recorded = record.get(key)
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"cannot read the dataset of the cv run '{cv_dir}' from '{record_path}' ({err}); "
                         "it is written by python -m custom cv") from err
    if not recorded:
        raise ValueError(f"'{record_path}' records no dataset_json_sha256: cannot check the cv run's dataset")
    current = (scored_dataset_sha256(load_dataset_json(dataset_dir)) if key == "scored_dataset_sha256"
               else file_sha256(dataset_dir / "dataset.json"))
    if current != recorded:
        part = "its training cases, folds or labels differ from" if key == "scored_dataset_sha256" else \
            "its SHA-256 differs from"
        raise ValueError(f"'{dataset_dir / 'dataset.json'}' is not the dataset.json the cv run '{cv_dir}' used "
                         f"({part} the one recorded in '{record_path}'); pass that run's dataset")


def plot_montage(cv_dir: str, dataset_dir: str, out: str) -> str:
    """Best, median and worst validation case by Dice: CT and Tmax with the label and prediction outlined.
    ``dataset_dir`` must be the dataset the cv run used (``require_cv_dataset``)."""
    plt = _pyplot()
    cv_dir, dataset_dir = Path(cv_dir), Path(dataset_dir)
    entries = {e["case"]: e for e in load_dataset_json(dataset_dir, ("training",))["training"]}
    require_cv_dataset(cv_dir, dataset_dir)
    scored, unranked = [], []
    for row in read_case_csv(str(cv_dir / "cases.csv")):
        (unranked if math.isnan(float(row["dice"])) else scored).append(row)
    if unranked:
        names = ", ".join(r["case"] for r in unranked)
        print(f"montage: {len(unranked)} case(s) without a Dice (NaN) left out of the ranking: {names}")
    if not scored:
        raise ValueError(f"'{cv_dir / 'cases.csv'}' has no case with a Dice to rank")
    lesion_rows = [r for r in scored if nib.load(dataset_dir / entries[r["case"]]["label"]).get_fdata().any()]
    ranked = sorted(lesion_rows or scored, key=lambda r: float(r["dice"]))
    picks = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    figure, axes = plt.subplots(len(picks), 2, figsize=(7, 3.4 * len(picks)))
    for row_axes, (title, row) in zip(axes, picks.items()):
        entry = entries[row["case"]]
        image = np.asarray(nib.load(dataset_dir / entry["image"]).dataobj, dtype=np.float32)
        label = np.asarray(nib.load(dataset_dir / entry["label"]).dataobj)
        mask_file = cv_dir / f"fold_{row['fold']}" / "eval" / "masks" / f"{row['case']}_seg.nii.gz"
        pred = np.asarray(nib.load(mask_file).dataobj)
        z = _lesion_slice(label, pred)
        for axis, channel, name, window in ((row_axes[0], 0, "CT", (0, 80)), (row_axes[1], 4, "Tmax", (0, 15))):
            axis.imshow(np.rot90(image[:, :, z, channel]), cmap="gray" if channel == 0 else "magma", clim=window)
            axis.contour(np.rot90(label[:, :, z]), levels=[0.5], colors="lime", linewidths=1.2)
            axis.contour(np.rot90(pred[:, :, z]), levels=[0.5], colors="red", linewidths=1.2, linestyles="--")
            axis.set_title(f"{title}: {row['case']} (fold {row['fold']}), {name}, Dice {float(row['dice']):.2f}")
            axis.axis("off")
    figure.suptitle("label (green) and prediction (red, dashed)")
    figure.tight_layout()
    write_atomically(out, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
    return out
