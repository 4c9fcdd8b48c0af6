"""The paper's loss ablation: the same cross-validation run once per loss, compared case by case.

Why it exists: the abstract's claim (WCE + GDL about 2 Dice points above cross-entropy) is a comparison of
whole cross-validations; this runs them with identical folds and budget and writes one table.
"""

import json
from pathlib import Path

from custom import accuracy_bench, baseline, crossval
from custom.crossval import run_cross_validation
from custom.data.datalist import dataset_key, refuse_earlier_file
from custom.deploy import is_refusal
from custom.reporting import paired_comparison, read_case_csv, same_case_statistics, write_case_csv, write_markdown
from custom.wording import counted

# Each variant is a set of bundle overrides of ``loss`` (train.json builds WeightedCEGeneralizedDiceLoss).
LOSS_VARIANTS = {
    "ce": {"loss#lambda_gdl": 0.0, "loss#ce_weight_mode": "fixed"},
    "gdl": {"loss#lambda_ce": 0.0},
    "wce_gdl": {"loss#ce_max_weight": 10.0},
    "wce3_gdl": {"loss#ce_max_weight": 3.0},
    "wce_boundary_gdl": {"loss#boundary_weight": 5.0},
    "dice_ce": {"loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True}},
}
DESCRIPTIONS = {
    "ce": "cross-entropy alone (uniform class weights)",
    "gdl": "generalized Dice alone",
    "wce_gdl": "batch-weighted CE (lesion weight capped at 10) + generalized Dice",
    "wce3_gdl": "batch-weighted CE (lesion weight capped at 3) + generalized Dice (bundle default)",
    "wce_boundary_gdl": "batch-weighted CE with boundary map (w0 = 5) + generalized Dice",
    "dice_ce": "MONAI DiceCELoss (reference)",
}
TABLE_METRICS = ("dice", "hd95_mm", "avd_ml", "lesion_f1")
# The tables of an ablation whose every variant finished.
ABLATION_FILES = ("ablation.csv", "ablation.md")


def run_ablation(
    dataset_dir: str,
    out: str,
    variants: str | list[str] = ",".join(LOSS_VARIANTS),
    reference: str = "ce",
    folds: int | None = None,
    config_files: str | list[str] = "",
    **overrides,
) -> list[dict]:
    """Cross-validate every loss variant into ``out/<variant>`` and write ``out/ablation.md`` and ``.csv``.

    ``variants`` picks from ``LOSS_VARIANTS`` (comma-separated); every variant gets the same folds and the
    same ``overrides`` (the budget: epochs, patch size, ...). Each row reports the mean ± std of the case metrics
    over the cases where every variant has a value (``same_case_statistics``; HD95 is undefined for an empty
    prediction) and the paired per-case Dice difference against ``reference``. Finished folds are reused;
    a variant folder holding a run of other settings is refused.

    A refusal of the first variant's cv is raised at once, before any work: a bad dataset, ``folds``, config file or
    override, which every variant would refuse. After it, a variant that fails (any fold, or its cv refusing its
    folder) stops no other: every variant runs, as cv runs every fold, and the failures are raised together at the
    end, each naming its variant and cv's error, with no table written (an earlier run's removed), so that the same
    command run again skips the finished folds of every variant.
    """
    names = [v for v in (variants.split(",") if isinstance(variants, str) else list(variants)) if v]
    unknown = [v for v in names + [reference] if v not in LOSS_VARIANTS]
    if unknown:
        raise ValueError(f"unknown loss variants {unknown}; choose from {list(LOSS_VARIANTS)}")
    if reference not in names:
        names.insert(0, reference)
    out = Path(out)
    cases, failures, first_error = {}, [], None
    for name in names:
        try:
            run_cross_validation(dataset_dir, str(out / name), folds=folds, config_files=config_files,
                                 **{**overrides, **LOSS_VARIANTS[name]})
            cases[name] = read_case_csv(str(out / name / "cases.csv"))
        except Exception as error:  # one variant's failure never stops the others; all are named at the end
            if name == names[0] and is_refusal(error):  # before any work: every variant would refuse it
                raise
            failures.append(f"{name}: " + str(error).replace("\n", "\n    "))
            first_error = first_error or error
            print(f"loss variant {name} failed; going on with the other variants", flush=True)
    crossval.raise_failures(
        failures, counted(len(names), "loss variant"), out, ABLATION_FILES, "ablation table", list(cases),
        "the finished folds of every variant are skipped", first_error,
    )
    rows = _table_rows({name: DESCRIPTIONS[name] for name in names}, cases, reference)

    csv_table, markdown_table = (str(out / name) for name in ABLATION_FILES)
    write_case_csv(rows, csv_table)
    write_markdown(ablation_markdown(rows, reference), markdown_table)
    print(ablation_markdown(rows, reference))
    return rows


def _table_rows(descriptions: dict[str, str], cases: dict[str, list[dict]], reference: str) -> list[dict]:
    """One table row per run: mean, std and count of ``TABLE_METRICS`` over the cases where every run has a value,
    and the paired Dice difference to ``reference``."""
    statistics = same_case_statistics(cases, TABLE_METRICS)
    rows = []
    for variant, description in descriptions.items():
        row = {"variant": variant, "description": description, "cases": len(cases[variant])}
        row.update({f"{m}_{s}": statistics[variant][f"{m}_{s}"] for m in TABLE_METRICS for s in ("mean", "std", "n")})
        comparison = paired_comparison(cases[reference], cases[variant], "dice")
        row.update({f"dice_vs_{reference}_{k}": v for k, v in comparison.items() if k != "metric"})
        rows.append(row)
    return rows


def ablation_markdown(rows: list[dict], reference: str) -> str:
    """One line per variant: mean ± std of the table metrics (", n=k" when only k of the cases have a value in
    every run) and the paired Dice difference to ``reference``."""
    header = ["variant", *TABLE_METRICS, f"Dice - {reference} (paired mean ± std)", "cases improved / worse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['variant']}: {row['description']}"]
        for m in TABLE_METRICS:
            defined = int(row[f"{m}_n"])
            cells.append(f"{row[f'{m}_mean']:.3f} ± {row[f'{m}_std']:.3f}"
                         + (f", n={defined}" if defined < int(row["cases"]) else ""))
        prefix = f"dice_vs_{reference}_"
        cells.append(f"{row[prefix + 'mean_difference']:+.3f} ± {row[prefix + 'std_difference']:.3f}")
        cells.append(f"{row[prefix + 'improved']} / {row[prefix + 'worse']} (of {row[prefix + 'cases']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _run_record(folder: Path) -> dict:
    """The run record of a ``cv``, ``baseline`` or ``score-masks`` folder, or {} without one."""
    for record in (folder / crossval.RUN_RECORD, folder / baseline.RUN_RECORD, folder / accuracy_bench.SCORE_RECORD):
        if record.is_file():
            return json.loads(record.read_text())
    return {}


def _refuse_other_datasets(first: Path, second: Path) -> None:
    """Refuse two runs whose records name different datasets: by the part of dataset.json that decides the folds'
    results where both records hold it (``datalist.scored_dataset_sha256``, in the records of cv, baseline and
    score-masks: two runs whose dataset.json differ in the testing list alone were refused), else (a record of an
    earlier version) by the whole file's SHA-256; a run without one passes."""
    records = [_run_record(first), _run_record(second)]
    key = dataset_key(*records)
    described = {"scored_dataset_sha256": "SHA-256 of the training cases, folds and labels of dataset.json",
                 "dataset_json_sha256": "dataset.json SHA-256"}[key]
    reference, other = (record.get(key) for record in records)
    if None not in (reference, other) and reference != other:
        # cv's tables hold no label_ml, so the same case names of another dataset were paired without a word
        raise ValueError(
            f"'{first}' and '{second}' ran on different datasets ({described} {reference} against {other} in their "
            "run records): compare runs of one dataset"
        )


def compare_cross_validations(
    reference: str, other: str, out: str | None = None, overwrite: bool = False
) -> list[dict]:
    """Case-by-case comparison of two ``python -m custom cv`` runs on the cases that ``other`` scored; any two
    folders with a ``cases.csv`` of the same cases work (e.g. two ``accuracy-bench`` method folders).

    Why it exists: a variant outside ``LOSS_VARIANTS`` (an override file, e.g. the hemisphere channels) is
    cross-validated with ``cv``, often on fewer folds (``--folds 2``) than the reference run; this compares
    the two on the cases both hold, with the table of ``ablation`` (distances over the cases where both have
    one). Every case of ``other`` must be in ``reference``; the reference's other cases are left out, and the
    table's first line says which folds remain. Two folders whose run records (cv, baseline, score-masks)
    name different datasets are refused (``_refuse_other_datasets``). Writes ``out`` (markdown) if given; an
    existing ``out`` is refused unless ``overwrite``.
    """
    if out:
        refuse_earlier_file(out, overwrite)
    runs = {"reference": Path(reference), "other": Path(other)}
    _refuse_other_datasets(runs["reference"], runs["other"])
    cases = {name: read_case_csv(str(folder / "cases.csv")) for name, folder in runs.items()}
    scored = {row["case"] for row in cases["other"]}
    missing = sorted(scored - {row["case"] for row in cases["reference"]})
    if missing:
        raise ValueError(f"'{runs['reference'] / 'cases.csv'}' has no rows for the cases {missing} of '{other}'")
    cases["reference"] = [row for row in cases["reference"] if row["case"] in scored]
    rows = _table_rows({name: str(folder) for name, folder in runs.items()}, cases, "reference")
    table = ablation_markdown(rows, "reference")
    folds = sorted({str(row["fold"]) for row in cases["other"] if "fold" in row})
    where = f" (folds {', '.join(folds)})" if folds else ""
    text = f"{counted(len(scored), 'case')}{where} scored by both runs\n\n{table}"
    if out:
        write_markdown(text, out)
    print(text)
    return rows
