"""Read a converted dataset folder (``dataset.json``) into the lists the bundle configs consume.

MONAI's ``load_decathlon_datalist`` knows neither folds nor the ``testing`` entries of this
project's data contract, and it reports a missing folder only as a missing file; these helpers
select a cross-validation fold and name the folder or key at fault. Standard library only (the readers are
imported where used): the MONAI-free runner imports ``output_case_name``, ``refuse_earlier_outputs`` and
``nifti_files_in`` and is copied with this file.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# "validate": the held-out cases a training run picks its best model on; "evaluate": the same cases, scored by
# evaluate.json, where a fold without any lesion is accepted (its false-positive volume is a legitimate measurement).
ROLES = ("train", "validate", "evaluate")
# The key of a fold_datalist entry holding its image's ``custom.data.studies.voxel_digest``, computed by the
# screening that reads every image anyway: training records the digests, evaluation compares with them. Not named
# "image_...": MONAI's Spacingd (spacing_mm) updates every "<key>_..." item of its keys as a metadata dict, and failed
# on this string.
IMAGE_DIGEST = "voxels_sha256"
# The keys of dataset.json that decide the folds' results and a training run's; its testing list (``testing``,
# ``numTest``) and description decide none.
SCORED_DATASET_KEYS = ("modality", "labels", "num_folds", "training")


def scored_dataset(dataset: dict) -> dict:
    """The ``SCORED_DATASET_KEYS`` of a parsed dataset.json: what of it decides a cross-validation's results."""
    return {key: dataset[key] for key in SCORED_DATASET_KEYS if key in dataset}


def scored_dataset_sha256(dataset: dict) -> str:
    """SHA-256 of the ``SCORED_DATASET_KEYS`` of a parsed dataset.json (keys sorted): what of it decides a
    cross-validation's or a training run's results. ``compare-cv`` compares runs by it: cv trains and scores the
    training cases only, so two runs on conversions that differ in their testing cases alone were refused as runs of
    different datasets; ``custom.training_record`` records it so that a resume is refused for a change of this part
    only."""
    return hashlib.sha256(json.dumps(scored_dataset(dataset), sort_keys=True).encode()).hexdigest()


def dataset_key(*records: dict) -> str:
    """The key by which run ``records`` name their dataset for comparison: ``scored_dataset_sha256`` where every one
    holds it, else (a record of an earlier version) ``dataset_json_sha256``, the whole file's.

    Why it exists: cv, baseline, score-masks and montage compare datasets by the scored part (a change of the testing
    list alone refused their reruns and comparisons) and must still read their earlier records."""
    scored = "scored_dataset_sha256"
    return scored if all(record.get(scored) is not None for record in records) else "dataset_json_sha256"


def load_dataset_json(dataset_dir, required_keys: tuple[str, ...] = ()) -> dict:
    """The parsed ``dataset.json`` of ``dataset_dir``; clear errors for a missing folder, file or required key."""
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset_dir '{folder}' does not exist (convert data with `python -m custom prepare`)")
    path = folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing: '{folder}' is not a converted dataset folder")
    with open(path) as f:
        try:
            dataset = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"'{path}' is not valid JSON: {err}") from err
    for key in required_keys:
        if key not in dataset:
            raise ValueError(f"'{path}' has no '{key}' key")
    return dataset


def _absolute(folder: Path, entry: dict, keys) -> dict:
    return {k: str(folder / v) if k in keys else v for k, v in entry.items()}


