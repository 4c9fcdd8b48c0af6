"""The clinical threshold rule every model must beat: ischemic core = rCBF < 30 % and Tmax > 6 s.

It runs on the converted dataset (layout in docs/data.md) and scores every training case with the same
per-case metrics and fold summaries as the cross-validation. The rule and its reasons: docs/metrics.md. The rule
itself (``threshold_core``) and the brain mask live in the MONAI-free ``custom.clinical``, which the inference
table uses too (its ``core_rule_ml`` column).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import write_atomically, write_text_atomically
from custom.clinical import (
    HEALTHY_TMAX_S,
    RCBF_THRESHOLD,
    TMAX_THRESHOLD_S,
    brain_mask,
    threshold_core,
    tmax_unit_problem,
)
from custom.crossval import file_sha256
# refuse_unusable_cases: the screening of training and evaluation (one error naming every bad file)
from custom.data.datalist import dataset_key, load_dataset_json, refuse_unusable_cases, scored_dataset_sha256
from custom.metrics import METRIC_NAMES, case_metrics
from custom.reporting import summarise, summary_markdown, write_case_csv, write_markdown

logger = logging.getLogger(__name__)

# What a run writes under --out; RUN_RECORD holds the settings that made them.
RUN_RECORD = "baseline_run.json"
OUTPUTS = ("cases.csv", "summary.csv", "summary.md", "masks", RUN_RECORD)


def _checked_thresholds(rcbf_threshold, tmax_threshold, healthy_tmax) -> dict:
    """The rule's thresholds as floats, or a ValueError naming the option and its valid range: ``--rcbf_threshold``
    is a fraction of the reference CBF in (0, 1) (0.3, not 30), the Tmax thresholds are seconds > 0, and healthy
    tissue (``--healthy_tmax``) must not reach into the hypoperfused range (``--tmax_threshold``)."""
    values = {}
    for name, value in (("rcbf_threshold", rcbf_threshold), ("tmax_threshold", tmax_threshold),
                        ("healthy_tmax", healthy_tmax)):
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            values[name] = math.nan
        if isinstance(value, bool) or not math.isfinite(values[name]):
            raise ValueError(f"--{name} must be a number, got {value!r}")
    if not 0 < values["rcbf_threshold"] < 1:
        raise ValueError(f"--rcbf_threshold is a fraction of the reference CBF, between 0 and 1 exclusive "
                         f"(0.3 for 30 %), got {rcbf_threshold!r}")
    for name in ("tmax_threshold", "healthy_tmax"):
        if values[name] <= 0:
            raise ValueError(f"--{name} is a Tmax in seconds, greater than 0, got {values[name]:g}")
    if values["healthy_tmax"] > values["tmax_threshold"]:
        raise ValueError(f"--healthy_tmax ({values['healthy_tmax']:g} s) must not exceed --tmax_threshold "
                         f"({values['tmax_threshold']:g} s): the CBF reference would include hypoperfused tissue")
    return values


def _refuse_earlier_run(out: str, record: dict) -> None:
    """Refuse an ``out`` holding the outputs of an earlier run made with other settings (or of unknown settings),
    naming the folder and the file; a rerun with the same dataset, thresholds and ``save_masks`` rewrites the
    same results (``python -m custom perfusion compare-segmentation`` resumes that way). The dataset is the same when
    the part of dataset.json the rule scores is (``datalist.scored_dataset_sha256``: its training cases, folds,
    labels, modalities), as for cv: a changed testing list or description was refused up to 0.3.15; a record of
    then, without that hash, is compared by the whole file's SHA-256."""
    found = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
    if not found:
        return
    record_path = os.path.join(out, RUN_RECORD)
    try:
        with open(record_path, encoding="utf-8") as file:
            same = _same_settings(json.load(file), record)
    except (OSError, ValueError):
        same = False
    if not same:
        raise FileExistsError(
            f"'{out}' holds the outputs of an earlier baseline run with other or unrecorded settings "
            f"('{os.path.join(out, found[0])}'); choose another --out, or remove that run's files first"
        )


def _same_settings(recorded: dict, record: dict) -> bool:
    """Whether the earlier run's ``recorded`` settings are ``record``'s, its dataset compared as ``_refuse_earlier_run``
    says."""
    if not isinstance(recorded, dict):
        return False
    settings = [key for key in record if key not in ("dataset_json_sha256", "scored_dataset_sha256")]
    compared = settings + [dataset_key(recorded)]
    return set(recorded) <= set(record) and all(recorded.get(key) == record[key] for key in compared)


def _channel_layout(modality: dict, path: str) -> dict:
    """Channel indices the rule needs, looked up by name in the dataset.json ``modality`` map: CBF, Tmax and the
    perfusion maps (every channel but CT)."""
    indices = {name: int(index) for index, name in modality.items()}
    missing = [name for name in ("CT", "CBF", "Tmax") if name not in indices]
    if missing:
        raise ValueError(f"{path}: 'modality' has no {missing} channel(s); found {modality}.")
    return {
        "CBF": indices["CBF"],
        "Tmax": indices["Tmax"],
        "perfusion": sorted(index for name, index in indices.items() if name != "CT"),
    }


