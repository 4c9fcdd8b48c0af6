"""Dataset integrity check: find everything wrong with a converted dataset folder before a long training run.

Like nnU-Net's ``verify_dataset_integrity``, it reads every file ``dataset.json`` references and reports
all problems at once, each naming its file or ``dataset.json`` key, instead of failing hours into
training on the first bad case. MONAI's ``load_decathlon_datalist`` only resolves paths.
"""

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom.clinical import MODALITIES, voxel_volume_ml
from custom.data.datalist import cases_without_lesion, load_dataset_json, output_case_name
from custom.data.studies import LABEL_NAMES, affines_match, image_problems, label_problems, read_nifti, voxel_digest
from custom.wording import counted

EXPECTED_MODALITY = {str(i): name for i, name in enumerate(MODALITIES)}
EXPECTED_LABELS = {str(i): name for i, name in enumerate(LABEL_NAMES)}
TRAINING_KEYS = ("image", "label", "fold", "patient", "case")
TESTING_KEYS = ("image", "case")


@dataclass
class TrainingCaseSummary:
    """The figures of one readable training case that the summary table needs."""

    case: str
    patient: str
    fold: int
    slices: int
    lesion_ml: float
    holds_lesion: bool  # any non-zero label voxel, as ``fold_datalist`` counts a lesion (a label of 2 included)


@dataclass
class DatasetReport:
    """Everything ``check_dataset_command`` prints: the problems and what could be read of the cases."""

    problems: list[str] = field(default_factory=list)
    training: list[TrainingCaseSummary] = field(default_factory=list)
    num_testing: int = 0
    num_folds: int | None = None


def _read_nifti(folder: Path, relative, where: str, problems: list[str]):
    """(image, voxel array) of ``folder/relative``, or None after recording why it cannot be read."""
    if not isinstance(relative, str) or not relative:
        problems.append(f"{where}: expected a relative file path, found {relative!r}")
        return None
    path = folder / relative
    if not path.is_file():
        problems.append(f"{relative}: missing (listed in {where})")
        return None
    try:
        return read_nifti(path, relative)
    except ValueError as err:
        problems.append(str(err))
        return None


def _label_image_problems(relative: str, label, image_relative: str, image) -> list[str]:
    """Problems of a label file against its image file: those of :func:`label_problems` and another affine."""
    label_image, data = label
    if image is None:
        return label_problems(relative, data)
    image_image, image_data = image
    problems = label_problems(relative, data, image_relative, image_data.shape)
    if data.ndim == 3 and not affines_match(label_image.affine, image_image.affine):
        problems.append(
            f"{relative}: affine differs from {image_relative}:\n{np.array2string(label_image.affine, precision=4)}"
            f"\nvs\n{np.array2string(image_image.affine, precision=4)}"
        )
    return problems


def inspect_training_entry(folder: Path, entry: dict, where: str) -> tuple[list[str], bool, str | None]:
    """Problems of the files of one ``training`` entry (image and label read in full), each naming its file,
    whether its label holds a lesion voxel and the image's ``voxel_digest`` (None if unreadable): read once for all.

    Used by the fold datalists (``custom.data.datalist``) to refuse bad cases before any DataLoader starts.
    """
    problems: list[str] = []
    image = _read_nifti(folder, entry.get("image"), f"{where}.image", problems)
    if image is not None:
        problems += image_problems(entry["image"], image[1], image[0].affine)
    label = _read_nifti(folder, entry.get("label"), f"{where}.label", problems)
    if label is not None:
        problems += _label_image_problems(entry["label"], label, entry.get("image"), image)
    digest = voxel_digest(image[1]) if image is not None else None
    return problems, label is not None and bool(label[1].any()), digest


def _valid_fold(fold, num_folds: int | None) -> bool:
    whole = isinstance(fold, int) and not isinstance(fold, bool)
    return whole and 0 <= fold and (num_folds is None or fold < num_folds)


def dataset_num_folds(dataset: dict) -> int | None:
    """``dataset.json``'s ``num_folds`` if it is an integer of at least 2, else None."""
    num_folds = dataset.get("num_folds")
    return num_folds if isinstance(num_folds, int) and not isinstance(num_folds, bool) and num_folds >= 2 else None


def _top_level_problems(dataset: dict, report: DatasetReport) -> dict[str, list]:
    """Check the contract's top-level keys; set ``report.num_folds``; return the training and testing lists."""
    problems = report.problems
    for key, expected in (("modality", EXPECTED_MODALITY), ("labels", EXPECTED_LABELS)):
        if dataset.get(key) != expected:
            problems.append(f"dataset.json '{key}': expected {expected}, found {dataset.get(key)!r}")
    report.num_folds = dataset_num_folds(dataset)
    if report.num_folds is None:
        found = dataset.get("num_folds")
        problems.append(f"dataset.json 'num_folds': expected an integer of at least 2, found {found!r}")
    lists = {}
    for key in ("training", "testing"):
        entries = dataset.get(key)
        if not isinstance(entries, list) or (key == "training" and not entries):
            problems.append(f"dataset.json '{key}': expected a {'non-empty ' * (key == 'training')}list")
            entries = []
        lists[key] = entries
    for count_key, key in (("numTraining", "training"), ("numTest", "testing")):
        if count_key in dataset and dataset[count_key] != len(lists[key]):
            problems.append(f"dataset.json '{count_key}' is {dataset[count_key]!r} but '{key}' has {len(lists[key])}")
    return lists


