"""Tables of per-case metrics: per-group (fold) summaries, CSV and Markdown writers, paired comparisons.

Shared by the threshold baseline and the cross-validation so both report the same statistics the same way.
NaN values (undefined metrics, see docs/metrics.md) are left out of every statistic and counted in ``n``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence

import numpy as np

from custom.atomic import write_text_atomically
from custom.metrics import HIGHER_IS_BETTER

OVERALL = "all"
STATISTICS = ("mean", "std", "median", "n")
# cv's per-case values come from MONAI's MetricsSaver CSVs, which hold 4 decimals; paired comparisons compare at
# that resolution, so the same masks scored by cv and by score-masks (full precision) are equal, not improved.
PAIRED_DECIMALS = 4
# Runs scored against the same labels agree on each case's label volume up to float32 spacing (relative 1e-7).
LABEL_VOLUME, LABEL_VOLUME_TOLERANCE = "label_ml", 1e-4


def _metric_value(row: dict, metric: str, key: str = "case") -> float:
    """``row[metric]`` as a float (rows read back from CSV hold strings), or raise naming the case and column."""
    if metric not in row:
        raise ValueError(f"row {row.get(key, '?')!r} has no {metric!r} column; columns: {sorted(row)}.")
    try:
        return float(row[metric])
    except (TypeError, ValueError) as error:
        raise ValueError(f"row {row.get(key, '?')!r}: {metric!r} is not a number: {row[metric]!r}.") from error


def _statistics(values: list[float]) -> dict[str, float]:
    """Mean, population std (as numpy and MONAI's MetricsSaver), median and count of the non-NaN ``values``."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "median": float(np.median(finite)),
        "n": int(finite.size),
    }


def _group_order(value) -> tuple:
    """Sort key putting numeric group values (folds, possibly read back as strings) in numeric order."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def summarise(rows: list[dict], metrics: Sequence[str], group_key: str = "fold") -> list[dict]:
    """One summary row per value of ``group_key`` (sorted) and a last row for all cases (``group_key`` = "all").

    Each row holds ``group_key``, ``cases`` (rows in the group) and, per metric, ``<metric>_mean``,
    ``<metric>_std``, ``<metric>_median`` and ``<metric>_n`` (how many cases had a non-NaN value).
    """
    if not rows:
        raise ValueError("summarise needs at least one row of per-case metrics.")
    groups: dict = {}
    for row in rows:
        if group_key not in row:
            raise ValueError(f"row {row.get('case', '?')!r} has no {group_key!r} column to group by.")
        groups.setdefault(row[group_key], []).append(row)

    def summary_row(group, members: list[dict]) -> dict:
        result = {group_key: group, "cases": len(members)}
        for metric in metrics:
            stats = _statistics([_metric_value(row, metric) for row in members])
            result.update({f"{metric}_{name}": stats[name] for name in STATISTICS})
        return result

    summary = [summary_row(group, groups[group]) for group in sorted(groups, key=_group_order)]
    summary.append(summary_row(OVERALL, rows))
    return summary


def write_case_csv(rows: list[dict], path: str) -> None:
    """Write dict rows (one per case, or the rows of ``summarise``) as CSV, columns in first-seen order, atomically:
    a failed write leaves no file."""
    if not rows:
        raise ValueError(f"no rows to write to {path}.")
    columns = list(dict.fromkeys(column for row in rows for column in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, text.getvalue())


def write_markdown(text: str, path: str) -> None:
    """Write a Markdown table (e.g. from ``summary_markdown``) to ``path``."""
    write_text_atomically(path, text)


def read_case_csv(path: str) -> list[dict]:
    """Rows of a CSV written by ``write_case_csv`` (values as strings; the functions here convert them)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"per-case metrics file not found: {path}")
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def summary_markdown(summary: list[dict], metrics: Sequence[str], group_key: str = "fold") -> str:
    """A Markdown table of ``summarise`` output: one line per group and the overall line, each metric as
    "mean ± std (median)", with "n=k" appended when only k of the group's cases had a defined value."""
    lines = [
        "| " + " | ".join([group_key, "cases", *metrics]) + " |",
        "|" + "---|" * (len(metrics) + 2),
    ]
    for row in summary:
        cells = [str(row[group_key]), str(row["cases"])]
        for metric in metrics:
            cell = f"{row[f'{metric}_mean']:.3f} ± {row[f'{metric}_std']:.3f} ({row[f'{metric}_median']:.3f})"
            if int(row[f"{metric}_n"]) < int(row["cases"]):
                cell += f", n={row[f'{metric}_n']}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rows_by_key(rows: list[dict], key: str, argument: str) -> dict:
    """Index ``rows`` by ``row[key]``, refusing missing or duplicated keys."""
    indexed: dict = {}
    for row in rows:
        if key not in row:
            raise ValueError(f"a row of {argument} has no {key!r} column.")
        if row[key] in indexed:
            raise ValueError(f"{argument} has two rows for {key} {row[key]!r}.")
        indexed[row[key]] = row
    return indexed


