"""Convert an ISLES 2018 split (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...nii``) into the bundle's dataset folder.

MONAI reads NIfTI but knows neither the ISLES 2018 folder layout nor this project's data contract
(one 5-channel image per case, patient-grouped folds), so this module finds each case's maps by name and
reads them (``custom.data.studies``, shared with the MONAI-free runner), refusing anything that would silently
corrupt training (maps on different grids, NaN, stray label values), and writes the dataset folder atomically.
"""

import csv
import functools
import io
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.atomic import require_writable_folder, write_folder_atomically
from custom.clinical import MODALITIES, voxel_volume_ml
from custom.data.folds import assign_folds, validate_fold_count
from custom.data.studies import (
    AFFINE_ATOL_MM,
    LABEL_MAP,
    LABEL_NAMES,
    SMIR_NAME,
    CaseFiles,
    affines_match,
    find_case_maps,
    folder_entries,
    load_case,
    load_label,
    load_map,
    load_nifti,
    nifti_in,
    require_same_grid,
    voxel_digest,
)
from custom.wording import counted

PWI_MAP = "4DPWI"  # the raw 4D perfusion series, read only with --maps-from-4d


def natural_sort_key(name: str) -> list:
    """Sort key that orders embedded numbers by value, so ``case_2`` comes before ``case_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _holds_maps(folder: Path) -> bool:
    """Whether ``folder`` holds an entry named like an ISLES 2018 map (``SMIR.Brain.XX.O.<MOD>.<id>``)."""
    try:
        return any(SMIR_NAME.match(entry.name) for entry in folder_entries(folder))
    except ValueError:  # cannot be listed (lost+found of a mounted disk): nothing to tell
        return False


def find_case_folders(split_dir, problems: list[str]) -> list[Path]:
    """The ``case_*`` folders of an ISLES 2018 split folder, naturally sorted; every other entry is named.

    Why: a case folder renamed by hand (``Case_8``, ``case 8 copy``) was skipped without a word, so a study was lost
    and ``check`` could not tell. A folder of another name that holds ISLES 2018 maps is a case the user meant to
    include: its problem is added to ``problems`` (the run is refused, listing it with the other cases' problems).
    Any other entry (``README.txt``, ``__MACOSX``, ``case_5.zip``) is named in one warning line; hidden ones
    (``.DS_Store``, macOS's ``._case_1``) are ignored unless they are folders holding maps.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"'{split_dir}' is not a folder (expected an ISLES 2018 split holding case_* folders)")
    folders, misnamed, others = [], [], []
    for entry in sorted(folder_entries(split_dir), key=lambda p: natural_sort_key(p.name)):
        if entry.is_dir() and entry.name.startswith("case_"):
            folders.append(entry)
        elif entry.is_dir() and _holds_maps(entry):
            misnamed.append(entry)
        elif not entry.name.startswith("."):
            others.append(entry.name)
    problems += [
        f"'{folder}': holds ISLES 2018 maps (SMIR.Brain...) but is not named case_*, so it would not be converted: "
        f"rename it case_<N>, or move it out of '{split_dir}'"
        for folder in misnamed
    ]
    if not folders and not misnamed:
        raise FileNotFoundError(
            f"no case_* folders in '{split_dir}': point to the ISLES 2018 split folder (e.g. .../TRAINING)"
        )
    if others:
        entries = counted(len(others), "entry", "entries")
        print(f"WARNING: '{split_dir}': {entries} not converted (no case_* folder, no maps): {', '.join(others)}",
              file=sys.stderr, flush=True)
    return folders


def find_case_ct_and_series(case_dir) -> CaseFiles:
    """Locate CT, the 4D perfusion series (``<prefix>_4DPWI``, as PWI) and OT of one case folder by name, for
    ``--maps-from-4d``; vendor maps are not needed. A missing or duplicated entry is an error."""
    case_dir = Path(case_dir)
    found: dict[str, list[Path]] = {}
    for entry in sorted(case_dir.iterdir()):
        match = SMIR_NAME.match(entry.name)
        map_name = {"ct": "CT", "4dpwi": PWI_MAP, "ot": LABEL_MAP}.get(match["map"].lower()) if match else None
        if map_name is not None and (entry.is_dir() or entry.name.endswith((".nii", ".nii.gz"))):
            found.setdefault(map_name, []).append(nifti_in(entry) if entry.is_dir() else entry)
    for map_name in ("CT", PWI_MAP, LABEL_MAP):
        if len(found.get(map_name, [])) > 1:
            raise ValueError(f"'{case_dir}': {map_name} found more than once: {', '.join(map(str, found[map_name]))}")
    missing = [m for m in ("CT", PWI_MAP) if m not in found]
    if missing:
        raise ValueError(f"'{case_dir}': missing {', '.join(missing)}, needed by --maps-from-4d")
    label = found.get(LABEL_MAP, [None])[0]
    return CaseFiles(case_dir.name, case_dir, {"CT": found["CT"][0], PWI_MAP: found[PWI_MAP][0]}, label)


def load_case_from_4d(case: CaseFiles, with_label: bool, dt: float | None = None):
    """Like ``load_case``, with CBF, CBV, MTT and Tmax computed from the case's 4D series (custom.perfusion)
    instead of read from vendor maps. The series must lie on the CT's grid."""
    from custom.perfusion.commands import analyse_series

    ct_path = case.maps["CT"]
    ct_image, ct_data = load_map(ct_path)
    series_path = case.maps[PWI_MAP]
    series, result = analyse_series(series_path, dt)
    grid = np.broadcast_to(np.float32(0), series.hu.shape[:3])  # only its shape is compared
    require_same_grid(series_path, series.image, grid, ct_path, ct_image, ct_data)
    channels = [ct_data] + [result.maps[name] for name in MODALITIES[1:]]
    label = load_label(case, ct_path, ct_image, ct_data) if with_label else None
    return ct_image, np.stack(channels, axis=-1), label


def _save_on_ct_grid(data: np.ndarray, ct_image: nib.Nifti1Image, path: Path):
    """Write ``data`` with the CT's affine and header (spacing, qform/sform codes), in ``data``'s dtype."""
    header = ct_image.header.copy()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, ct_image.affine, header)
    spacing = tuple(ct_image.header.get_zooms()[:3])
    image.header.set_zooms(spacing + (1.0,) * (data.ndim - 3))
    nib.save(image, path)


def read_patient_map(csv_path, cases) -> dict[str, str]:
    """``case -> patient`` for ``cases`` from a CSV with at least the columns ``case`` and ``patient``.

    A row whose cells are all empty (spreadsheet padding) is skipped; a row with an empty ``case`` or
    ``patient``, or with more cells than the header (an unquoted comma in a note), is an error naming the file
    and line, since its case or patient would be lost or misread silently. The file must be UTF-8 (a leading
    byte-order mark, as Excel's "CSV UTF-8" writes, is dropped); another encoding is refused naming the file and
    line rather than guessed, since a guess would write misread patient names into dataset.json.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"patients CSV '{csv_path}' does not exist")
    data = csv_path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"'{csv_path}' line {line}: not UTF-8 (byte {data[err.start]:#04x}); save the patients CSV as UTF-8 "
            "(Excel: 'CSV UTF-8 (Comma delimited)')"
        ) from err
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "case" not in columns or "patient" not in columns:
            raise ValueError(f"'{csv_path}' needs a header with 'case' and 'patient' columns, found {columns}")
        mapping: dict[str, str] = {}
        for row in reader:
            if None in row:  # DictReader's key for the cells beyond the header's
                raise ValueError(
                    f"'{csv_path}' line {reader.line_num}: {len(columns) + len(row[None])} cells, more than the "
                    f"header's {len(columns)}; quote a cell that holds a comma"
                )
            row = {k.strip(): (v or "").strip() for k, v in row.items()}
            case, patient = row["case"], row["patient"]
            if not any(row.values()):
                continue
            if not case:
                raise ValueError(f"'{csv_path}' line {reader.line_num}: empty case (patient '{patient}')")
            if not patient:
                raise ValueError(f"'{csv_path}' line {reader.line_num}: case '{case}' has an empty patient")
            if mapping.get(case, patient) != patient:
                raise ValueError(f"'{csv_path}': case '{case}' has two patients, '{mapping[case]}' and '{patient}'")
            mapping[case] = patient
    absent = [c for c in cases if c not in mapping]
    if absent:
        raise ValueError(f"'{csv_path}' has no patient for training case(s): {', '.join(absent)}")
    return {c: mapping[c] for c in cases}


def slab_geometry(case: CaseFiles) -> tuple[tuple[int, ...], np.ndarray]:
    """The CT's shape and affine (header only, no voxel read): what two slabs of one patient are compared by."""
    image = load_nifti(case.maps["CT"])
    return tuple(image.shape[:3]), image.affine


def look_like_slabs_of_one_patient(first: CaseFiles, second: CaseFiles) -> bool:
    """Whether two cases look like ISLES 2018 slabs A and B of one patient: consecutive case numbers, the same
    in-plane shape, pixel spacing and axes, the same slice direction, origins that differ only along it, and
    neighbouring heights (slice ranges at most one slice apart, overlapping or not) but not the same one."""
    numbers = [re.fullmatch(r"case_(\d+)", c.name) for c in (first, second)]
    if not all(numbers) or int(numbers[1][1]) != int(numbers[0][1]) + 1:
        return False
    (shape_a, affine_a), (shape_b, affine_b) = slab_geometry(first), slab_geometry(second)
    spacing_a, spacing_b = np.linalg.norm(affine_a[:3, 2]), np.linalg.norm(affine_b[:3, 2])
    direction = affine_a[:3, 2] / spacing_a
    shift = affine_b[:3, 3] - affine_a[:3, 3]
    start_b = float(shift @ direction)  # slab A's slices span [0, end_a] along ``direction``
    end_a, end_b = (shape_a[2] - 1) * spacing_a, start_b + (shape_b[2] - 1) * spacing_b
    gap = max(start_b - end_a, -end_b)
    return (
        shape_a[:2] == shape_b[:2]
        and affines_match(affine_a[:3, :2], affine_b[:3, :2])
        and affines_match(direction, affine_b[:3, 2] / spacing_b)
        and affines_match(shift - start_b * direction, np.zeros(3))
        and abs(start_b) > AFFINE_ATOL_MM
        and gap <= max(spacing_a, spacing_b) + AFFINE_ATOL_MM
    )


def patients_from_slab_geometry(training: list[CaseFiles]) -> dict[str, str]:
    """``case -> patient`` when no patient map is given: runs of consecutive cases that look like slabs of one
    patient (``look_like_slabs_of_one_patient``) share a patient named ``case_5+case_6``; every other case
    is its own patient. Prints a loud warning with the groups, so that they can be checked.

    Why it exists: ISLES 2018 holds 94 slabs of 63 patients and says nowhere which slabs belong together;
    treating each slab as a patient would put slabs A and B of one patient in different folds, leaking the
    patient into validation. Grouping two unrelated patients only makes the folds coarser, so the
    detection errs towards grouping.
    """
    groups = [[training[0]]] if training else []
    for previous, case in zip(training, training[1:]):
        if look_like_slabs_of_one_patient(previous, case):
            groups[-1].append(case)
        else:
            groups.append([case])
    case_patient = {c.name: "+".join(g.name for g in group) for group in groups for c in group}
    grouped = [group for group in groups if len(group) > 1]
    lines = [
        "WARNING: no --patients CSV: the cases' patients are guessed. ISLES 2018 holds 94 slabs of 63 patients;",
        "slabs of one patient in different folds leak that patient into validation and inflate the scores.",
        f"Grouped as one patient ({len(grouped)} group(s) of consecutive cases with the same in-plane geometry "
        "at neighbouring heights):",
        *(f"  {' + '.join(c.name for c in group)}" for group in grouped),
        f"The other {len(training) - sum(map(len, grouped))} case(s) count as their own patient. Check this, and "
        "pass --patients CSV (columns case, patient) to set the patients yourself (see docs/data.md).",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return case_patient


def _or_problem(problems: list[str], action, *args):
    """``action(*args)``, or None after adding the message of its ValueError to ``problems``.

    Why: the converter checks every case and refuses once, listing each case's problem (as ``python -m custom
    check`` does); stopping at the first made a user with 94 cases fix one, rerun, and meet the next."""
    try:
        return action(*args)
    except ValueError as err:
        problems.append(str(err))
        return None


def _find_cases(folders: list[Path], find_case, problems: list[str]) -> list[CaseFiles]:
    """``find_case`` of each folder; the problem of a folder whose maps are not found is added to ``problems``."""
    return [case for case in (_or_problem(problems, find_case, folder) for folder in folders) if case is not None]


def _testing_cases(testing, source_names: set[str], find_case, problems: list[str]) -> list[CaseFiles]:
    """Cases of the extra testing folder; renamed ``<folder>_<case>`` if any name clashes with SRC's case folders.
    The problems of its case folders are added to ``problems``."""
    testing = Path(testing)
    cases = _find_cases(find_case_folders(testing, problems), find_case, problems)
    prefix = ""
    if any(case.name in source_names for case in cases):
        prefix = f"{testing.name}_"
        print(f"case names in '{testing}' repeat those of the source folder: naming them {prefix}<case>")
    renamed = [CaseFiles(prefix + c.name, c.folder, c.maps, None) for c in cases]
    clashes = [c.name for c in renamed if c.name in source_names]
    if clashes:
        raise ValueError(f"testing case names {clashes} from '{testing}' clash with the source folder's cases")
    return renamed


def _unlabelled_source_cases(src: Path, cases: list[CaseFiles], problems: list[str]) -> list[CaseFiles]:
    """The cases of SRC without an OT map, which go to the testing list (docs/data.md), each named in a warning.

    A case without a recognised OT that holds an entry naming OT (e.g. ``SMIR.Brain.XX.O.OT.345565 (1)`` from
    a repeated download) is refused instead (its problem added to ``problems``): its mask would be ignored and the
    case moved from training to testing with nothing but a progress line saying so.
    """
    unlabelled = []
    lines = []
    for case in (case for case in cases if case.label is None):
        names = sorted(entry.name for entry in case.folder.iterdir() if not entry.name.startswith("."))
        other = [name for name in names if not SMIR_NAME.match(name)]
        like_ot = [name for name in names if LABEL_MAP.lower() in re.split(r"[^a-z0-9]+", name.lower())]
        if like_ot:
            problems.append(
                f"'{case.folder}': no {LABEL_MAP} map recognised, but {', '.join(map(repr, like_ot))} looks like one; "
                f"name it SMIR.Brain.XX.O.{LABEL_MAP}.<number> (a folder holding one NIfTI, or a .nii/.nii.gz file) "
                "to train on the case, or move it out of the case folder to convert the case as a testing case"
            )
            continue
        unlabelled.append(case)
        lines.append(f"  '{case.folder}': found {', '.join(case.maps)}; other entries: {', '.join(other) or 'none'}")
    if unlabelled:
        lines.insert(0, f"WARNING: {len(unlabelled)} case(s) of '{src}' have no {LABEL_MAP} mask: they go to the "
                        "testing list, not to training:")
        print("\n".join(lines), file=sys.stderr, flush=True)
    return unlabelled


def _refuse_a_repeated_study(case: CaseFiles, image: np.ndarray, case_of_image: dict[str, CaseFiles]) -> None:
    """Refuse a case whose maps equal, voxel for voxel, those of a case converted before (``case_of_image``: digest
    of the stacked maps -> case, updated here).

    Why: a case folder copied under another name (``case_1 (1)`` from a repeated download) is converted as a
    patient of its own, so the same study lands in two folds, trained on and validated on, and inflates the
    cross-validation score without any sign (the file paths differ, so ``check`` cannot tell). Two studies never
    share every voxel of all five maps (a CT left all zero by data without one is no match on its own)."""
    first = case_of_image.setdefault(voxel_digest(image), case)
    if first is not case:
        raise ValueError(
            f"'{case.folder}' holds the same maps as '{first.folder}' (every voxel): one study converted twice would "
            "be trained on and validated on; remove the copy"
        )


def _read_cases(all_cases: list[tuple[CaseFiles, bool]], read, problems: list[str], work: Path | None = None):
    """Read every case of ``all_cases`` (``(case, is_training)``) with ``read(case, with_label)`` and, while
    ``problems`` is empty, write it into ``work`` (not when None); returns the training cases' lesion volumes (mL).

    A case that cannot be read or repeats an earlier case's study (``_refuse_a_repeated_study``) adds its problem to
    ``problems``, and the next case is read all the same, so that one refusal lists every case's problem."""
    lesion_ml: dict[str, float] = {}
    case_of_image: dict[str, CaseFiles] = {}

    def read_new_study(case, is_training):
        ct_image, image, label = read(case, is_training)
        _refuse_a_repeated_study(case, image, case_of_image)
        return ct_image, image, label

    for index, (case, is_training) in enumerate(all_cases, start=1):
        loaded = _or_problem(problems, read_new_study, case, is_training)
        summary = f"[{index}/{len(all_cases)}] {case.name}: "
        if loaded is None:
            print(summary + "refused (listed at the end)")
            continue
        ct_image, image, label = loaded
        summary += "x".join(map(str, image.shape[:3]))
        write = work is not None and not problems
        if write:
            image_folder = "imagesTr" if is_training else "imagesTs"
            _save_on_ct_grid(image, ct_image, work / image_folder / f"{case.name}.nii.gz")
        if is_training:
            if write:
                _save_on_ct_grid(label, ct_image, work / "labelsTr" / f"{case.name}.nii.gz")
            lesion_ml[case.name] = float(label.sum()) * voxel_volume_ml(ct_image.affine)
            summary += f", training, lesion {lesion_ml[case.name]:.1f} mL"
        else:
            summary += ", testing"
        print(summary)
    return lesion_ml


def _refuse_cases(problems: list[str]) -> ValueError:
    """The error that refuses the conversion for ``problems``, listing each."""
    listing = "\n  - ".join(problems)
    return ValueError(f"{len(problems)} problem(s) in the case folders; nothing written:\n  - {listing}")


def _refuse_inputs_inside(dst: Path, inputs: dict[str, object]):
    """Refuse a DST that is or holds an input (``what -> path``, None for an absent option): an input inside
    the old DST would be deleted with it by ``--overwrite``."""
    for what, path in inputs.items():
        if path is not None and dst.resolve() in (Path(path).resolve(), *Path(path).resolve().parents):
            raise ValueError(f"DST '{dst}' would contain {what} '{path}'; choose another DST")


IMAGE_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")  # with dataset.json, all the converter writes into DST


def _refuse_replacing_foreign_entries(dst: Path):
    """Refuse to replace an existing DST with ``--overwrite`` unless it is a dataset folder as this converter
    writes it: ``dataset.json`` and ``IMAGE_FOLDERS`` holding ``.nii.gz`` files, nothing else. Replacing
    deletes the old DST, which must not take a file of the user's with it (notes, a patients CSV, a folder
    that is no dataset at all); the error names what the converter would not have written."""
    if not dst.is_dir():
        raise FileExistsError(f"'{dst}' exists and is not a folder; --overwrite replaces only a dataset folder")
    if not (dst / "dataset.json").is_file():
        raise FileExistsError(
            f"'{dst}' holds no dataset.json, so it is not a dataset folder written by this converter; --overwrite "
            "would delete everything in it: choose another DST, or move its contents away yourself"
        )
    foreign = []
    for entry in sorted(dst.iterdir()):
        if entry.name in IMAGE_FOLDERS and entry.is_dir() and not entry.is_symlink():
            foreign += [
                f"{entry.name}/{file.name}" for file in sorted(entry.iterdir())
                if not (file.is_file() and not file.is_symlink() and file.name.endswith(".nii.gz"))
            ]
        elif entry.name != "dataset.json" or not entry.is_file():
            foreign.append(entry.name)
    if foreign:
        raise FileExistsError(
            f"'{dst}' holds {counted(len(foreign), 'entry', 'entries')} this converter does not "
            f"write, which --overwrite would delete: {', '.join(foreign)}; move them out of '{dst}' first"
        )


def _is_empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding nothing (hidden files count): a DST made beforehand (``mkdir -p``) is
    filled as if it did not exist, as the phantom fills an empty OUT; nothing in it can be lost."""
    return path.is_dir() and not any(path.iterdir())


def _remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: the parents of DST that a failed run created, so
    a refused conversion leaves nothing behind (``write_folder_atomically`` removes only its temporary folder)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else wrote there meanwhile) or already gone: leave the rest
            return


def prepare_isles2018(
    src: str,
    dst: str,
    patients: str | None = None,
    folds=4,
    seed=0,
    testing: str | None = None,
    overwrite=False,
    maps_from_4d=False,
    dt=None,
):
    """Convert an ISLES 2018 split folder SRC (holding case_*) into the dataset folder DST; returns DST.

    Cases with an OT map go to ``training`` with a patient-grouped, lesion-volume-balanced ``fold``; the
    other cases of SRC and every case of ``testing`` go to ``testing``. The inputs are checked before anything
    is written; every case is read, and broken cases are refused at once, one line each (docs/data.md). DST is
    written to a temporary sibling folder and renamed at the end, so a failure leaves no DST (nor the parent
    folders this run created).

    Args:
        src: ISLES 2018 split folder holding case_* folders, e.g. ISLES2018/TRAINING.
        dst: dataset folder to write (see docs/data.md).
        patients: CSV with columns ``case`` and ``patient`` (others ignored); without it the patients are
            guessed from the slab geometry (``patients_from_slab_geometry``), with a warning.
        folds: number of cross-validation folds.
        seed: seed of the fold assignment's tie-breaking.
        testing: optional extra split folder (e.g. ISLES2018/TESTING) whose cases all go to ``testing``.
        overwrite: replace an existing DST (only once the new one is complete), if it holds nothing but what
            this converter writes (``_refuse_replacing_foreign_entries``). An empty DST needs no ``overwrite``.
        maps_from_4d: compute CBF, CBV, MTT and Tmax from each case's 4D series (``CT_4DPWI``) with
            custom.perfusion instead of reading the vendor maps (docs/perfusion.md).
        dt: time step (s) of the 4D series when their headers lack it (with ``maps_from_4d``).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not _is_empty_folder(dst) and not overwrite:
        raise FileExistsError(f"'{dst}' already exists; pass --overwrite to replace it")
    inputs = {"the source folder": src, "the --testing folder": testing, "the --patients CSV": patients}
    _refuse_inputs_inside(dst, inputs)
    if dst.exists() and not _is_empty_folder(dst):
        _refuse_replacing_foreign_entries(dst)
    if testing is not None and Path(testing).resolve() == src.resolve():
        raise ValueError(f"--testing '{testing}' is the source folder SRC '{src}': its cases would be converted twice")

    find_case = find_case_ct_and_series if maps_from_4d else find_case_maps
    problems: list[str] = []  # of every case, refused at once (``_refuse_cases``)
    source_folders = find_case_folders(src, problems)
    cases = _find_cases(source_folders, find_case, problems)
    testing_cases = _unlabelled_source_cases(src, cases, problems)
    training = [c for c in cases if c.label is not None]
    if not training and not problems:
        raise ValueError(f"no labelled case (with an {LABEL_MAP} map) in '{src}': nothing to train on")
    if testing is not None:
        testing_cases += _testing_cases(testing, {f.name for f in source_folders}, find_case, problems)
    all_cases = [(c, True) for c in training] + [(c, False) for c in testing_cases]
    read = functools.partial(load_case_from_4d, dt=dt) if maps_from_4d else load_case
    if problems:  # patients CSV and folds are checked once every case is found; the others are read to list theirs
        _read_cases(all_cases, read, problems)
        raise _refuse_cases(problems)
    training_names = [c.name for c in training]
    if patients is None:
        case_patient = patients_from_slab_geometry(training)
    else:
        case_patient = read_patient_map(patients, training_names)
    validate_fold_count(len(set(case_patient.values())), folds)

    def convert(work: Path) -> None:
        for folder in IMAGE_FOLDERS:
            (work / folder).mkdir()
        lesion_ml = _read_cases(all_cases, read, problems, work)
        if problems:
            raise _refuse_cases(problems)
        fold_of = assign_folds(case_patient, lesion_ml, folds, seed)
        dataset = {
            "name": dst.name,
            "description": "Ischemic stroke lesion segmentation from CT perfusion maps, converted from the "
            "ISLES 2018 layout; folds grouped by patient",
            "modality": {str(i): name for i, name in enumerate(MODALITIES)},
            "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
            "numTraining": len(training),
            "numTest": len(testing_cases),
            "num_folds": folds,
            "training": [
                {
                    "image": f"imagesTr/{name}.nii.gz",
                    "label": f"labelsTr/{name}.nii.gz",
                    "fold": fold_of[name],
                    "patient": case_patient[name],
                    "case": name,
                }
                for name in training_names
            ],
            "testing": [{"image": f"imagesTs/{c.name}.nii.gz", "case": c.name} for c in testing_cases],
        }
        (work / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
        if dst.exists() and not _is_empty_folder(dst):  # again just before DST is replaced: files may have come
            _refuse_replacing_foreign_entries(dst)

    new_folders = [folder for folder in (dst.parent, *dst.parent.parents) if not folder.exists()]
    try:
        require_writable_folder(dst.parent)
        write_folder_atomically(dst, convert, overwrite=overwrite or dst.exists())  # an existing DST: empty, or asked
    except BaseException:
        _remove_empty_folders(new_folders)
        raise
    # the path itself is the last line, printed by the command line (python -m custom) as the returned value
    print(f"converted {counted(len(training), 'training case')} in {counted(folds, 'fold')} and "
          f"{counted(len(testing_cases), 'testing case')}")
    return dst
