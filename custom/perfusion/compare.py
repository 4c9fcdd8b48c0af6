"""``python -m custom perfusion compare-segmentation``: the bundle trained and evaluated on maps computed from
the 4D series against the same bundle on the given (vendor) maps, with the same folds.

Why it exists: whether the maps of custom/perfusion are good enough to replace the vendor's is a question about
segmentation, not about map bias alone. This converts one ISLES 2018 split twice (``prepare_isles2018`` with and
without ``maps_from_4d``), refuses to go on unless both conversions give every case the same patient and fold,
cross-validates the bundle on each (``run_cross_validation``, resumable), scores the threshold rule on each
(``run_baseline``) and compares the two case by case (``paired_comparison``).
"""

import json
from pathlib import Path

from custom.data.datalist import load_dataset_json
from custom.wording import counted

MAP_SOURCES = ("given", "computed")  # OUT/<source>/: dataset/, cv/, baseline/, conversion.json
METHODS = ("bundle", "threshold")
TABLE_METRICS = ("dice", "hd95_mm", "avd_ml", "lesion_f1")
PAIRED_METRICS = ("dice", "hd95_mm", "avd_ml")
CONVERSION_RECORD = "conversion.json"
# CT density (HU) below which a brain voxel counts as fluid (CSF: about 0-15 HU; grey and white matter 25-45 HU).
FLUID_HU = 20.0
DESCRIPTIONS = {
    ("bundle", "given"): "bundle recipe, given maps",
    ("bundle", "computed"): "bundle recipe, maps computed from the 4D series",
    ("threshold", "given"): "rCBF < 30 % within Tmax > 6 s, given maps",
    ("threshold", "computed"): "rCBF < 30 % within Tmax > 6 s, computed maps",
}


def fold_assignment(dataset_dir) -> dict[str, tuple[str, int]]:
    """``case -> (patient, fold)`` of a converted dataset's training list."""
    dataset = load_dataset_json(dataset_dir, ("training",))
    return {e["case"]: (str(e.get("patient", "")), int(e["fold"])) for e in dataset["training"]}


def require_same_folds(given_dir, computed_dir) -> dict[str, tuple[str, int]]:
    """The shared ``case -> (patient, fold)`` of two converted datasets, or a ValueError naming every case whose
    presence, patient or fold differs: a comparison over different folds would compare different training sets."""
    given, computed = fold_assignment(given_dir), fold_assignment(computed_dir)
    problems = [
        f"{case}: {given.get(case, 'absent')} in '{given_dir}', {computed.get(case, 'absent')} in '{computed_dir}'"
        for case in sorted(set(given) | set(computed))
        if given.get(case) != computed.get(case)
    ]
    if problems:
        raise ValueError(
            "the two conversions do not give the same (patient, fold) to every training case:\n  "
            + "\n  ".join(problems)
        )
    return given


def _convert(isles_dir: Path, folder: Path, settings: dict) -> Path:
    """Convert ``isles_dir`` into ``folder/dataset`` unless a conversion with the same settings is already there."""
    from custom.atomic import write_text_atomically
    from custom.data.isles2018 import prepare_isles2018

    dataset_dir, record = folder / "dataset", folder / CONVERSION_RECORD
    if (dataset_dir / "dataset.json").is_file() and record.is_file():
        recorded = json.loads(record.read_text())
        if recorded != settings:
            changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
            raise ValueError(
                f"'{dataset_dir}' was converted with other settings ({', '.join(changed)} differ, see '{record}'); "
                "write to a new --out folder or delete it to start over"
            )
        print(f"{folder.name}: reusing the conversion in '{dataset_dir}'", flush=True)
        return dataset_dir
    folder.mkdir(parents=True, exist_ok=True)
    prepare_isles2018(
        isles_dir,
        dataset_dir,
        patients=settings["patients"],
        folds=settings["folds"],
        seed=settings["fold_seed"],
        overwrite=True,  # an earlier attempt without a record is incomplete by definition
        maps_from_4d=settings["maps_from_4d"],
        dt=settings["dt"],
    )
    write_text_atomically(record, json.dumps(settings, indent=2) + "\n")
    return dataset_dir


