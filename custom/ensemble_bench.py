"""Fold ensemble and flip test-time augmentation measured on a labelled dataset: Dice, calibration, volumes.

Why it exists: averaging the folds of a cross-validation and mirroring the input at test time cost N forward
passes per slice; this measures what they buy, on cases none of the folds was trained or selected on. For every
labelled case (dataset.json's ``training`` list) each fold model runs once per flip pass (the unflipped pass
and ``custom.ensemble.ALL_SLICE_FLIPS``), through the MONAI-free runner's preprocessing
(``custom.deploy.class_probabilities``, equal to inference.json's); the configurations are then averages of
those probability maps, exactly as ``custom.ensemble.ProbabilityEnsemble`` averages them:

- ``fold K``: fold K's model alone (1 pass); ``fold K + flips``: with flip test-time augmentation (4 passes);
- ``ensemble``: the mean probability of all folds (one pass each); ``ensemble + flips``: of all folds x flips.

Per configuration: Dice of the mask (``custom.metrics.case_metrics``, as the accuracy benchmark), the
expected calibration error of the lesion probability pooled over the brain voxels of all cases
(``custom.calibration``), the absolute lesion volume error of the mask and of the probabilities (sum p x voxel
volume), and, where N > 1, the mean uncertainty (std of the lesion probability over the N passes) on the brain
voxels the mask gets wrong and on those it gets right. The mask is that of the shipped inference: the mean lesion
probability above ``lesion_threshold`` without the lesions under ``min_lesion_ml`` (``custom.lesions``, the
functions of ``LesionMaskd``, ``RemoveSmallLesionsd`` and the runner; default: ``--config_file``'s settings).

``python -m custom ensemble-bench --help`` lists the options; docs/results.md has the command and results.
"""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from custom.atomic import require_writable_folder, write_text_atomically
from custom.calibration import DEFAULT_BINS, calibration_bins, ece_from_bins, probabilistic_volume_ml
from custom.clinical import brain_mask, voxel_volume_ml
from custom.config_check import whole_number
# refuse_unusable_cases: the screening of training and evaluation (one error naming every bad file)
from custom.data.datalist import load_dataset_json, refuse_earlier_outputs, refuse_unusable_cases
from custom.deploy import RUNNER_INPUT_SETTINGS, class_probabilities, read_case
from custom.ensemble import ALL_SLICE_FLIPS
from custom.handlers import load_network_checkpoint
from custom.lesions import check_lesion_threshold, check_min_volume, lesion_from_probabilities, remove_small_lesions
from custom.metrics import case_metrics
from custom.reporting import write_case_csv
from custom.training_record import case_digests, check_record, read_record, record_of, trained_images_among

BUNDLE_ROOT = Path(__file__).resolve().parent.parent / "bundle"
OUTPUTS = ("cases.csv", "summary.json", "summary.md")


class _FlippedNetwork:
    """``network`` on a flipped batch, its logits flipped back (softmax is per pixel, so this equals flipping the
    probabilities back, as ``ProbabilityEnsemble`` does)."""

    def __init__(self, network, dims: list[int]) -> None:
        self.network, self.dims = network, dims

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not self.dims:
            return self.network(batch)
        return torch.flip(self.network(torch.flip(batch, self.dims)), self.dims)