def fold_datalist(dataset_dir, fold: int, role: str) -> list[dict]:
    """Training entries for one role of a cross-validation split, with absolute paths.

    ``role="train"`` gives every case whose ``fold`` differs from ``fold``; ``role="validate"`` and
    ``role="evaluate"`` the cases of ``fold``. ``fold=-1`` trains on all cases and validates on all of them (a fit
    check, not a held-out score). Every selected case is read first and the list is refused, naming each bad file,
    if any case cannot be trained or scored on (see ``refuse_unusable_cases``); each entry gets its image's
    digest under ``IMAGE_DIGEST`` (``custom.training_record``). Training or validation cases none of whose labels
    holds a lesion voxel are refused (``cases_without_lesion``); evaluation cases are not.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got '{role}'")
    folder = Path(dataset_dir)
    dataset = load_dataset_json(folder)
    training = dataset.get("training")
    if not training:
        raise ValueError(f"'{folder / 'dataset.json'}' has no 'training' entries")
    if fold != -1:
        _refuse_bad_folds(folder, dataset)
    folds = sorted({e.get("fold") for e in training}, key=str)
    if fold != -1 and fold not in folds:
        raise ValueError(f"fold {fold} not found in '{folder / 'dataset.json'}' (folds present: {folds})")
    if fold == -1:
        selected = training
    elif role == "train":
        selected = [e for e in training if e["fold"] != fold]
    else:
        selected = [e for e in training if e["fold"] == fold]
    if not selected:
        raise ValueError(f"no '{role}' cases for fold {fold} in '{folder / 'dataset.json'}'")
    if fold != -1:
        _refuse_files_in_both_roles(folder, training, fold)
    screened = refuse_unusable_cases(
        folder, selected, lambda e: f"dataset.json training case {e.get('case')!r}",
        f"'{folder / 'dataset.json'}': fold {fold} '{role}' cases",
        "Fix or remove these cases from dataset.json (`python -m custom check` lists every problem).",
    )
    if role != "evaluate" and not any(holds_lesion for holds_lesion, _ in screened):
        raise ValueError(f"'{folder / 'dataset.json'}': {cases_without_lesion(fold, role, len(selected))}")
    return [
        {**_absolute(folder, entry, ("image", "label")), IMAGE_DIGEST: digest}
        for entry, (_, digest) in zip(selected, screened)
    ]


def cases_without_lesion(fold: int, role: str, count: int) -> str:
    """The problem of the ``count`` training or validation cases of ``fold`` (``role`` ``"train"`` or ``"validate"``)
    when none of their labels holds a lesion voxel; :func:`fold_datalist` refuses them, ``python -m custom cv`` before
    its first fold.

    Why: training on them, MONAI's RandCropByPosNegLabeld only warns and crops background: hours of training to a
    network that predicts no lesion (labels emptied by a conversion or a misaligned export look like this). Validating
    on them, every case scores Dice 0 where the network predicts any lesion voxel and 1 where it predicts none
    (``custom.metrics.EMPTY_MASK_CONVENTION``; MONAI's ``DiceMetric`` with ``ignore_empty``: NaN, averaged to 0.0):
    ``model.pt``, the best-Dice checkpoint, was the first validated model (0.0 at every epoch, the first kept, on a
    size-64 phantom whose fold 0 labels were emptied), or would be the first that predicts no lesion anywhere."""
    from custom.wording import counted  # here: the MONAI-free runner is copied with this module, not with wording

    what = "training" if role == "train" else "validation"
    consequence = (
        "the network would learn to predict none" if role == "train"
        else "the best model would be picked on empty labels, where Dice rewards predicting no lesion"
    )
    return (
        f"no label of the {counted(count, f'{what} case')} of fold {fold} holds a lesion voxel: {consequence}. "
        "`python -m custom check` prints each fold's lesion volume; fix the labels if they were emptied, or convert "
        "the dataset again with other folds (`python -m custom prepare isles2018 ... --folds K --seed S`) so that "
        "every fold holds a lesion"
    )


def _refuse_bad_folds(folder: Path, dataset: dict) -> None:
    """Refuse a split whose training entries lack a valid ``fold`` or put a patient in two folds, naming each
    (``custom.data.check.fold_assignment_problems``, the rules of ``python -m custom check``).

    Why: an entry of fold ``"1"`` (a string) or ``4`` of 4 folds was trained on in every fold and validated in none,
    and one without ``fold`` failed with a bare ``KeyError``; slabs of one patient in two folds are validated on what
    the model trained on. ``num_folds`` is the dataset's, if it gives a valid one."""
    from custom.data.check import dataset_num_folds, fold_assignment_problems  # here: check imports this module

    problems = fold_assignment_problems(dataset["training"], dataset_num_folds(dataset))
    if problems:
        listing = "\n  - ".join(problems)
        raise ValueError(
            f"'{folder / 'dataset.json'}': the folds of its training cases cannot be used:\n  - {listing}\n"
            "Give every training case an integer fold, the same for all cases of a patient."
        )


def _refuse_files_in_both_roles(folder: Path, training: list[dict], fold: int) -> None:
    """Refuse a fold whose validation cases list an image or label file that one of its training cases lists too.

    Why: one study under two entries (a copied dataset.json line, a study in two folds) is validated on what the
    model trained on, so the best-Dice checkpoint and its score are optimistic without any sign of it."""

    def files(entries):
        return {(folder / str(e[key])).resolve() for e in entries for key in ("image", "label") if key in e}

    shared = files(e for e in training if e.get("fold") == fold) & files(e for e in training if e.get("fold") != fold)
    if shared:
        raise ValueError(
            f"'{folder / 'dataset.json'}': fold {fold}'s validation and training cases list the same file(s) "
            f"({', '.join(sorted(map(str, shared)))}): the model would be validated on what it trained on "
            "(`python -m custom check` names the entries)"
        )


def check_labelled_studies(train, validate=None) -> list[dict]:
    """Refuse the studies of a MONAI Label fine-tune as :func:`fold_datalist` refuses a fold's cases, naming each file;
    returns the ``train`` entries, each with its image's digest under ``IMAGE_DIGEST`` (the fine-tune's training
    record names them: ``custom.training_record.write_training_record``).

    ``train`` and ``validate`` are what MONAI Label's ``BundleTrainTask`` sets as ``train#dataset#data`` and
    ``validate#dataset#data`` (``{"image", "label"}`` entries with absolute paths from its datastore). Why it exists:
    MONAI Label fills the datasets itself, past ``fold_datalist``. Without a labelled study the fine-tune died inside
    MONAI's DataLoader; a label whose affine differs from its study's (stored in another orientation) was trained on
    as its voxels lay; training labels without any lesion voxel made the fine-tune replace the served ``model.pt``
    with a network that predicts no lesion, and validation labels without any (``val_split`` took only lesion-free
    studies) replaced it with the model picked on empty labels (``cases_without_lesion``). The served copy's datasets
    require this check (``custom.monailabel_app``).
    """
    from custom.wording import counted  # here, as in cases_without_lesion

    train, validate = list(train or []), list(validate or [])
    if not train:
        raise ValueError("MONAI Label gave the fine-tune no labelled study to train on: submit labels (tag 'final')")
    screened = refuse_unusable_cases(
        Path(), train + validate, lambda entry: "MONAI Label's datastore", "MONAI Label's labelled studies",
        "Correct these labels and submit them again, or remove them (DELETE /datastore/label).",
    )
    lesions = [holds_lesion for holds_lesion, _ in screened]
    for what, entries, holds_lesion, problem in (
        ("training", train, lesions[: len(train)],
         "the fine-tune would teach the served model to predict none; submit labels that draw the lesion"),
        ("validation", validate, lesions[len(train):],
         "the fine-tune would pick the model.pt it serves on empty labels, where Dice rewards predicting no lesion; "
         "submit a label that draws the lesion for one of them (MONAI Label validates on the last val_split share of "
         "its labelled studies, in the datastore's order), or fine-tune with val_split 0 (no validation: the last "
         "epoch's weights are served)"),
    ):  # fmt: skip
        if entries and not any(holds_lesion):
            raise ValueError(
                f"none of the labels of MONAI Label's {counted(len(entries), f'{what} study', f'{what} studies')} "
                f"holds a lesion voxel ({', '.join(str(e.get('label')) for e in entries)}): {problem}"
            )
    return [{**entry, IMAGE_DIGEST: digest} for entry, (_, digest) in zip(train, screened)]


def refuse_unusable_cases(folder: Path, entries: list[dict], where, what: str, remedy: str) -> list[tuple[bool, str]]:
    """Read every image and label of ``entries`` (paths relative to ``folder``) and refuse them all in one
    ValueError ("``what`` cannot be used", each problem naming its file, ``where(entry)`` an entry whose file is
    missing, then ``remedy``); otherwise return, for each entry, whether its label holds a lesion voxel and its
    image's ``voxel_digest``.

    Why: a case that is unreadable, has NaN/Inf, the wrong channels, a non-binary or mismatched label, or an
    all-zero perfusion map otherwise fails deep inside a DataLoader worker (an all-zero map gives
    ``RandCropByPosNegLabeld`` "No sampling location available") or trains on garbage. The rules are those of
    ``python -m custom check``; the policy is to refuse, not to leave cases out, so a score is never computed
    on fewer cases than listed without the user deciding it.
    """
    from custom.data.check import inspect_training_entry  # here, not at the top: check imports this module

    inspected = [inspect_training_entry(folder, entry, where(entry)) for entry in entries]
    problems = [problem for entry_problems, _, _ in inspected for problem in entry_problems]
    if problems:
        listing = "\n  - ".join(problems)
        raise ValueError(f"{what} cannot be used:\n  - {listing}\n{remedy}")
    return [(holds_lesion, digest) for _, holds_lesion, digest in inspected]


def nifti_files_in(folder: Path) -> list[str]:
    """The names of the NIfTI files directly in ``folder`` (hidden files, such as AppleDouble ``._x.nii.gz``, left
    out), to name in place of a folder given where files are expected; none for a folder that cannot be listed,
    whose own problem is reported where it is read."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(
        p.name for p in entries if p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith(".")
        and p.is_file()
    )


def inference_datalist(dataset_dir) -> list[str]:
    """Image files to segment: the dataset's ``testing`` list.

    A dataset without testing images is refused rather than segmenting its training images instead: masks of
    images the model was trained on look better than they are. Pass the files explicitly (``--datalist``) to
    segment any other images.
    """
    folder = Path(dataset_dir)
    dataset = load_dataset_json(folder)
    entries = dataset.get("testing")
    if not entries:
        raise ValueError(
            f"'{folder / 'dataset.json'}' lists no 'testing' images; to segment other images name them "
            "explicitly, e.g. --datalist \"['/data/a.nii.gz', '/data/b.nii.gz']\""
        )
    if not isinstance(entries, list):  # a string would be read as one image per character
        raise ValueError(f"'{folder / 'dataset.json'}' 'testing': expected a list of images, found a "
                         f"{type(entries).__name__}")
    images = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "image" not in entry:
            raise ValueError(f"'{folder / 'dataset.json'}' testing[{index}] has no 'image' key")
        image = entry["image"] if isinstance(entry, dict) else entry
        if not isinstance(image, str):
            raise ValueError(f"'{folder / 'dataset.json'}' testing[{index}]: expected the path of one 5-channel NIfTI "
                             f"file, found {image!r}")
        images.append(str(folder / image))
    return images


def output_case_name(image) -> str:
    """The case name under which inference writes an image's outputs (``<case>_seg.nii.gz``, the ``case`` column
    of ``lesion_volumes.csv``): the file name without ``.gz`` and then one more extension, the rule by which
    MONAI's ``SaveImaged`` names the bundle's masks (``monai.data.create_file_basename``), so that the table, the
    refusals and the MONAI-free runner name the file the bundle writes; an ISLES case folder (the runner) keeps
    its whole name."""
    path = Path(os.path.abspath(str(image)))
    if path.is_dir():
        return path.name
    stem, extension = os.path.splitext(path.name)
    return os.path.splitext(stem)[0] if extension == ".gz" else stem


def shared_case_name(images) -> tuple[str, str, str] | None:
    """``(case name, first image, second image)`` of the first two ``images`` with one :func:`output_case_name`
    (``a/case.nii.gz`` and ``b/case.nii``), else None: their outputs (inference's masks, MONAI Label's studies) would
    be one file, the second written over the first."""
    seen: dict[str, str] = {}
    for image in images:
        name = output_case_name(image)
        if name in seen:
            return name, seen[name], str(image)
        seen[name] = str(image)
    return None


def refuse_a_shared_case_name(images, where: str) -> None:
    """Refuse ``images`` two of which have one :func:`output_case_name` (:func:`shared_case_name`), naming both and
    ``where`` they were given: the second output would replace the first. One file given twice is named as such:
    the advice for two files, to rename one, cannot help there."""
    shared = shared_case_name(images)
    if not shared:
        return
    name, first, second = shared
    if os.path.realpath(first) == os.path.realpath(second):
        also = "" if first == second else f" (also as '{first}')"
        raise ValueError(f"{where}: '{second}' is given twice{also}; list each image once")
    raise ValueError(f"{where}: '{first}' and '{second}' would both write '{name}_seg.nii.gz'; rename one")


def relative_path_note(image) -> str:
    """For the refusal of an input ``image`` that does not exist: the current folder, where a relative path is read
    from (not from the folder of a datalist file that lists it, nor the dataset's), or nothing for an absolute path."""
    return "" if os.path.isabs(str(image)) else f" (a relative path is read from the current folder, '{os.getcwd()}')"


def refuse_earlier_outputs(folder, images, overwrite=False, postfixes=("seg",), tables=(),
                           setting="output folder", overwrite_flag="--overwrite", folder_flag="--out",
                           unwritten=(), case_folder=".") -> None:
    """Refuse a segmentation run that would replace files of an earlier run in ``folder``, unless ``overwrite``:
    ``<case>_<postfix>.nii.gz`` per image and postfix in ``case_folder`` under ``folder`` (the names of
    ``SaveImaged`` with ``separate_folder`` false and of the MONAI-free runner) and ``tables``. The message names
    ``setting`` and the two flags of the caller.

    ``unwritten``: postfixes of a case's outputs that this run does not write (an uncertainty map of a run without
    one, evaluation's masks without ``save_masks``). An earlier run's such files of this run's cases are refused
    too and, with ``overwrite``, removed here, so that no folder pairs this run's outputs of a case with an earlier
    run's (a mask beside the uncertainty map of another run). An output whose file is one of ``images`` (an input
    ``a_seg.nii.gz`` beside ``a.nii.gz``, written into their folder) is refused even with ``overwrite``: that input
    was replaced by a mask and then set aside as a 3D image. Files of cases this run does not process are left:
    this run's cases are those of its table. The earlier ``tables`` are removed here too, with ``overwrite``: this
    run writes its own at its end, and a run stopped before (full disk, killed) left the earlier table beside its
    new masks, whose volumes it no longer matched."""
    def outputs(kinds):
        return [str(Path(case_folder) / f"{output_case_name(image)}_{kind}.nii.gz")
                for image in images for kind in kinds]

    masks, stale = outputs(postfixes), outputs(unwritten)
    inputs = {os.path.realpath(str(image)) for image in images}
    for name in [*masks, *stale, *tables]:
        if os.path.realpath(Path(str(folder)) / name) in inputs:  # even with overwrite: it would destroy an input
            raise FileExistsError(
                f"{setting} '{os.path.normpath(str(folder))}': {name} is an input of this run and the name of an "
                f"output it writes, which would replace that input: write into another {folder_flag}"
            )
    earlier = [name for name in [*masks, *stale, *tables] if (Path(str(folder)) / name).exists()]
    if earlier and overwrite is not True:
        raise FileExistsError(
            f"{setting} '{os.path.normpath(str(folder))}' holds {len(earlier)} file(s) of an earlier run that this run "
            f"would replace ({earlier[0]}{', ...' if len(earlier) > 1 else ''}): replace them with {overwrite_flag}, "
            f"or write into another {folder_flag}"
        )
    for name in [*stale, *tables]:
        (Path(str(folder)) / name).unlink(missing_ok=True)


def refuse_earlier_file(path, overwrite=False, option="--out") -> None:
    """``refuse_earlier_outputs`` for a command whose output is the one file ``path`` (an archive, a checkpoint, a
    table), named by the command's ``option``: it was replaced without a word (``ensemble-checkpoint --out
    bundle/models/model.pt`` wrote an ensemble over the trained weights)."""
    path = Path(str(path))
    refuse_earlier_outputs(path.parent, [], overwrite, postfixes=(), tables=(path.name,),
                           setting=f"the folder of {option}", folder_flag=option)  # fmt: skip


@dataclass
class ScreenedImages:
    """The images inference can segment (``usable``) and the others with their reason (``rejected``)."""

    usable: list[str]
    rejected: dict[str, str]


def screen_inference_images(images) -> ScreenedImages:
    """Read every image to segment and set aside those that cannot be segmented, so one bad case never stops
    the others (``custom.handlers.RejectedImagesReporter`` reports them and fails the run at its end).

    Refused up front, with both paths named: two images that would write one output (same case name from two
    folders). Set aside: a missing or unreadable file, or one breaking the data contract (shape, NaN/Inf,
    an all-zero perfusion map; the rules of ``python -m custom check``). Raises when no image is usable.
    """
    from custom.data.studies import image_problems, read_nifti  # not at the top: this module is standard library only

    if isinstance(images, (str, os.PathLike)):  # --datalist a.nii.gz: one image
        images = [images]
    for image in images:
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"datalist: {image!r} is not a path; list 5-channel NIfTI files: \"['/data/a.nii.gz']\"")
    images = [str(image) for image in images]
    if not images:
        raise ValueError("datalist: no image to segment")
    refuse_a_shared_case_name(images, "datalist")
    usable, rejected = [], {}
    for image in images:
        if Path(image).is_dir():
            held = nifti_files_in(Path(image))
            remedy = (
                f"list its {len(held)} NIfTI file(s) instead, e.g. '{Path(image) / held[0]}'" if held
                else "convert ISLES 2018 case folders with `python -m custom prepare isles2018`, or segment them with "
                "`python -m custom deploy`"
            )
            rejected[image] = f"{image}: a folder, not a 5-channel NIfTI file ({remedy})"
            continue
        if not Path(image).is_file():
            rejected[image] = f"{image}: missing{relative_path_note(image)}"
            continue
        try:
            nifti, data = read_nifti(image, image)
            problems = image_problems(image, data, nifti.affine)
        except ValueError as err:
            problems = [str(err)]
        if problems:
            rejected[image] = "; ".join(problems)
        else:
            usable.append(image)
    if not usable:
        raise ValueError("datalist: no image can be segmented:\n  - " + "\n  - ".join(rejected.values()))
    return ScreenedImages(usable, rejected)