def threshold_false_positives(dataset_dir, masks_dir, fluid_hu: float = FLUID_HU) -> dict:
    """Where the threshold rule's voxels outside the label lie, summed over the training cases of a dataset.

    ``masks_dir`` holds the rule's masks (``run_baseline(save_masks=True)``). Returns the voxel counts
    ``flagged`` (the rule's masks), ``false_positive`` (flagged outside the label), ``false_positive_fluid``
    (of those, CT < ``fluid_hu``) and ``brain_fluid_share``, the share of brain voxels (any perfusion map
    non-zero, as the rule's brain) with CT < ``fluid_hu``: what share of the false positives chance would put there.
    """
    import nibabel as nib
    import numpy as np

    dataset_dir, masks_dir = Path(dataset_dir), Path(masks_dir)
    dataset = load_dataset_json(dataset_dir, ("modality", "training"))
    channel = {name: int(index) for index, name in dataset["modality"].items()}
    perfusion = [index for name, index in channel.items() if name != "CT"]
    totals = dict.fromkeys(("flagged", "false_positive", "false_positive_fluid", "brain", "brain_fluid"), 0)
    for entry in dataset["training"]:
        image = nib.load(dataset_dir / entry["image"]).get_fdata(dtype=np.float32)
        label = np.asanyarray(nib.load(dataset_dir / entry["label"]).dataobj) > 0
        flagged = np.asanyarray(nib.load(masks_dir / f"{entry['case']}.nii.gz").dataobj) > 0
        brain = (image[..., perfusion] != 0).any(axis=-1)
        fluid = image[..., channel["CT"]] < fluid_hu
        counts = {
            "flagged": flagged,
            "false_positive": flagged & ~label,
            "false_positive_fluid": flagged & ~label & fluid,
            "brain": brain,
            "brain_fluid": brain & fluid,
        }
        for key, mask in counts.items():
            totals[key] += int(np.count_nonzero(mask))
    brain, brain_fluid = totals.pop("brain"), totals.pop("brain_fluid")
    return {**totals, "brain_fluid_share": brain_fluid / brain if brain else float("nan")}


