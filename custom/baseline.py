"""The clinical threshold rule every model must beat: ischemic core = rCBF < 30 % and Tmax > 6 s.

It runs on the converted dataset (layout in docs/data.md) and scores every training case with the same
per-case metrics and fold summaries as the cross-validation. The rule and its reasons: docs/metrics.md. The rule
itself (``threshold_core``) and the brain mask live in the MONAI-free ``custom.clinical``, which the inference
table uses too (its ``core_rule_ml`` column).
"""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically
from custom.clinical import HEALTHY_TMAX_S, RCBF_THRESHOLD, TMAX_THRESHOLD_S, brain_mask, threshold_core
from custom.data.datalist import load_dataset_json
from custom.metrics import METRIC_NAMES, case_metrics
from custom.reporting import summarise, summary_markdown, write_case_csv, write_markdown

logger = logging.getLogger(__name__)


def _channel_layout(modality: dict, path: str) -> dict:
    """Channel indices the rule needs, looked up by name in the dataset.json ``modality`` map: CBF, Tmax, the
    perfusion maps (every channel but CT) and the channel count."""
    indices = {name: int(index) for index, name in modality.items()}
    missing = [name for name in ("CT", "CBF", "Tmax") if name not in indices]
    if missing:
        raise KeyError(f"{path}: 'modality' has no {missing} channel(s); found {modality}.")
    return {
        "CBF": indices["CBF"],
        "Tmax": indices["Tmax"],
        "perfusion": sorted(index for name, index in indices.items() if name != "CT"),
        "channels": len(indices),
    }


def _baseline_case(entry: dict, dataset_dir: str, layout: dict, thresholds: dict) -> tuple[dict, nib.Nifti1Image]:
    """Apply the rule to one training entry; returns its metrics row and the predicted mask as a NIfTI image."""
    image_path = os.path.join(dataset_dir, entry["image"])
    label_path = os.path.join(dataset_dir, entry["label"])
    image = nib.load(image_path)
    if image.ndim != 4 or image.shape[3] != layout["channels"]:
        raise ValueError(f"{image_path}: expected a 4D (H, W, D, {layout['channels']}) image, got {image.shape}.")
    volume = image.get_fdata(dtype=np.float32)
    label = np.asanyarray(nib.load(label_path).dataobj)
    if label.shape != volume.shape[:3]:
        raise ValueError(f"{label_path}: label shape {label.shape} differs from the image's {volume.shape[:3]}.")
    if not np.isin(label, (0, 1)).all():
        raise ValueError(f"{label_path}: label values must be 0 and 1, got {np.unique(label).tolist()}.")

    brain = brain_mask(volume, layout["perfusion"])
    if not brain.any():
        raise ValueError(f"{image_path}: every perfusion map is zero, so there is no brain to threshold.")
    core, reference, used_fallback = threshold_core(
        volume[..., layout["CBF"]], volume[..., layout["Tmax"]], brain, **thresholds
    )
    if used_fallback:
        logger.warning(
            "%s: no brain voxel has Tmax < %s s; the CBF reference is the whole brain's median.",
            entry["case"],
            thresholds["healthy_tmax"],
        )
    spacing = nib.affines.voxel_sizes(image.affine)
    row = {"case": entry["case"], "patient": entry.get("patient", ""), "fold": entry["fold"]}
    row.update(case_metrics(core, label, spacing))
    row.update({"reference_cbf": reference, "reference_region": "whole_brain" if used_fallback else "tmax_below"})
    return row, nib.Nifti1Image(core.astype(np.uint8), image.affine)


def run_baseline(
    dataset_dir: str,
    out: str,
    rcbf_threshold: float = RCBF_THRESHOLD,
    tmax_threshold: float = TMAX_THRESHOLD_S,
    healthy_tmax: float = HEALTHY_TMAX_S,
    save_masks: bool = False,
) -> list[dict]:
    """Score the threshold rule on every training case of a converted dataset and write the tables.

    Writes ``out/cases.csv`` (one row per case, with its fold), ``out/summary.csv`` and ``out/summary.md``
    (per fold and overall), and with ``save_masks`` the predicted cores as ``out/masks/<case>.nii.gz`` (uint8,
    the image's affine). Nothing is written unless every case succeeds. Returns the summary rows.
    """
    dataset = load_dataset_json(dataset_dir, required_keys=("modality", "training"))
    json_path = os.path.join(dataset_dir, "dataset.json")
    layout = _channel_layout(dataset["modality"], json_path)
    thresholds = {"rcbf_threshold": rcbf_threshold, "tmax_threshold": tmax_threshold, "healthy_tmax": healthy_tmax}
    if not dataset["training"]:
        raise ValueError(f"{json_path} lists no training cases to score.")
    for number, entry in enumerate(dataset["training"]):
        missing = [key for key in ("image", "label", "case", "fold") if key not in entry]
        if missing:
            raise KeyError(f"{json_path}: training entry {number} has no {missing}.")

    rows, masks = [], {}
    for entry in dataset["training"]:
        row, mask = _baseline_case(entry, dataset_dir, layout, thresholds)
        rows.append(row)
        if save_masks:
            masks[entry["case"]] = mask
        logger.info("%s: Dice %.3f", entry["case"], row["dice"])
    # Written only once every case has succeeded, each file atomically.
    for case, mask in masks.items():
        write_atomically(os.path.join(out, "masks", f"{case}.nii.gz"), lambda temporary: nib.save(mask, temporary))

    summary = summarise(rows, METRIC_NAMES, group_key="fold")
    write_case_csv(rows, os.path.join(out, "cases.csv"))
    write_case_csv(summary, os.path.join(out, "summary.csv"))
    title = (
        f"# Threshold baseline: core = CBF < {rcbf_threshold:g} x reference and Tmax > {tmax_threshold:g} s; "
        f"reference = median CBF of brain voxels with Tmax < {healthy_tmax:g} s\n\n"
    )
    table = summary_markdown(summary, METRIC_NAMES, group_key="fold")
    write_markdown(title + table, os.path.join(out, "summary.md"))
    return summary