def fold_assignment_problems(training: list, num_folds: int | None) -> list[str]:
    """Problems of the ``fold`` of the ``training`` entries that make a cross-validation split wrong without failing:
    an entry without ``fold``, or whose fold is not an integer in ``[0, num_folds)`` (``"1"``, a string, or 2 of 2
    folds, is trained on in every fold and validated in none), and a patient in several folds (validated on a slab
    the model trained on). ``num_folds`` None (unknown) bounds folds below only. Shared by the check and
    ``custom.data.datalist.fold_datalist``."""
    problems = []
    folds_of_patient: dict[str, set[int]] = {}
    cases_of_patient: dict[str, list[str]] = {}
    for index, entry in enumerate(training):
        if not isinstance(entry, dict):  # named by the check; fold_datalist reads only objects
            continue
        fold, patient = entry.get("fold"), entry.get("patient")
        if "fold" not in entry:
            problems.append(f"dataset.json training[{index}]: missing fold")
        elif not _valid_fold(fold, num_folds):
            bounds = f"in [0, {num_folds})" if num_folds is not None else ">= 0"
            problems.append(f"dataset.json training[{index}].fold: expected an integer {bounds}, found {fold!r}")
        elif isinstance(patient, str) and patient:
            folds_of_patient.setdefault(patient, set()).add(fold)
            cases_of_patient.setdefault(patient, []).append(str(entry.get("case")))
    return problems + [
        f"dataset.json training: patient '{patient}' is in folds {sorted(folds)} "
        f"(cases {', '.join(cases_of_patient[patient])})"
        for patient, folds in folds_of_patient.items()
        if len(folds) > 1
    ]


def _fold_problems(training: list, num_folds: int | None) -> list[str]:
    """``fold_assignment_problems`` and folds without cases."""
    used_folds = {e["fold"] for e in training if isinstance(e, dict) and _valid_fold(e.get("fold"), num_folds)}
    problems = fold_assignment_problems(training, num_folds)
    if num_folds is not None:
        problems += [f"dataset.json training: fold {f} has no cases" for f in range(num_folds) if f not in used_folds]
    return problems


def lesion_free_fold_problems(cases: list[TrainingCaseSummary], folds: int | None = None) -> list[str]:
    """``cases_without_lesion`` for each fold (of the first ``folds``, all where None) whose training or validation
    cases hold no lesion voxel in any label: the folds whose training run ``fold_datalist`` refuses (evaluate.json
    scores such a fold: false positives). ``cases``: every training case of the dataset, its label read.

    Why it exists: ``python -m custom check`` printed "no problems found" for a dataset whose fold held no lesion,
    and training that fold (and ``cv``, before its first fold) refused it."""
    problems = []
    for fold in sorted({case.fold for case in cases if folds is None or case.fold < folds}):
        for role, members in (("train", [case for case in cases if case.fold != fold]),
                              ("validate", [case for case in cases if case.fold == fold])):
            if members and not any(case.holds_lesion for case in members):
                problems.append(cases_without_lesion(fold, role, len(members)))
    return problems