def fold_checkpoints(cv_dir, folds: int | None = None) -> list[Path]:
    """``cv_dir/fold_K/models/model.pt`` for K = 0 .. folds - 1 (default: every consecutive fold that has one, at
    least one)."""
    cv_dir = Path(cv_dir)
    if folds is None:
        folds = 0
        while (cv_dir / f"fold_{folds}" / "models" / "model.pt").is_file():
            folds += 1
    paths = [cv_dir / f"fold_{k}" / "models" / "model.pt" for k in range(int(folds))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(
            f"no fold model to score under '{cv_dir}' (fold_K/models/model.pt, as python -m custom cv writes them); "
            f"missing: {missing or [str(cv_dir / 'fold_0' / 'models' / 'model.pt')]}"
        )
    return paths


def _refuse_cases_the_folds_learnt(checkpoints: list[Path], dataset_dir: Path, cases: list[dict]) -> None:
    """Refuse to score ``cases`` of ``dataset_dir`` where a fold model's training record names any of their images
    (by their voxels: ``custom.training_record``): on the cross-validation's own dataset every case was learnt by
    all folds but one, and the bench reported the Dice of cases the models were trained on without a word. Fold
    models without a record, or with one of 0.3.12 and earlier (no images), are not checked."""
    digests = case_digests([{"image": str(dataset_dir / entry["image"])} for entry in cases])
    for path in checkpoints:
        record = read_record(path)
        shared = trained_images_among(record, digests) if record else []
        if shared:
            raise ValueError(
                f"fold model '{path}' was trained on {len(shared)} of the {len(cases)} cases to score in "
                f"'{dataset_dir / 'dataset.json'}' ({', '.join(shared)}; recorded in '{record_of(path)}'): their Dice "
                "would be that of cases it learnt; score a dataset none of the folds saw (e.g. the accuracy "
                "benchmark's test phantom, runs/accuracy/test/dataset)"
            )


def _configurations(folds: int, passes: int) -> dict[str, list[tuple[int, int]]]:
    """Configuration name -> the (fold, flip pass) probability maps it averages (passes = 1: no flips)."""
    configurations = {}
    for k in range(folds):
        configurations[f"fold {k}"] = [(k, 0)]
        if passes > 1:
            configurations[f"fold {k} + flips"] = [(k, f) for f in range(passes)]
    if folds > 1:  # with one fold, only the flips are measured
        configurations["ensemble"] = [(k, 0) for k in range(folds)]
        if passes > 1:
            configurations["ensemble + flips"] = [(k, f) for k in range(folds) for f in range(passes)]
    return configurations


def _summary(rows: list[dict], tables: dict, uncertainty: dict, configurations: dict) -> list[dict]:
    summary = []
    for name, members in configurations.items():
        own = [r for r in rows if r["configuration"] == name]
        entry = {"configuration": name, "predictions": len(members), "cases": len(own)}
        for column in ("dice", "avd_mask_ml", "avd_prob_ml"):
            entry[column] = float(np.nanmean([r[column] for r in own]))
        entry["ece"] = ece_from_bins(tables[name])
        wrong, right = uncertainty[name]
        entry["uncertainty_wrong"] = wrong[0] / wrong[1] if wrong[1] else math.nan
        entry["uncertainty_right"] = right[0] / right[1] if right[1] else math.nan
        summary.append(entry)
    singles = [e for e in summary if e["configuration"].startswith("fold ") and "+" not in e["configuration"]]
    flipped = [e for e in summary if e["configuration"].startswith("fold ") and "+" in e["configuration"]]
    groups = (("single fold (mean of folds)", singles), ("single fold + flips (mean of folds)", flipped))
    for label, group in [(label, group) for label, group in groups if group] if len(singles) > 1 else ():
        entry = {"configuration": label, "predictions": group[0]["predictions"], "cases": group[0]["cases"]}
        for column in ("dice", "avd_mask_ml", "avd_prob_ml", "ece", "uncertainty_wrong", "uncertainty_right"):
            entry[column] = float(np.mean([e[column] for e in group]))
        summary.append(entry)
    return summary


def _markdown(summary: list[dict], bins: int) -> str:
    lines = [
        f"| configuration | forward passes per slice | mean Dice | ECE ({bins} bins, brain voxels) | "
        "abs. volume error, mask (mL) | abs. volume error, sum of p (mL) | uncertainty on wrong / right voxels |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        spread = (
            "n/a" if math.isnan(e["uncertainty_wrong"])
            else f"{e['uncertainty_wrong']:.3f} / {e['uncertainty_right']:.3f}"
        )
        lines.append(
            f"| {e['configuration']} | {e['predictions']} | {e['dice']:.3f} | {e['ece']:.4f} | "
            f"{e['avd_mask_ml']:.2f} | {e['avd_prob_ml']:.2f} | {spread} |"
        )
    return "\n".join(lines) + "\n"


def _write_results(out: Path, rows, tables, uncertainty, configurations, bins: int, record: dict) -> list[dict]:
    """Write cases.csv, summary.json and summary.md of the cases scored so far; returns the summary rows."""
    summary = _summary(rows, tables, uncertainty, configurations)
    write_case_csv(rows, str(out / "cases.csv"))
    record["summary"] = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in e.items()} for e in summary
    ]
    write_text_atomically(out / "summary.json", json.dumps(record, indent=2) + "\n")
    write_text_atomically(out / "summary.md", _markdown(summary, int(bins)))
    return summary


