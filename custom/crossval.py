"""K-fold cross-validation through the bundle's own configs: train each fold, evaluate it, aggregate.

Why it exists: MONAI bundles train one split per run; the paper's evidence (and nnU-Net's habit) is a
patient-grouped k-fold cross-validation. This module only orchestrates ``python -m monai.bundle run``
with ``train.json`` and ``evaluate.json`` per fold; training, evaluation and metrics stay in the configs.
"""

import hashlib
import json
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from monai.bundle import ConfigWorkflow

from custom.atomic import require_writable_folder, write_text_atomically
from custom.config_check import whole_number
from custom.data.check import inspect_dataset
from custom.data.datalist import SCORED_DATASET_KEYS, load_dataset_json, scored_dataset, scored_dataset_sha256
from custom.lifecycle import latest_checkpoint
from custom.reporting import summarise, summary_markdown, write_case_csv, write_markdown
from custom.wording import counted

BUNDLE_ROOT = Path(__file__).resolve().parent.parent / "bundle"
# evaluate.json's metric names (MetricsSaver files ``<name>_raw.csv``) and the per-case column they become.
EVALUATION_METRICS = {
    "val_mean_dice": "dice",
    "val_hd95_mm": "hd95_mm",
    "val_assd_mm": "assd_mm",
    "val_precision": "precision",
    "val_recall": "recall",
    "val_avd_ml": "avd_ml",
    "val_lesion_f1": "lesion_f1",
}
CASE_METRICS = tuple(EVALUATION_METRICS.values())
DONE_FILE = "fold_done.json"
RUN_RECORD = "run_configuration.json"
# The tables of a run whose every fold finished: cases, then summary per fold and overall (CSV and Markdown).
SUMMARY_FILES = ("cases.csv", "summary.csv", "summary.md")
# Bundle ids that the cross-validation sets itself for each fold; an override of one would apply to every fold.
FOLD_IDS = ("fold", "num_folds", "ckpt_dir", "output_dir", "ckpt_path", "resume_ckpt", "overwrite")
# Entries of the run record that only inform (paths may move) or are compared through another: the dataset's
# scored part (``scored_dataset``, absent from records of 0.3.15 and earlier) and its hash (absent from records of
# 0.3.14 and earlier) through dataset_json_sha256; the others must match to reuse a folder.
INFORMATIVE_RECORD_KEYS = ("config_paths", "scored_dataset_sha256", "scored_dataset")


def override_arguments(overrides: dict) -> list[str]:
    """Bundle overrides as ``monai.bundle run`` arguments, each value as a Python literal: its command line (Fire)
    reads them back as they are, a text included (a folder ``2018_01`` passed on as it is became the number 201801)."""
    return [argument for key, value in overrides.items() for argument in (f"--{key}", repr(value))]


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_configuration(
    config_files: list[str], overrides: dict, dataset_dir: Path, bundle_root: Path, save_masks: bool
) -> dict:
    """Everything that decides a cross-validation's results, as recorded in ``RUN_RECORD``.

    Config files count by content (SHA-256), the dataset by its folder, the hash of its dataset.json, the part of it
    that decides the folds' results (``scored_dataset``, by which a refusal names what changed) and its hash
    (``scored_dataset_sha256``), and the size and modification time (ns) of each
    training image and label it lists (cheap, unlike hashing them; a file rewritten under the same name, e.g. by
    ``prepare --overwrite``, leaves dataset.json unchanged), the bundle by the version in ``configs/metadata.json``;
    overrides as given (JSON-normalised).
    """
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    dataset = load_dataset_json(dataset_dir)
    files = [e[key] for e in dataset["training"] for key in ("image", "label")]
    return {
        "bundle_version": metadata.get("version"),
        "config_sha256": [file_sha256(Path(c)) for c in config_files],
        "config_paths": [str(c) for c in config_files],
        "dataset_dir": str(dataset_dir),
        "dataset_json_sha256": file_sha256(dataset_dir / "dataset.json"),
        "scored_dataset_sha256": scored_dataset_sha256(dataset),
        "scored_dataset": scored_dataset(dataset),
        "dataset_files": {name: _size_and_mtime(dataset_dir / name) for name in files},
        "overrides": json.loads(json.dumps(overrides, default=str)),
        "save_masks": bool(save_masks),
    }