def inspect_dataset(dataset_dir, folds: int | None = None) -> DatasetReport:
    """Read ``dataset.json`` and every file it references; collect all problems and per-case figures.

    The lesion check (``lesion_free_fold_problems``) covers the first ``folds`` folds (``cv --folds``; all where
    None), once every training label has been read with a valid fold: until then which folds hold a lesion is unknown
    (those labels and folds are problems already), and the check names the folds once they are fixed."""
    folder = Path(dataset_dir)
    report = DatasetReport()
    problems = report.problems
    try:
        dataset = load_dataset_json(folder)
    except (FileNotFoundError, ValueError) as err:
        problems.append(str(err))
        return report
    if not isinstance(dataset, dict):
        problems.append("dataset.json: expected a JSON object at the top level")
        return report
    lists = _top_level_problems(dataset, report)

    # Repeats: a case name; a file in two entries (one study leaks between folds, or from training into testing); two
    # image files of one case name (imagesTr/case_1.nii.gz, imagesTs/case_1.nii.gz: inference and MONAI Label name a
    # mask or a study after the file, ``output_case_name``, so one would be written over the other); one study's
    # voxels under two file names (a copy, which the file names cannot tell: ``voxel_digest``).
    first_use: dict[tuple[str, object], str] = {}
    for key, required in (("training", TRAINING_KEYS), ("testing", TESTING_KEYS)):
        for index, entry in enumerate(lists[key]):
            where = f"dataset.json {key}[{index}]"
            if not isinstance(entry, dict):
                problems.append(f"{where}: expected an object with keys {', '.join(required)}")
                continue
            missing = [k for k in required if k not in entry and k != "fold"]  # fold: fold_assignment_problems
            if missing:
                problems.append(f"{where}: missing {', '.join(missing)}")
            case = entry.get("case")
            if isinstance(case, str) and case:
                if earlier := _repeat(first_use, "case", case, where):
                    problems.append(f"{where}: case '{case}' repeats {earlier}")
            elif "case" in entry:
                problems.append(f"{where}.case: expected a non-empty string, found {case!r}")
            repeated_files = []
            for file_key in [k for k in ("image", "label") if isinstance(entry.get(k), str)]:
                listed, file = f"{where}.{file_key}", entry[file_key]
                if earlier := _repeat(first_use, "file", (folder / file).resolve(), listed):
                    problems.append(f"{listed}: '{file}' is also {earlier}")
                    repeated_files.append(file_key)
                elif file_key == "image":
                    name = output_case_name(folder / file)
                    if earlier := _repeat(first_use, "case name", name, f"{listed} '{file}'"):
                        problems.append(
                            f"{listed}: '{file}' has the case name '{name}' of {earlier}: inference and MONAI Label "
                            "name a mask or study after the image file, so one would replace the other; rename one"
                        )
            image = _read_nifti(folder, entry["image"], f"{where}.image", problems) if "image" in entry else None
            if image is not None:
                problems += image_problems(entry["image"], image[1], image[0].affine)
                earlier = _repeat(first_use, "voxels", voxel_digest(image[1]), f"{where}.image '{entry['image']}'")
                if earlier and "image" not in repeated_files:
                    problems.append(
                        f"{where}.image: '{entry['image']}' holds the voxels of {earlier}: one study under two names "
                        "is trained on and scored in two places (a copy); list it once"
                    )
            if key == "testing":
                report.num_testing += 1
                continue
            fold, patient = entry.get("fold"), entry.get("patient")
            fold_ok = _valid_fold(fold, report.num_folds)
            if "patient" in entry and (not isinstance(patient, str) or not patient):
                problems.append(f"{where}.patient: expected a non-empty string, found {patient!r}")
            label = _read_nifti(folder, entry["label"], f"{where}.label", problems) if "label" in entry else None
            if label is None:
                continue
            problems += _label_image_problems(entry["label"], label, entry.get("image"), image)
            if fold_ok and label[1].ndim == 3:
                lesion_ml = float(np.count_nonzero(label[1] == 1)) * voxel_volume_ml(label[0].affine)
                report.training.append(
                    TrainingCaseSummary(case, patient, fold, label[1].shape[2], lesion_ml, bool(label[1].any()))
                )
    problems += _fold_problems(lists["training"], report.num_folds)
    if len(report.training) == len(lists["training"]):
        problems += lesion_free_fold_problems(report.training, folds)
    return report


def _repeat(first_use: dict, kind: str, value, where: str) -> str | None:
    """The entry that first listed ``value`` of ``kind`` (a case, a file, ...) in ``first_use``, or None when
    ``where`` lists it first (then recorded as its first use)."""
    earlier = first_use.setdefault((kind, value), where)
    return None if earlier == where else earlier


def check_dataset(dataset_dir) -> list[str]:
    """Every problem of the dataset folder ``dataset_dir``, each naming its file or dataset.json key; [] if fine."""
    return inspect_dataset(dataset_dir).problems


def _patient_count(cases) -> int:
    """Patients named by ``cases``; a case without a valid ``patient`` (a listed problem) names none."""
    return len({case.patient for case in cases if isinstance(case.patient, str) and case.patient})


def check_dataset_command(dataset_dir: str):
    """Check a converted dataset folder: print a summary per fold and every problem; exit 1 if there are problems.

    Args:
        dataset_dir: folder holding dataset.json, imagesTr, labelsTr and imagesTs.
    """
    report = inspect_dataset(dataset_dir)
    cases = report.training
    folds = "no valid number of folds" if report.num_folds is None else counted(report.num_folds, "fold")
    print(
        f"{dataset_dir}: {counted(len(cases), 'readable training case')} from "
        f"{counted(_patient_count(cases), 'patient')}, {counted(sum(c.slices for c in cases), 'slice')}, "
        f"{counted(report.num_testing, 'testing case')}, {folds}"
    )
    if cases:
        print(f"{'fold':>4} {'cases':>6} {'patients':>9} {'slices':>7} {'lesion mL':>10}  per case min / median / max")
        for fold in sorted({c.fold for c in cases}):
            members = [c for c in cases if c.fold == fold]
            volumes = [c.lesion_ml for c in members]
            print(
                f"{fold:>4} {len(members):>6} {_patient_count(members):>9} "
                f"{sum(c.slices for c in members):>7} {sum(volumes):>10.1f}  "
                f"{min(volumes):.1f} / {statistics.median(volumes):.1f} / {max(volumes):.1f}"
            )
    if report.problems:
        print(f"{len(report.problems)} problem(s):")
        for problem in report.problems:
            print(f"  - {problem}")
        raise SystemExit(1)
    print("no problems found")