def _matched_runs(runs: dict[str, list[dict]], key: str) -> dict[str, dict]:
    """Each run's rows indexed by ``key``; refuses runs of different cases, and runs whose rows both hold
    ``label_ml`` and disagree on it (the same case names in another dataset, e.g. an inner fold against the test
    phantom: they were paired without a word)."""
    indexed = {name: _rows_by_key(rows, key, name) for name, rows in runs.items()}
    (first, reference), *others = indexed.items()
    for name, rows in others:
        if rows.keys() != reference.keys():
            only_first = sorted(map(str, reference.keys() - rows.keys()))
            only_other = sorted(map(str, rows.keys() - reference.keys()))
            raise ValueError(
                f"the runs cover different cases: only in {first} {only_first}, only in {name} {only_other}."
            )
        volumes = {case: (_metric_value(reference[case], LABEL_VOLUME, key), _metric_value(row, LABEL_VOLUME, key))
                   for case, row in rows.items() if LABEL_VOLUME in row and LABEL_VOLUME in reference[case]}
        other = [case for case, (a, b) in volumes.items() if not math.isclose(a, b, rel_tol=LABEL_VOLUME_TOLERANCE)]
        if other:
            a, b = volumes[other[0]]
            raise ValueError(f"{first} and {name} scored different labels for {len(other)} case(s), e.g. {other[0]!r} "
                             f"(label_ml {a:.4f} against {b:.4f}): the same case names in another dataset? Compare "
                             "runs scored on the same dataset.")
    return indexed


def same_case_statistics(runs: dict[str, list[dict]], metrics: Sequence[str], key: str = "case") -> dict[str, dict]:
    """Per run, ``<metric>_mean``, ``_std``, ``_median`` and ``_n`` of each metric over the cases where every run
    has a value (not NaN), so that the runs' means compare the same cases.

    Why it exists: a run that leaves a case undefined (no HD95 for an empty prediction, often on the hardest case)
    would otherwise be averaged over fewer, easier cases and look better than a run that segmented it. The runs must
    cover the same cases (``key``) of the same labels (``_matched_runs``). Metrics that are never NaN (Dice,
    volumes, lesion F1) are over every case.
    """
    indexed = _matched_runs(runs, key)
    names = list(indexed)
    statistics = {name: {} for name in names}
    for metric in metrics:
        values = {name: {case: _metric_value(row, metric, key) for case, row in rows.items()}
                  for name, rows in indexed.items()}
        common = [case for case in indexed[names[0]] if not any(math.isnan(values[n][case]) for n in names)]
        for name in names:
            stats = _statistics([values[name][case] for case in common])
            statistics[name].update({f"{metric}_{s}": stats[s] for s in STATISTICS})
    return statistics


def paired_comparison(rows_a: list[dict], rows_b: list[dict], metric: str, key: str = "case") -> dict:
    """Case-by-case comparison of run B against reference run A on ``metric`` (difference = B - A).

    Both runs must cover the same cases of the same labels (``_matched_runs``). Cases where either value is NaN
    are left out and counted in ``excluded_nan``. Values are compared rounded to ``PAIRED_DECIMALS``, the resolution
    of cv's tables. ``improved``/``worse`` follow the metric's direction (higher Dice is better, lower HD95 is
    better).
    Returns metric, cases, excluded_nan, mean_difference, std_difference, improved, worse, equal.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"{metric!r} has no better direction to compare; choose one of {list(HIGHER_IS_BETTER)}.")
    by_case_a, by_case_b = _matched_runs({"rows_a": rows_a, "rows_b": rows_b}, key).values()

    differences = []
    for case, row_a in by_case_a.items():
        value_a, value_b = _metric_value(row_a, metric, key), _metric_value(by_case_b[case], metric, key)
        if not (math.isnan(value_a) or math.isnan(value_b)):
            differences.append(round(value_b, PAIRED_DECIMALS) - round(value_a, PAIRED_DECIMALS))
    difference = np.array(differences, dtype=float)
    gain = difference if HIGHER_IS_BETTER[metric] else -difference
    return {
        "metric": metric,
        "cases": int(difference.size),
        "excluded_nan": len(by_case_a) - int(difference.size),
        "mean_difference": float(difference.mean()) if difference.size else math.nan,
        "std_difference": float(difference.std()) if difference.size else math.nan,
        "improved": int((gain > 0).sum()),
        "worse": int((gain < 0).sum()),
        "equal": int((gain == 0).sum()),
    }