def _size_and_mtime(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _dataset_file_differences(recorded: dict | None, current: dict, dataset_dir: str, shown: int = 10) -> list[str]:
    """Lines naming the dataset files whose size or modification time differs from the record (``shown`` at most,
    then a count of the others)."""
    if recorded is None:
        return [
            "dataset files: the record has no sizes and modification times of the images and labels (written by an "
            "earlier version of cv), so changes to them cannot be ruled out"
        ]

    def described(status):
        if status is None:
            return "not listed"
        return f"{status[0]} bytes modified {datetime.fromtimestamp(status[1] / 1e9).isoformat()}"

    changed = [name for name in sorted(set(recorded) | set(current)) if recorded.get(name) != current.get(name)]
    lines = [
        f"dataset file '{Path(dataset_dir) / name}': recorded {described(recorded.get(name))}, "
        f"now {described(current.get(name))}"
        for name in changed[:shown]
    ]
    if len(changed) > shown:
        lines.append(f"and {counted(len(changed) - shown, 'other dataset file')} of another size or modification time")
    return lines


def _scored_dataset_differences(recorded: dict, current: dict, shown: int = 10) -> list[str]:
    """Lines naming what differs between two ``scored_dataset`` parts of dataset.json: a top-level key, or a training
    case added, removed or changed (``shown`` lines at most, then a count of the others)."""
    lines = [
        f"dataset.json '{key}': recorded {recorded.get(key)!r}, now {current.get(key)!r}"
        for key in SCORED_DATASET_KEYS if key != "training" and recorded.get(key) != current.get(key)
    ]
    before, after = ({entry.get("case"): entry for entry in part.get("training", [])} for part in (recorded, current))
    for case in sorted(set(before) | set(after), key=str):
        old, new = before.get(case), after.get(case)
        if old is None or new is None:
            lines.append(f"dataset.json training case {case!r}: {'added' if old is None else 'removed'}")
        else:
            lines += [
                f"dataset.json training case {case!r} '{key}': recorded {old.get(key)!r}, now {new.get(key)!r}"
                for key in sorted(set(old) | set(new), key=str) if old.get(key) != new.get(key)
            ]
    if not lines and recorded != current:
        lines.append("dataset.json 'training': the same entries in another order (the order of the training data)")
    if len(lines) > shown:
        lines = lines[:shown] + [f"and {counted(len(lines) - shown, 'other difference')} in dataset.json"]
    return lines


def _dataset_json_differences(recorded: dict, current: dict) -> list[str]:
    """Lines naming what changed in dataset.json that decides the folds' results; none where only the rest of it
    changed (its ``testing`` list, ``numTest``, ``description``, ...), which no fold trains or scores on."""
    if recorded.get("dataset_json_sha256") == current["dataset_json_sha256"]:
        return []
    if recorded.get("scored_dataset_sha256") == current["scored_dataset_sha256"]:
        return []
    if "scored_dataset" in recorded:
        return _scored_dataset_differences(recorded["scored_dataset"], current["scored_dataset"])
    scored = ", ".join(SCORED_DATASET_KEYS)
    if "scored_dataset_sha256" in recorded:
        return [f"dataset.json: its {scored} changed (the record, of an earlier version of cv, does not say how)"]
    return [
        f"dataset.json: SHA-256 recorded {recorded.get('dataset_json_sha256')!r}, now "
        f"{current['dataset_json_sha256']!r} (the record, of an earlier version of cv, does not say whether its "
        f"{scored} changed)"
    ]


def configuration_differences(recorded: dict, current: dict) -> list[str]:
    """One line per deciding entry that differs (overrides one line per key), naming what changed."""
    lines = []
    for key in sorted((set(recorded) | set(current)) - set(INFORMATIVE_RECORD_KEYS)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if key == "dataset_json_sha256":
            lines += _dataset_json_differences(recorded, current)
        elif key == "overrides":
            for name in sorted(set(old) | set(new)):
                before, after = old.get(name, "<unset>"), new.get(name, "<unset>")
                if before != after:
                    lines.append(f"override --{name}: recorded {before!r}, now {after!r}")
        elif key == "config_sha256":
            paths = current["config_paths"]
            changed = [p for p, a, b in zip(paths, old, new) if a != b] if len(old) == len(new) else paths
            lines.append(f"config files differ in content or list: {changed} (recorded: {recorded['config_paths']})")
        elif key == "dataset_files":
            lines += _dataset_file_differences(old, new, current["dataset_dir"])
        else:
            lines.append(f"{key}: recorded {old!r}, now {new!r}")
    return lines


def claim_run_folder(run_dir: Path, configuration: dict) -> None:
    """Record ``configuration`` in ``run_dir``, or refuse a folder holding folds of another configuration.

    Why it exists: finished folds are skipped and interrupted ones resume from their checkpoints; that is
    only sound when the earlier run had the same configs, overrides, dataset and bundle version. A dataset.json
    changed outside its ``SCORED_DATASET_KEYS`` (its testing list, its description), which no fold trains or scores
    on, is accepted with a note and recorded (up to 0.3.15 it was refused, naming two SHA-256 only).
    """
    record = run_dir / RUN_RECORD
    if record.is_file():
        recorded = json.loads(record.read_text())
        differences = configuration_differences(recorded, configuration)
        if differences:
            raise ValueError(
                f"'{run_dir}' holds a cross-validation run with another configuration (see '{record}'):\n  "
                + "\n  ".join(differences)
                + f"\nIts finished folds and checkpoints would be mixed with this run's. To proceed, write to a "
                f"new --out folder, repeat the recorded settings to resume it, or delete '{run_dir}' to start over."
            )
        if recorded.get("dataset_json_sha256") != configuration["dataset_json_sha256"]:
            print(
                f"note: '{configuration['dataset_dir']}/dataset.json' changed since '{record}' was written, outside "
                f"its {', '.join(SCORED_DATASET_KEYS)} (its testing list or description, say), which decide nothing "
                "of a fold: its finished folds are reused and the record names the dataset.json of now", flush=True
            )
        if recorded != configuration:  # the dataset.json of now (montage checks it), paths that moved
            write_text_atomically(record, json.dumps(configuration, indent=2) + "\n")
        return
    started = sorted(p.name for p in run_dir.glob("fold_*"))
    if started:
        raise ValueError(
            f"'{run_dir}' holds folds ({', '.join(started)}) but no '{RUN_RECORD}', so their configuration is "
            f"unknown. To proceed, write to a new --out folder or delete '{run_dir}' to start over."
        )
    write_text_atomically(record, json.dumps(configuration, indent=2) + "\n")


def check_overrides(config_files: list[str], arguments: dict, overrides: dict) -> None:
    """Resolve the configs' ``check_settings`` (custom.config_check) in this process, so that a mistyped or
    unknown override stops the cross-validation before its folder is claimed, not in the first fold's log."""
    meta_file = str(Path(config_files[0]).parent / "metadata.json")
    workflow = ConfigWorkflow(
        config_file=config_files, meta_file=meta_file, logging_file=False, **arguments, **overrides
    )
    workflow.initialize()
    workflow.parser.get_parsed_content("check_settings")


def _run_bundle(config_files: list[str], arguments: dict, overrides: dict, log_file: Path) -> None:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(config_files)]
    command += override_arguments({**arguments, **overrides})
    print(shlex.join(command), flush=True)  # quoted as a shell needs it: a fold can be rerun by pasting the line
    with open(log_file, "a") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise RuntimeError(f"bundle run failed with exit code {completed.returncode}; see the log '{log_file}'")


def refuse_unusable_dataset(dataset_dir: Path, folds: int | None = None) -> None:
    """Refuse, before the first fold, a dataset that ``python -m custom check`` faults or whose metrics cv could
    not read back, listing every problem (each names its dataset.json entry and key, or its file).

    Why it exists: cv relies on each training entry's ``image``, ``label``, ``fold``, ``case`` and ``patient``;
    without this a missing key or a bad file showed only after a fold had trained and been evaluated (a bare
    ``KeyError: 'case'``). The checks are the project's (``custom.data.check``), its folds without any lesion
    voxel (``lesion_free_fold_problems``, whose training run ``fold_datalist`` refuses after the folds before it had
    trained) among the first ``folds`` folds only (all where None: the folds cv runs), plus one of cv's own: an image
    path holding a line break, which the unquoted lines of MetricsSaver's CSV files cannot carry.
    """
    report = inspect_dataset(dataset_dir, folds)
    problems = report.problems
    unreadable = "holds a line break, which MetricsSaver writes unquoted into its CSV files, so cv could not read them"
    if not problems and "\n" in str(dataset_dir):
        problems = [f"the dataset folder {str(dataset_dir)!r} {unreadable}"]
    elif not problems:
        problems = [
            f"dataset.json training[{index}].image: {entry['image']!r} {unreadable}"
            for index, entry in enumerate(load_dataset_json(dataset_dir)["training"])
            if "\n" in entry["image"]
        ]
    if problems:
        raise ValueError(
            f"'{dataset_dir / 'dataset.json'}' cannot be cross-validated:\n  - " + "\n  - ".join(problems)
            + "\nFix these before running cv (`python -m custom check` lists the dataset's problems)."
        )


def read_raw_metric(raw_file: Path) -> list[tuple[str, float]]:
    """(file name, ``mean`` column) of each line of a MetricsSaver ``<metric>_raw.csv``.

    Why it exists: MONAI's ``write_metrics_reports`` writes ``filename,class0,...,mean`` lines without quoting,
    so ``csv`` splits a file name holding a comma into several columns. The value columns are named by the header
    and numeric, so they are split off from the right and the file name is what remains. Only a line break in a
    file name cannot be read back; ``run_cross_validation`` refuses such image paths before the first fold.
    """
    with open(raw_file, newline="\n") as f:  # lines end at "\n" only, as MONAI writes them
        lines = f.read().split("\n")
    if lines[-1] == "":
        lines.pop()
    header = lines[0].split(",") if lines else []
    if header[:1] != ["filename"] or header[-1:] != ["mean"] or len(header) < 2:
        raise ValueError(f"'{raw_file}' does not start with MetricsSaver's header 'filename,...,mean': {lines[:1]}")
    values = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.rsplit(",", len(header) - 1)
        try:
            mean = float(fields[-1])
        except ValueError:
            mean = None
        if len(fields) != len(header) or mean is None:
            raise ValueError(f"'{raw_file}' line {number}: expected '{lines[0]}' values, found {line!r}")
        values.append((fields[0], mean))
    return values


def _fold_case_rows(dataset_dir: Path, dataset: dict, fold: int, eval_dir: Path) -> list[dict]:
    """Per-case rows of one fold from evaluate.json's MetricsSaver ``*_raw.csv`` files."""
    by_image = {str((dataset_dir / e["image"]).resolve()): e for e in dataset["training"]}
    rows: dict[str, dict] = {}
    for saver_name, column in EVALUATION_METRICS.items():
        raw_file = eval_dir / f"{saver_name}_raw.csv"
        if not raw_file.is_file():
            raise FileNotFoundError(f"evaluation output '{raw_file}' is missing")
        for filename, mean in read_raw_metric(raw_file):
            entry = by_image.get(str(Path(filename).resolve()))
            if entry is None:
                raise ValueError(f"'{raw_file}' names '{filename}', which is not in dataset.json")
            row = rows.setdefault(
                entry["case"], {"fold": fold, "case": entry["case"], "patient": entry.get("patient", "")}
            )
            row[column] = mean
    # a table over fewer (or other) cases than the fold holds would look complete
    cases = {e["case"] for e in dataset["training"] if e["fold"] == fold}
    incomplete = sorted(case for case in cases if not set(CASE_METRICS) <= set(rows.get(case, ())))
    others = sorted(set(rows) - cases)
    problems = []
    if incomplete:
        problems.append(f"metrics missing for {', '.join(incomplete)}")
    if others:
        problems.append(f"cases of other folds: {', '.join(others)}")
    if problems:
        raise ValueError(
            f"evaluation outputs in '{eval_dir}' do not match fold {fold} of dataset.json: {'; '.join(problems)}"
        )
    return list(rows.values())


def _cross_validate_fold(
    fold_dir: Path, common: dict, dataset: dict, train_configs: list[str], evaluate_configs: list[str],
    overrides: dict, save_masks: bool,
) -> list[dict]:
    """Train and evaluate one fold into ``fold_dir`` (``common``: its bundle_root, dataset_dir, fold and num_folds)
    unless ``fold_done.json`` says it is done, and return its per-case rows."""
    fold, dataset_dir = common["fold"], Path(common["dataset_dir"])
    ckpt_dir = fold_dir / "models"
    eval_dir = fold_dir / "eval"
    if (fold_dir / DONE_FILE).is_file():
        print(f"fold {fold}: already done, skipped", flush=True)
        return _fold_case_rows(dataset_dir, dataset, fold, eval_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    train_arguments = {**common, "ckpt_dir": str(ckpt_dir), "output_dir": str(fold_dir / "train")}
    resume = latest_checkpoint(ckpt_dir)
    if resume is not None:
        print(f"fold {fold}: resuming from {resume}", flush=True)
        train_arguments["resume_ckpt"] = str(resume)
    else:  # the folder is this cross-validation's: a model.pt without a checkpoint to resume is retrained
        train_arguments["overwrite"] = True
    started = time.time()
    _run_bundle(train_configs, train_arguments, overrides, fold_dir / "train.log")
    trained = time.time()
    evaluate_arguments = {
        **common,
        "ckpt_path": str(ckpt_dir / "model.pt"),
        "output_dir": str(eval_dir),
        "save_masks": save_masks,
        # the folder is this fold's: outputs there are of an evaluation that did not finish the fold
        # (interrupted, or its metrics could not be read), which this one replaces
        "overwrite": True,
    }
    _run_bundle(evaluate_configs, evaluate_arguments, overrides, fold_dir / "evaluate.log")
    timing = {"train_seconds": round(trained - started, 1), "evaluate_seconds": round(time.time() - trained, 1)}
    # read before fold_done.json is written: a fold whose per-case metrics cannot be read is not done, so
    # a rerun evaluates it again instead of skipping it and failing on the same files
    rows = _fold_case_rows(dataset_dir, dataset, fold, eval_dir)
    write_text_atomically(fold_dir / DONE_FILE, json.dumps({**timing, "overrides": overrides}, indent=2, default=str))
    return rows


def raise_failures(
    failures: list[str], total: str, folder: Path, tables, described: str, finished: list[str], rerun: str, cause
) -> None:
    """Once every item of a run has run (cv's folds, ``ablation``'s loss variants), raise one RuntimeError naming
    each of ``failures`` out of ``total`` (e.g. "4 folds") and the ``finished`` items kept, and what a rerun of the
    same command does (``rerun``), after removing an earlier run's ``tables`` (``described``) from ``folder``: they
    would read as this run's. Chained to ``cause``, the first failure, whose traceback shows a failure of the
    project's own code. Nothing where nothing failed.

    Why it exists: one failed fold or variant stopped the others (a night of 4 folds lost to one)."""
    if not failures:
        return
    for table in tables:
        (folder / table).unlink(missing_ok=True)
    raise RuntimeError(
        f"{len(failures)} of {total} failed, so '{folder}' holds no {described} (finished and kept: "
        f"{', '.join(finished) or 'none'}):\n  - " + "\n  - ".join(failures)
        + f"\nFix the cause and run the same command again: {rerun}."
    ) from cause


def run_cross_validation(
    dataset_dir: str,
    out: str,
    folds: int | None = None,
    config_files: str | list[str] = "",
    bundle_root: str = str(BUNDLE_ROOT),
    save_masks: bool = True,
    **overrides,
) -> list[dict]:
    """Train and evaluate every fold of ``dataset_dir`` with the bundle, then aggregate per fold and overall.

    Args:
        dataset_dir: converted dataset folder (``python -m custom prepare``); its ``fold`` fields define the split.
        out: run folder; ``out/fold_K/`` holds the checkpoints, TensorBoard logs, evaluation and masks of fold K.
        folds: number of folds to run (default: ``num_folds`` of dataset.json).
        config_files: extra bundle configs applied over train.json (e.g. ``bundle/configs/demo.json``),
            comma-separated or a list.
        bundle_root: the bundle folder.
        save_masks: keep each fold's predicted masks (used by the result figures).
        overrides: any bundle override, e.g. ``--epochs 50 --loss#lambda_gdl 0``.

    The dataset is checked first, with the checks of ``python -m custom check`` (see ``refuse_unusable_dataset``).
    The run's configuration (config file contents, overrides, dataset.json and the size and modification time
    of each training image and label, bundle version) is recorded in
    ``out/run_configuration.json``; a folder holding a run of another configuration is refused before any
    work. Within the same configuration a fold with ``fold_done.json`` (written once its evaluation's per-case
    metrics have been read) is skipped and an interrupted fold resumes from its latest checkpoint (one stopped
    before its first checkpoint trains again from the start).
    A fold that fails (its training or evaluation run, or the reading of its metrics) does not stop the others:
    every fold is run, as nnU-Net trains its folds apart, and the failures are raised together at the end, each
    naming its fold and log, with no summary written (an earlier run's tables removed), so that a rerun of the same
    command runs only the failed folds.
    Writes ``out/cases.csv`` (per case), ``out/summary.csv`` and ``out/summary.md`` (mean, std, median per
    fold and overall) and returns the summary rows.
    """
    if folds is not None and not whole_number(folds):
        # int() made --folds 2.5 run 2 folds, and --folds True 1, summarised as the whole run without a word
        raise ValueError(f"--folds must be a whole number of folds, got {folds!r}")
    fold_overrides = [key for key in overrides if key in FOLD_IDS]
    if fold_overrides:
        raise ValueError(f"cv sets {fold_overrides} itself for each fold under OUT; drop these overrides")
    dataset_dir = Path(dataset_dir).resolve()
    dataset = load_dataset_json(dataset_dir, ("training",))
    refuse_unusable_dataset(dataset_dir, folds)
    num_folds = folds if folds is not None else int(dataset.get("num_folds", 0))
    present = sorted({int(e["fold"]) for e in dataset["training"]})
    if num_folds < 1 or any(k not in present for k in range(num_folds)):
        raise ValueError(f"folds={num_folds} does not match the folds {present} of '{dataset_dir / 'dataset.json'}'")
    bundle_root = Path(bundle_root).resolve()
    extra = [c for c in (config_files.split(",") if isinstance(config_files, str) else config_files) if c]
    train_configs = [str(bundle_root / "configs" / "train.json")] + [str(Path(c).resolve()) for c in extra]
    evaluate_configs = train_configs + [str(bundle_root / "configs" / "evaluate.json")]
    missing = [c for c in evaluate_configs if not Path(c).is_file()]
    if missing:  # MONAI's FileNotFoundError came with its traceback and named no option
        raise FileNotFoundError(
            f"config file '{missing[0]}' does not exist: --config_files names extra configs, and --bundle_root "
            f"'{bundle_root}' must hold configs/train.json and configs/evaluate.json"
        )
    check_overrides(evaluate_configs, {"bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir)}, overrides)
    run_dir = require_writable_folder(out)
    claim_run_folder(run_dir, run_configuration(evaluate_configs, overrides, dataset_dir, bundle_root, save_masks))

    rows, failures, finished, first_error = [], [], [], None
    for fold in range(num_folds):
        # num_folds: the dataset's, which train.json's (4) would refuse fold 4 of, after folds 0-3 had trained
        common = {"bundle_root": str(bundle_root), "dataset_dir": str(dataset_dir), "fold": fold,
                  "num_folds": max(present) + 1}
        try:
            rows += _cross_validate_fold(
                run_dir / f"fold_{fold}", common, dataset, train_configs, evaluate_configs, overrides, save_masks
            )
            finished.append(f"fold {fold}")
        except Exception as error:  # one fold's failure never stops the others; all are named at the end
            failures.append(f"fold {fold}: {error}")
            first_error = first_error or error
            print(f"fold {fold} failed: {error}; going on with the other folds", flush=True)
    raise_failures(
        failures, counted(num_folds, "fold"), run_dir, SUMMARY_FILES, "summary", finished,
        "finished folds are skipped and interrupted ones resume from their latest checkpoint", first_error,
    )

    summary = summarise(rows, CASE_METRICS, group_key="fold")
    cases_table, summary_table, summary_text = (str(run_dir / name) for name in SUMMARY_FILES)
    write_case_csv(rows, cases_table)
    write_case_csv(summary, summary_table)
    write_markdown(summary_markdown(summary, CASE_METRICS, group_key="fold"), summary_text)
    print(summary_markdown(summary, CASE_METRICS, group_key="fold"))
    return summary
