"""The Dice ceiling of a phantom cohort: its labels scored against what noise-free maps could tell of them.

Why it exists: the phantom's follow-up lesion has parts that no perfusion map shows (each patient's scatter
about the growth threshold that the collaterals predict, an irregular boundary term, lacunes), so every
method's Dice on the phantom stays below 1 however well it learns. The accuracy benchmark's margins between
methods are read against this ceiling (docs/results.md).
"""

from pathlib import Path

from custom.data.datalist import refuse_earlier_outputs
from custom.data.phantom import iter_cohort, lesion_mask, observable_lesion_mask, slab_model
from custom.metrics import case_metrics
from custom.reporting import summarise, summary_markdown, write_case_csv, write_markdown

CEILING_METRICS = ("dice", "hd95_mm", "avd_ml", "lesion_f1")
OUTPUTS = ("cases.csv", "ceiling.md")


def phantom_ceiling(out: str, cases: int = 60, seed: int = 9026, size: int = 256,
                    threshold_shift: float = 0.0, overwrite: bool = False) -> list[dict]:
    """Score ``observable_lesion_mask`` against the label of every case of a phantom cohort.

    Args:
        out: folder for ``cases.csv`` (one row per case, the columns of the accuracy benchmark's ``cases.csv``,
            so ``python -m custom compare-cv`` pairs it with any method there) and ``ceiling.md``.
        cases, seed, size: the cohort, as ``write_phantom --cases N --test_cases 0`` draws it; the defaults are
            the accuracy benchmark's test phantom (60 cases, seed 9026, 256 x 256).
        threshold_shift: added to every patient's expected growth threshold (severity units): a negative shift
            predicts a little more growth, which the invisible terms can reward; scanning it shows how far the
            estimate moves.
        overwrite: replace the tables of an earlier run in ``out``; without it such a folder is refused before any
            work (a scan of shifts into one --out replaced the earlier shift's tables without a word).

    Nothing is written to disk but the two files: the noise-free model of each slab is drawn again from the
    seed, exactly as ``write_phantom`` draws it, and its voxels are the label's voxels.
    """
    refuse_earlier_outputs(out, [], overwrite, postfixes=(), tables=OUTPUTS, setting="--out")
    rows = []
    for slab in iter_cohort(seed, cases, 0):
        model = slab_model(slab, size)
        label = lesion_mask(slab.patient, model.tissue, model.severity, model.x, model.y, model.z)
        observable = observable_lesion_mask(slab.patient, model.tissue, model.severity, threshold_shift)
        row = {"method": "observable", "case": slab.case, "patient": slab.patient.name}
        row.update(case_metrics(observable, label, model.affine))
        rows.append(row)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_case_csv(rows, str(folder / "cases.csv"))
    overall = summarise(rows, CEILING_METRICS, group_key="method")[-1:]  # one method: only the row of all cases
    table = summary_markdown(overall, CEILING_METRICS, "method")
    text = (f"# Dice ceiling of the phantom (seed {seed}, {cases} cases, {size} x {size}): the label against "
            f"the lesion that noise-free maps and the collaterals predict (threshold shift {threshold_shift:+.3f})"
            f"\n\n{table}")
    write_markdown(text, str(folder / "ceiling.md"))
    print(text)
    return rows