def _inference_setting(parser, config_file, key: str, value):
    """``value``, or where it is None the inference config's ``key``: the masks are post-processed as inference does
    them (a config without it is refused, naming the file and the option to pass)."""
    if value is not None:
        return value
    if key not in parser:
        raise ValueError(f"'{config_file}' has no '{key}' to post-process the masks as inference does; pass --{key}")
    return parser.get_parsed_content(key)


def _refuse_bad_counts(**options) -> None:
    """Refuse a count option that is not a whole number >= 1 (None: its default), naming it: ``--max_cases -1``
    scored every case but the last without a word (a negative slice), ``--folds 0`` was reported as a missing
    ``fold_0`` model, and ``--batch_size 0``, ``--bins -3`` or ``--bins 2.5`` failed deep in ``range`` or numpy."""
    for name, value in options.items():
        if value is not None and not (whole_number(value) and value >= 1):
            raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}")


def run_ensemble_bench(
    cv_dir: str,
    dataset_dir: str,
    out: str,
    folds: int | None = None,
    config_file: str = str(BUNDLE_ROOT / "configs" / "inference.json"),
    bins: int = DEFAULT_BINS,
    batch_size: int = 16,
    device: str = "cpu",
    max_cases: int | None = None,
    flips: bool = True,
    min_lesion_ml: float | None = None,
    lesion_threshold: float | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Score each fold model alone and with flips, the fold ensemble and the ensemble with flips (two or more folds).

    Args:
        cv_dir: a ``python -m custom cv`` run folder (``fold_K/models/model.pt``).
        dataset_dir: a converted dataset whose ``training`` list holds the labelled cases to score; use one that
            none of the folds saw (e.g. the accuracy benchmark's test phantom).
        out: folder for ``cases.csv`` (per case and configuration), ``summary.json`` and ``summary.md``.
        folds: how many folds to use (default: every fold with a model).
        config_file: the inference config whose ``network_def`` the fold models fit and whose ``lesion_threshold``
            and ``min_lesion_ml`` are the default post-processing.
        bins: equal-width probability bins of the expected calibration error.
        batch_size: slices per forward pass.
        device: torch device.
        max_cases: score only the first ``max_cases`` labelled cases (default: all).
        flips: also score the flip test-time augmentation (4 passes per fold instead of 1).
        min_lesion_ml: predicted lesions (26-connected) smaller than this are removed from every configuration's
            mask before it is scored, as ``inference.json`` does (default: ``config_file``'s ``min_lesion_ml``, so
            the numbers are those of the shipped inference); 0 keeps every lesion.
        lesion_threshold: a voxel is lesion where its mean lesion probability is above this (default:
            ``config_file``'s ``lesion_threshold``, as inference; 0.5 is the argmax of the two classes).
        overwrite: replace the tables of an earlier run in ``out``; without it such a folder is refused before any
            work (a rerun with other folds or cases replaced a long run's tables without a word).

    Returns the summary rows (one per configuration, then the means of the single folds).
    """
    from monai.bundle import ConfigParser

    _refuse_bad_counts(folds=folds, bins=bins, batch_size=batch_size, max_cases=max_cases)
    checkpoints = fold_checkpoints(cv_dir, folds)
    dataset_dir = Path(dataset_dir)
    dataset = load_dataset_json(dataset_dir, ("training",))
    unlabelled = [e.get("case", e.get("image")) for e in dataset["training"] if not e.get("label")]
    if unlabelled:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}': training entries without a 'label': {unlabelled}")
    cases = dataset["training"] if max_cases is None else dataset["training"][:max_cases]
    if not cases:
        raise ValueError(f"'{dataset_dir / 'dataset.json'}' lists no case in 'training'")
    # a label of 0.5 was read as 0 (no lesion) and a label on another grid than its image (mirrored, its affine
    # adjusted) scored voxel by voxel, both without a word; a label of 255 stopped the run naming no file
    refuse_unusable_cases(
        dataset_dir, cases, lambda entry: f"dataset.json training case {entry.get('case', entry['image'])!r}",
        f"'{dataset_dir / 'dataset.json'}': cases to score", "Fix them, or score a dataset without them "
        "(`python -m custom check` lists every problem).",
    )
    _refuse_cases_the_folds_learnt(checkpoints, dataset_dir, cases)
    for path in checkpoints:  # each fold is fed as the runner feeds a model (read_case): the 5 maps on their own grid
        check_record(path, RUNNER_INPUT_SETTINGS, action="scored by ensemble-bench", otherwise=(
            "\nensemble-bench feeds every fold model the 5 maps on their own grid, as custom/deploy.py does; score "
            "folds trained with other input settings with python -m custom cv (evaluate.json), which takes these "
            "overrides"))
    refuse_earlier_outputs(out, [], overwrite, postfixes=(), tables=OUTPUTS, setting="--out")
    out = require_writable_folder(out)
    parser = ConfigParser()
    parser.read_config(str(config_file))
    min_lesion_ml = check_min_volume(_inference_setting(parser, config_file, "min_lesion_ml", min_lesion_ml))
    lesion_threshold = check_lesion_threshold(
        _inference_setting(parser, config_file, "lesion_threshold", lesion_threshold))
    networks = []
    for path in checkpoints:
        network = parser.get_parsed_content("network_def", lazy=False)
        load_network_checkpoint(path, network)
        networks.append(network.to(device).eval())
    passes = [[]] + ([[a + 2 for a in axes] for axes in ALL_SLICE_FLIPS] if flips else [])
    configurations = _configurations(len(networks), len(passes))
    tables = {name: np.zeros((int(bins), 3)) for name in configurations}
    uncertainty = {name: ([0.0, 0], [0.0, 0]) for name in configurations}  # (sum, count) on wrong, right voxels
    rows = []
    for number, entry in enumerate(cases, 1):
        volume, affine = read_case(dataset_dir / entry["image"])
        label = np.asanyarray(nib.load(dataset_dir / entry["label"]).dataobj).astype(np.uint8)  # screened: 0 or 1
        voxel_ml, brain = voxel_volume_ml(affine), brain_mask(volume)
        maps = {
            (k, f): class_probabilities(_FlippedNetwork(network, dims), volume, batch_size, device).numpy()
            for k, network in enumerate(networks)
            for f, dims in enumerate(passes)
        }
        for name, members in configurations.items():
            stacked = np.stack([maps[m] for m in members])  # (N, 2, H, W, D)
            mean = stacked.mean(axis=0)
            mask = remove_small_lesions(lesion_from_probabilities(mean, lesion_threshold, brain), affine, min_lesion_ml)
            lesion_probability = mean[1].clip(0.0, 1.0)
            dice = case_metrics(mask, label, affine, names=("dice",))["dice"]
            mask_ml, label_ml = mask.sum() * voxel_ml, label.sum() * voxel_ml
            prob_ml = probabilistic_volume_ml(lesion_probability, voxel_ml)
            rows.append(
                {
                    "configuration": name,
                    "case": entry.get("case", Path(entry["image"]).name),
                    "predictions": len(members),
                    "dice": dice,
                    "mask_ml": mask_ml,
                    "prob_ml": prob_ml,
                    "label_ml": label_ml,
                    "avd_mask_ml": abs(mask_ml - label_ml),
                    "avd_prob_ml": abs(prob_ml - label_ml),
                }
            )
            tables[name] += calibration_bins(lesion_probability, label, bins, mask=brain)
            if len(members) > 1:
                spread = stacked[:, 1].std(axis=0)
                wrong = (mask != label) & brain
                right = (mask == label) & brain
                for accumulator, voxels in zip(uncertainty[name], (wrong, right)):
                    accumulator[0] += float(spread[voxels].sum())
                    accumulator[1] += int(voxels.sum())
        print(f"[{number}/{len(cases)}] {entry.get('case', entry['image'])}", flush=True)
        # Written after every case, so an interrupted run leaves the results of the cases it finished.
        summary = _write_results(out, rows, tables, uncertainty, configurations, bins, {
            "cv_dir": str(cv_dir),
            "checkpoints": [str(p) for p in checkpoints],
            "dataset_dir": str(dataset_dir),
            "cases": number,
            "cases_listed": len(cases),
            "bins": int(bins),
            "min_lesion_ml": min_lesion_ml,
            "lesion_threshold": lesion_threshold,
            "flip_passes": [list(axes) for axes in ALL_SLICE_FLIPS] if flips else [],
        })  # fmt: skip
    print(_markdown(summary, int(bins)))
    return summary