def _baseline_case(entry: dict, dataset_dir: str, layout: dict, thresholds: dict) -> tuple[dict, nib.Nifti1Image]:
    """Apply the rule to one training entry; returns its metrics row and the predicted mask as a NIfTI image."""
    image_path = os.path.join(dataset_dir, entry["image"])
    label_path = os.path.join(dataset_dir, entry["label"])
    image = nib.load(image_path)  # screened by refuse_unusable_cases: readable, finite, on its label's grid
    volume = image.get_fdata(dtype=np.float32)
    label = np.asanyarray(nib.load(label_path).dataobj)

    brain = brain_mask(volume, layout["perfusion"])
    unit_problem = tmax_unit_problem(volume[..., layout["Tmax"]], brain)
    if unit_problem:
        raise ValueError(f"{image_path}: {unit_problem}; the rule's thresholds are in seconds.")
    core, reference, used_fallback = threshold_core(
        volume[..., layout["CBF"]], volume[..., layout["Tmax"]], brain, **thresholds
    )
    if used_fallback:
        logger.warning(
            "%s: no brain voxel has Tmax < %s s; the CBF reference is the whole brain's median.",
            entry["case"],
            thresholds["healthy_tmax"],
        )
    row = {"case": entry["case"], "patient": entry.get("patient", ""), "fold": entry["fold"]}
    row.update(case_metrics(core, label, image.affine))
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
    the image's affine), and ``out/baseline_run.json`` (the dataset, the SHA-256 of its dataset.json and of the part
    of it that is scored, ``datalist.scored_dataset_sha256``, the thresholds).
    Nothing is written unless every case succeeds. The thresholds are checked first (``_checked_thresholds``); an
    ``out`` holding an earlier run's outputs is refused unless that run had the same record. Prints the summary
    table and returns its rows.
    """
    thresholds = _checked_thresholds(rcbf_threshold, tmax_threshold, healthy_tmax)
    dataset = load_dataset_json(dataset_dir, required_keys=("modality", "training"))
    json_path = os.path.join(dataset_dir, "dataset.json")
    layout = _channel_layout(dataset["modality"], json_path)
    record = {"dataset_dir": os.path.abspath(dataset_dir), "dataset_json_sha256": file_sha256(json_path),
              "scored_dataset_sha256": scored_dataset_sha256(dataset), **thresholds, "save_masks": bool(save_masks)}
    _refuse_earlier_run(out, record)
    if not dataset["training"]:
        raise ValueError(f"{json_path} lists no training cases to score.")
    for number, entry in enumerate(dataset["training"]):
        missing = [key for key in ("image", "label", "case", "fold") if key not in entry]
        if missing:
            raise ValueError(f"{json_path}: training entry {number} has no {missing}.")
    # a label on another grid than its image (mirrored, its affine adjusted) or an image holding NaN was scored
    # without a word, and a truncated file died in nibabel's gzip reader
    refuse_unusable_cases(
        Path(dataset_dir), dataset["training"], lambda entry: f"dataset.json training case {entry['case']!r}",
        f"'{json_path}': training cases of the baseline", "Fix or remove these cases from dataset.json "
        "(`python -m custom check` lists every problem).",
    )

    rows, masks = [], {}
    for entry in dataset["training"]:
        row, mask = _baseline_case(entry, dataset_dir, layout, thresholds)
        rows.append(row)
        if save_masks:
            masks[entry["case"]] = mask
        logger.info("%s: Dice %.3f", entry["case"], row["dice"])
    # Written only once every case has succeeded, each file atomically; the record first, so that an interrupted
    # run can be rerun with the same settings.
    write_text_atomically(os.path.join(out, RUN_RECORD), json.dumps(record, indent=2) + "\n")
    for case, mask in masks.items():
        write_atomically(os.path.join(out, "masks", f"{case}.nii.gz"), lambda temporary: nib.save(mask, temporary))

    summary = summarise(rows, METRIC_NAMES, group_key="fold")
    write_case_csv(rows, os.path.join(out, "cases.csv"))
    write_case_csv(summary, os.path.join(out, "summary.csv"))
    title = (
        f"# Threshold baseline: core = CBF < {thresholds['rcbf_threshold']:g} x reference and Tmax > "
        f"{thresholds['tmax_threshold']:g} s; reference = median CBF of brain voxels with Tmax < "
        f"{thresholds['healthy_tmax']:g} s\n\n"
    )
    table = summary_markdown(summary, METRIC_NAMES, group_key="fold")
    write_markdown(title + table, os.path.join(out, "summary.md"))
    print(title + table)  # the command's only output: `python -m custom` does not print the returned rows
    return summary