def false_positive_markdown(counts: dict[str, dict], fluid_hu: float = FLUID_HU) -> str:
    """A table of ``threshold_false_positives`` per maps source."""
    lines = [
        f"| maps | voxels flagged by the rule | outside the label | of those, CT < {fluid_hu:g} HU (fluid) "
        f"| brain voxels with CT < {fluid_hu:g} HU |",
        "|---|---|---|---|---|",
    ]
    for source, c in counts.items():
        fluid_share = c["false_positive_fluid"] / c["false_positive"] if c["false_positive"] else float("nan")
        lines.append(
            f"| {source} | {c['flagged']} | {c['false_positive']} | {c['false_positive_fluid']} "
            f"({100 * fluid_share:.0f} %) | {100 * c['brain_fluid_share']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def comparison_rows(case_rows: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """One row per (method, maps source) with the mean, std and median of ``TABLE_METRICS`` over the cases where
    both sources of the method have a value (HD95 is undefined for an empty mask; each source was averaged over its
    own cases); each ``computed`` row also holds the paired per-case difference computed - given of
    ``PAIRED_METRICS``.

    ``case_rows``: (method, source) -> per-case metric rows (``cases.csv`` of cv or baseline); a method may be
    absent (``--cv_folds 0``).
    """
    from custom.reporting import STATISTICS, paired_comparison, same_case_statistics

    rows = []
    for method in (m for m in METHODS if (m, "given") in case_rows):
        sources = {source: case_rows[(method, source)] for source in MAP_SOURCES}
        statistics = same_case_statistics(sources, TABLE_METRICS)
        for source in MAP_SOURCES:
            cases = case_rows[(method, source)]
            row = {"method": method, "maps": source, "description": DESCRIPTIONS[(method, source)]}
            row["cases"] = len(cases)
            for metric in TABLE_METRICS:
                row.update({f"{metric}_{s}": statistics[source][f"{metric}_{s}"] for s in STATISTICS})
            if source != "given":
                for metric in PAIRED_METRICS:
                    paired = paired_comparison(case_rows[(method, "given")], cases, metric)
                    row.update({f"{metric}_vs_given_{k}": v for k, v in paired.items() if k != "metric"})
            rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    """The table of ``comparison_rows``: mean ± std (median) per metric, then the paired differences."""
    header = ["method and maps", "cases", *TABLE_METRICS]
    header += [f"{m}: computed - given (paired mean ± std; better / worse)" for m in PAIRED_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["description"], str(row["cases"])]
        for metric in TABLE_METRICS:
            cell = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f} ({row[f'{metric}_median']:.3f})"
            if int(row[f"{metric}_n"]) < int(row["cases"]):
                cell += f", n={row[f'{metric}_n']}"
            cells.append(cell)
        for metric in PAIRED_METRICS:
            prefix = f"{metric}_vs_given_"
            if prefix + "mean_difference" not in row:
                cells.append("")
                continue
            cells.append(
                f"{row[prefix + 'mean_difference']:+.3f} ± {row[prefix + 'std_difference']:.3f}; "
                f"{row[prefix + 'improved']} / {row[prefix + 'worse']} of {row[prefix + 'cases']}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _side_by_side(folds: dict[str, tuple[str, int]], case_rows: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """One row per case: patient, fold and the Dice of every (method, source), for ``comparison_cases.csv``."""
    dice = {key: {r["case"]: float(r["dice"]) for r in rows} for key, rows in case_rows.items()}
    return [
        {"case": case, "patient": patient, "fold": fold}
        | {f"dice_{m}_{s}": dice[(m, s)].get(case, "") for m, s in case_rows}  # "": fold not run
        for case, (patient, fold) in folds.items()
    ]


def compare_segmentation(
    isles_dir: str,
    out: str,
    patients: str | None = None,
    folds: int = 4,
    fold_seed: int = 0,
    dt: float | None = None,
    config_files: str | list[str] = "",
    cv_folds: int | None = None,
    **overrides,
) -> list[dict]:
    """Cross-validate the bundle on maps computed from the 4D series and on the given maps, same folds; compare.

    Args:
        isles_dir: ISLES 2018 split folder holding case_* with CT, CT_4DPWI, the four maps and OT (e.g.
            ISLES2018/TRAINING). Only the labelled cases are used.
        out: run folder. ``out/given/`` and ``out/computed/`` each hold ``dataset/`` (the conversion),
            ``cv/`` (the cross-validation) and ``baseline/`` (the threshold rule); ``out/comparison.md``,
            ``out/comparison.csv`` and ``out/comparison_cases.csv`` hold the comparison.
        patients: CSV with columns ``case`` and ``patient`` (as ``prepare isles2018 --patients``); without it
            the patients are guessed from the slab geometry, the same way for both conversions.
        folds: number of cross-validation folds.
        fold_seed: seed of the fold assignment (``prepare isles2018 --seed``); ``--seed`` is the bundle's.
        dt: time step (s) of the 4D series whose headers lack it.
        config_files: extra bundle configs over train.json for both cross-validations (e.g.
            ``bundle/configs/demo.json`` for the CPU budget).
        cv_folds: cross-validate only the first ``cv_folds`` folds (default: all), for a quicker, partial
            comparison: the bundle rows then cover those folds' cases; the threshold rule always scores every
            case. 0: no cross-validation, only the conversions, the fold check and the threshold rule (minutes).
        overrides: bundle overrides for both cross-validations (``--epochs 300``, ...); checked before the
            conversions start, so a mistyped one costs nothing.

    Resumable: a finished conversion (recorded in ``conversion.json``) is reused, finished folds are skipped
    and interrupted ones resume, as in ``python -m custom cv``. Returns the rows of ``comparison.csv``.
    """
    from custom.atomic import require_writable_folder
    from custom.baseline import run_baseline
    from custom.crossval import BUNDLE_ROOT, FOLD_IDS, check_overrides, run_cross_validation
    from custom.reporting import read_case_csv, write_case_csv, write_markdown

    isles_dir, out = Path(isles_dir).resolve(), require_writable_folder(out)
    settings = {
        "isles_dir": str(isles_dir),
        "patients": str(Path(patients).resolve()) if patients is not None else None,
        "folds": folds,
        "fold_seed": fold_seed,
        "dt": dt,
    }
    extra = [c for c in (config_files.split(",") if isinstance(config_files, str) else config_files) if c]
    configs = [str(BUNDLE_ROOT / "configs" / name) for name in ("train.json", "evaluate.json")]
    configs[1:1] = [str(Path(c).resolve()) for c in extra]
    fold_overrides = [key for key in overrides if key in FOLD_IDS]
    if fold_overrides:
        raise ValueError(f"cv sets {fold_overrides} itself for each fold under OUT; drop these overrides")
    paths = {"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(out / "given" / "dataset")}
    check_overrides(configs, paths, overrides)  # before hours of conversion, not after
    datasets = {
        source: _convert(isles_dir, out / source, {**settings, "maps_from_4d": source == "computed"})
        for source in MAP_SOURCES
    }
    shared_folds = require_same_folds(datasets["given"], datasets["computed"])
    print(
        f"same patients and folds in both conversions: {counted(len(shared_folds), 'training case')} in "
        f"{counted(len({f for _, f in shared_folds.values()}), 'fold')}",
        flush=True,
    )

    case_rows, false_positives = {}, {}
    for source in MAP_SOURCES:
        baseline = out / source / "baseline"
        run_baseline(str(datasets[source]), str(baseline), save_masks=True)
        case_rows[("threshold", source)] = read_case_csv(str(baseline / "cases.csv"))
        false_positives[source] = threshold_false_positives(datasets[source], baseline / "masks")
    for source in MAP_SOURCES if cv_folds != 0 else ():
        cv_dir = out / source / "cv"
        run_cross_validation(str(datasets[source]), str(cv_dir), folds=cv_folds, config_files=config_files, **overrides)
        case_rows[("bundle", source)] = read_case_csv(str(cv_dir / "cases.csv"))

    rows = comparison_rows(case_rows)
    table = comparison_markdown(rows)
    write_case_csv(rows, str(out / "comparison.csv"))
    write_case_csv(_side_by_side(shared_folds, case_rows), str(out / "comparison_cases.csv"))
    run = {None: "cross-validated on every fold", 0: "not run (--cv_folds 0)"}.get(
        cv_folds, f"cross-validated on the first {cv_folds} fold(s) only"
    )
    title = (
        f"# Segmentation on maps computed from the 4D series vs the given maps\n\n"
        f"{len(shared_folds)} training cases of '{isles_dir}', the same {folds} patient-grouped folds for both; "
        f"the bundle {run}; paired differences are computed - given over the cases where "
        "both are defined.\n\n"
    )
    voxels = (
        "\nThe threshold rule's voxels outside the label, summed over the cases, and how many of them lie in "
        "fluid by the CT:\n\n" + false_positive_markdown(false_positives)
    )
    write_markdown(title + table + voxels, str(out / "comparison.md"))
    print(table + voxels)
    return rows
