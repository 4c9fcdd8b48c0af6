"""The settings a training run's weights depend on, recorded beside its checkpoints and checked by every run that
loads them.

Why it exists: ``model.pt`` is a plain state dict (MONAI Label, ``monai.bundle ckpt_export`` and MONAI's
``CheckpointLoader`` read it so) and holds no settings. Weights trained with ``--contralateral_channels difference``
have the 10 input channels of ``mirror`` and were evaluated and served with it without a word; a run resumed from
another fold's checkpoint in its folder (``--fold 1 --ckpt_dir runs/f0 --resume_ckpt runs/f0/...``) restored that
fold's best Dice and trained on from its weights, and one resumed with other loss overrides trained on with another
objective. train.json's ``training_record`` writes ``TRAINING_RECORD`` into
``ckpt_dir`` when a run starts, once its cases are screened and before they are cached (after refusing a resume whose
record differs; a run refused for its data leaves no record); ``custom.handlers`` compares the
record beside a checkpoint it loads with the loading run's ``INPUT_SETTINGS``, and evaluate.json's ``check_held_out``
refuses to score a checkpoint on cases it was trained on (known by their voxels, in any conversion); a MONAI Label
fine-tune of the served copy keeps the served weights' record and adds its studies; an ensemble checkpoint carries
its members' input settings inside it (``embed_record``). A checkpoint without a record beside it (runs of earlier
versions, a ``model.pt`` copied alone) is loaded unchecked.
Standard library, ``custom.atomic``, ``custom.data.datalist`` and ``custom.wording`` only, so
``custom.monailabel_app`` imports it without MONAI.

The shipped ``bundle/models/model.pt`` has its record, ``bundle/models/training_inputs.json`` (none up to 0.3.15; the
bundle archive and MONAI Label's served copy carry it): that of ``python -m custom accuracy-bench --out runs/accuracy
--budget_s 720`` of 0.3.0, which trained it on folds 1 to 3 of its training phantom (seed 2026), with the input
settings that give its 5 channels, and its dataset.json and images named as that command writes them from the
repository root (no path of the machine it ran on). Its ``trained_images`` are the digests of that phantom as this
version generates and converts it, identical to those of the code that trained the weights (docs/deployment.md,
"The shipped weights' training record"). A retrain with other input settings must write it again
(``tests/test_shipped_record.py``).
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from custom.atomic import write_text_atomically
from custom.data.datalist import IMAGE_DIGEST, scored_dataset_sha256
from custom.wording import counted

logger = logging.getLogger(__name__)

TRAINING_RECORD = "training_inputs.json"
BEST_MODEL = "model.pt"  # train.json's best (or final) model in ckpt_dir
# Exports of BEST_MODEL's weights that a bundle's models/ may hold beside it (``python -m custom package`` packs them).
EXPORTS = ("model.ts", "model.onnx")
# The config ids that decide what the network sees: weights trained with them need the same values wherever they run.
INPUT_SETTINGS = ("contralateral_channels", "adjacent_slices", "spacing_mm")
# Input settings added after records were first written, with the value their absence from a record means: the
# weights were trained before the setting existed, so without it (spacing_mm: records up to 0.3.16).
ABSENT_INPUT_SETTINGS = {"spacing_mm": None}
# What a resumed run must share with the run it continues, besides the input settings.
RUN_SETTINGS = ("fold", "dataset_json_sha256")
# The record key of the SHA-256 of the part of dataset.json that decides training (``custom.data.datalist.
# scored_dataset_sha256``: training cases, folds, labels, modality). A resume compares it in place of
# ``dataset_json_sha256`` where the record holds it (absent from records up to 0.3.15, compared by the whole file):
# a dataset.json changed only in its testing list or description trains the same.
SCORED_DATASET = "scored_dataset_sha256"
# The record keys of dataset.json's hashes, with what each covers as ``check_record`` names it.
_DATASET_HASHES = {"dataset_json_sha256": "SHA-256", SCORED_DATASET: "training cases, folds and labels of SHA-256"}
# The record key of the loss's config ids (``custom.config_check.config_values``: ``{"loss#lambda_gdl": 0, ...}``),
# which a resumed run must share too: it would train on with another objective. Absent from records up to 0.3.15.
LOSS = "loss"
# The record key of the MONAI Label studies that the served copy's fine-tunes trained on (``write_training_record``):
# study path -> the digests of every version of it trained on (a study replaced under its name keeps both).
FINE_TUNED_IMAGES = "fine_tuned_images"


def record_of(checkpoint) -> Path:
    """The record that belongs to ``checkpoint``: ``TRAINING_RECORD`` in its folder."""
    return Path(checkpoint).parent / TRAINING_RECORD


def read_record(checkpoint) -> dict | None:
    """The record beside ``checkpoint`` (a dict), or None where there is none; an unreadable record names itself."""
    path = record_of(checkpoint)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"training record '{path}' of checkpoint '{checkpoint}' cannot be read: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"training record '{path}' of checkpoint '{checkpoint}' is not a JSON object")
    return record


def run_record(input_settings: Mapping, fold, dataset_dir, trained_cases=None, loss=None) -> dict:
    """The record of a training run: its ``input_settings`` (``INPUT_SETTINGS`` -> value), its fold, its dataset
    (``dataset.json``'s path and SHA-256), ``trained_images``, the ``case_digests`` of ``trained_cases`` (the
    entries it trains on), by which ``check_held_out`` knows them in any conversion, and its ``loss`` (``LOSS``:
    config id -> value, null where not given). The dataset and the images are null where the run has no
    dataset.json (MONAI Label's served copy, which is given its studies: ``write_training_record`` records them as
    ``FINE_TUNED_IMAGES``)."""
    if set(input_settings) != set(INPUT_SETTINGS):
        raise ValueError(f"input settings must be exactly {list(INPUT_SETTINGS)}, got {sorted(input_settings)}")
    dataset = _dataset_identity(dataset_dir)
    named = dataset["dataset_json"] is not None and trained_cases is not None
    trained_images = case_digests(trained_cases) if named else None
    return {**{key: input_settings[key] for key in INPUT_SETTINGS}, "fold": fold, **dataset,
            "trained_images": trained_images, LOSS: None if loss is None else dict(loss)}


def case_digests(cases) -> dict[str, str]:
    """Image path -> ``custom.data.studies.voxel_digest`` of each entry of ``cases``: the digest ``fold_datalist``
    computed while screening it (``IMAGE_DIGEST``), else (an entry of another list) the image read for it."""
    from custom.data.studies import read_nifti, voxel_digest  # here: numpy and nibabel, only for such an entry

    return {
        str(case["image"]): case.get(IMAGE_DIGEST) or voxel_digest(read_nifti(case["image"])[1]) for case in cases
    }


def _dataset_identity(dataset_dir) -> dict:
    dataset_json = Path(str(dataset_dir)) / "dataset.json"
    contents = dataset_json.read_bytes() if dataset_json.is_file() else None
    return {
        "dataset_json": None if contents is None else os.path.abspath(dataset_json),
        "dataset_json_sha256": None if contents is None else hashlib.sha256(contents).hexdigest(),
        SCORED_DATASET: None if contents is None else scored_dataset_sha256(json.loads(contents)),
    }


def embed_record(state: Mapping, record: Mapping) -> None:
    """Store ``record`` inside the state dict ``state`` (under ``TRAINING_RECORD`` in its ``_metadata``), so that the
    file it is saved to carries it: ``embedded_record`` reads it back.

    Why it exists: an ensemble checkpoint (``python -m custom ensemble-checkpoint``) is written where its members'
    records are not (``bundle/models/`` beside a ``model.pt`` of its own record, or none), so a record beside it would
    describe the folder's other weights. ``_metadata`` is the state dict's own attribute for such data: ``torch.load``
    keeps it with ``weights_only=True`` and ``load_state_dict`` (strict or not, ``ckpt_export``'s included) reads only
    its module prefixes, which a file name (``training_inputs.json``) is not."""
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        raise ValueError("the state dict to carry a training record has no _metadata (not a module's state_dict())")
    metadata[TRAINING_RECORD] = dict(record)


def embedded_record(state) -> dict | None:
    """The record ``embed_record`` stored in the loaded state dict ``state``, or None where it carries none."""
    record = (getattr(state, "_metadata", None) or {}).get(TRAINING_RECORD)
    return dict(record) if isinstance(record, Mapping) else None


def check_record(
    checkpoint, settings: Mapping, action: str = "loaded", otherwise: str = "", embedded: Mapping | None = None
) -> None:
    """Refuse ``checkpoint`` if the record beside it differs from ``settings`` (id -> this run's value) on any of
    their ids, naming the checkpoint, the record, each differing id with both values and the override to pass
    (``otherwise``: what else the user can do). A checkpoint without a record passes (nothing to compare).
    ``embedded``: the record the checkpoint file carries itself (``embedded_record``), compared in place of a record
    beside it."""
    record = read_record(checkpoint) if embedded is None else embedded
    if record is None:
        return
    record = {**ABSENT_INPUT_SETTINGS, **record}
    recorded_in = (
        f"'{os.path.normpath(record_of(checkpoint))}'" if embedded is None
        else "the checkpoint itself, from its members' records"
    )
    differing = [key for key in settings if _compared(key, record, settings) and record[key] != settings[key]]
    if not differing:
        return
    lines = [line for key in differing for line in _difference(key, record, settings[key])]
    raise ValueError(
        f"checkpoint '{os.path.normpath(checkpoint)}' was trained with other settings than this run's (recorded in "
        f"{recorded_in}) and is not {action}; pass the overrides in brackets:\n  "
        + "\n  ".join(lines) + otherwise
    )


def _compared(key: str, record: Mapping, settings: Mapping) -> bool:
    """Whether ``check_record`` compares the id ``key`` of this run's ``settings`` with ``record``."""
    if key not in record:
        return False  # recorded only by later versions (SCORED_DATASET and LOSS: not up to 0.3.15)
    if key in _DATASET_HASHES and record[key] is None:
        return False  # a run without dataset.json (MONAI Label's served copy) names no dataset
    if key == "dataset_json_sha256" and record.get(SCORED_DATASET) is not None and SCORED_DATASET in settings:
        return False  # its scored part is compared instead: a change of the testing list alone trains the same
    if key == LOSS and None in (record[key], settings[key]):
        return False  # a record or a run written without its loss (``write_training_record``'s loss=None)
    return True


def _difference(key: str, record: Mapping, this_run) -> list[str]:
    """The lines of ``check_record``'s refusal for the id ``key``, whose value in ``record`` differs from this run's
    ``this_run``, each with the override that gives the recorded value."""
    if key == LOSS:
        return _loss_differences(record[key], this_run)
    if key in _DATASET_HASHES:
        trained_on = record.get("dataset_json")
        folder = os.path.dirname(trained_on) if trained_on else "<its dataset folder>"
        part = _DATASET_HASHES[key]
        return [
            f"dataset: trained on '{trained_on}' ({part} {record[key][:12]}...), this run's dataset.json has {part} "
            f"{str(this_run)[:12]}... (--dataset_dir '{folder}')"
        ]
    return [f"{key}: trained with {record[key]!r}, this run {this_run!r} (--{key} {record[key]})"]


def _loss_differences(trained: Mapping, this_run: Mapping) -> list[str]:
    """One line per loss config id whose value differs between the record (``trained``) and this run, with the
    override that gives the trained value (an id the trained run did not set is left out)."""
    lines = []
    for config_id in sorted(set(trained) | set(this_run)):
        if config_id not in trained:
            lines.append(f"{config_id}: not set in training, this run {this_run[config_id]!r} "
                         f"(leave --{config_id} out)")
        elif config_id not in this_run:
            lines.append(f"{config_id}: trained with {trained[config_id]!r}, not set in this run "
                         f"(--{config_id} {trained[config_id]})")
        elif trained[config_id] != this_run[config_id]:
            lines.append(f"{config_id}: trained with {trained[config_id]!r}, this run {this_run[config_id]!r} "
                         f"(--{config_id} {trained[config_id]})")
    return lines


def check_held_out(checkpoint, fold, dataset_dir, cases) -> None:
    """Refuse to evaluate ``checkpoint`` on ``cases`` (fold ``fold`` of ``dataset_dir``, ``fold_datalist`` entries)
    where its record says it was trained on any of them: its Dice would be that of cases it learnt, without a word.

    A record with ``trained_images`` (``run_record``) or ``FINE_TUNED_IMAGES`` is compared by content: any case whose
    image has the voxels of an image the checkpoint was trained on is refused, whatever the conversion, fold or file
    name (a fold-0 model of a dataset converted again with other folds, ``--patients``, ``--seed`` or ``--folds``; its
    own fold of another conversion), and cases of another dataset that only share names pass. An earlier record (up
    to 0.3.12) names its fold and dataset.json only: refused where the dataset.json is the same (SHA-256) and the fold
    another, or either fold -1 (every case) (``--fold 1 --ckpt_path runs/fold0/model.pt`` scored fold 0's model on
    its own training cases). The weights of a MONAI Label fine-tune are refused the studies it trained on too
    (``FINE_TUNED_IMAGES``), and those the served weights were trained on (their record, kept). A checkpoint without
    a record, or whose record names neither a dataset nor studies, passes."""
    record = read_record(checkpoint)
    if record is None:
        return
    dataset_json = Path(str(dataset_dir)) / "dataset.json"
    checkpoint_trained = f"checkpoint '{os.path.normpath(checkpoint)}' was trained on"
    recorded = f"recorded in '{os.path.normpath(record_of(checkpoint))}'"
    learnt, advice = [], "evaluate it on images it was not trained on"
    if record.get("dataset_json_sha256") is not None and "fold" in record:
        trained_fold = record["fold"]
        trained_on = "every case" if trained_fold == -1 else f"every fold but {trained_fold}"
        same_dataset = _dataset_identity(dataset_dir)["dataset_json_sha256"] == record["dataset_json_sha256"]
        if same_dataset and trained_fold != -1:
            advice = f"evaluate its own fold with --fold {trained_fold}"
        elif trained_fold != -1 and os.path.abspath(record["dataset_json"]) == os.path.abspath(dataset_json):
            advice = f"'{dataset_json}' changed since it was trained (converted again?): train fold {fold} on it again"
        elif trained_fold != -1:
            folder = os.path.dirname(record["dataset_json"])
            advice = (
                f"evaluate it on the dataset it was trained on (--dataset_dir '{folder}' --fold {trained_fold}), or "
                f"train fold {fold} of '{dataset_json}' and evaluate that model"
            )
        # a record of 0.3.12 or earlier (or of a fine-tune of such weights): no images, only the fold and dataset.json
        if record.get("trained_images") is None and same_dataset and not trained_fold == fold != -1:
            raise ValueError(
                f"{checkpoint_trained} {trained_on} of '{record.get('dataset_json')}' ({recorded}): config id 'fold' "
                f"{fold} scores cases it was trained on; {advice}"
            )
        learnt.append(f"trained on {trained_on} of '{record['dataset_json']}'")
    if record.get(FINE_TUNED_IMAGES):
        learnt.append(f"fine-tuned in MONAI Label on {counted(len(record[FINE_TUNED_IMAGES]), 'study', 'studies')}")
        advice = "evaluate it on images it was not trained on"
    shared = trained_images_among(record, case_digests(cases))
    if not shared:
        return
    raise ValueError(
        f"{checkpoint_trained} {len(shared)} of the {counted(len(cases), 'image')} of config id 'fold' {fold} of "
        f"'{dataset_json}': {', '.join(shared)} (same voxels; it was {' and '.join(learnt)}, {recorded}). Their "
        f"scores would be those of cases it learnt: {advice}"
    )


def trained_images_among(record: Mapping, digests: Mapping[str, str]) -> list[str]:
    """The images of ``digests`` (image path -> ``case_digests`` value) that the weights of ``record`` were trained
    on (its ``trained_images`` and ``FINE_TUNED_IMAGES``, none where it has neither), each as its file name, with the
    name it was trained under where that differs."""
    trained_as = {digest: image for image, digest in (record.get("trained_images") or {}).items()}
    trained_as.update({digest: image for image, digests in fine_tuned_digests(record).items() for digest in digests})
    return [
        Path(image).name + ("" if Path(image).name == Path(trained_as[digest]).name
                            else f" (trained as '{trained_as[digest]}')")
        for image, digest in digests.items()
        if digest in trained_as
    ]  # fmt: skip


def fine_tuned_digests(record: Mapping) -> dict[str, list[str]]:
    """``FINE_TUNED_IMAGES`` of ``record``: study path -> the digests of every version of it a fine-tune trained on.

    Why it exists: a study replaced in MONAI Label's datastore under its name (a corrected upload) keeps its path, and a
    record holding one digest per path forgot the version the weights learnt first. Records written before lists hold
    one digest (a string) per study, read here as a list of one."""
    return {
        image: [digests] if isinstance(digests, str) else list(digests)
        for image, digests in (record.get(FINE_TUNED_IMAGES) or {}).items()
    }


def write_training_record(
    ckpt_dir, input_settings: Mapping, fold, dataset_dir, resume_ckpt=None, trained_cases=None, fine_tuned_cases=None,
    loss=None,
) -> dict:
    """Write the record of this training run (``run_record``; ``trained_cases``: train.json's ``train#datalist``;
    ``loss``: its loss's config ids, ``custom.config_check.config_values``) into ``ckpt_dir``; returns it.

    ``fine_tuned_cases``: the studies of a MONAI Label fine-tune of the served copy (``check_labelled_studies``). It
    trains on from the served ``model.pt``, so its record is that of those weights (their fold, dataset and
    ``trained_images``, by which ``check_held_out`` refuses their training cases) with the digests of its studies
    added to ``FINE_TUNED_IMAGES`` (the earlier fine-tunes' kept, and so the earlier version of a study replaced under
    its name): a record naming its studies only let the fine-tuned weights be scored on the images the served fold
    model learnt. The served copy's ``EXPORTS`` of the weights it replaces are removed, with a warning naming each:
    MONAI Label serves ``model.pt`` and never looks at them, but a copy of the served bundle deployed through its
    ``model.ts`` ran the weights the fine-tunes started from.

    A resumed run is refused first if the record beside ``resume_ckpt`` names other input settings, another fold,
    another dataset.json (it would restore that run's best Dice and train on from its weights: compared by its
    ``SCORED_DATASET`` where the record holds it, so a change of its testing list alone is accepted) or another loss (it
    would train on with another objective; a record without a loss, up to 0.3.15, is not compared on it). A new run
    replacing another in ``ckpt_dir`` (``check_ckpt_dir`` let it: ``--overwrite True``) whose record describes other
    weights (``_describes_other_weights``) removes that run's ``model.pt`` first: it would sit under this run's record
    until this run's first validation and, after a stop before it, be loaded as this run's.
    Every rank of a multi-process run checks and writes the same record (each write is atomic)."""
    record = run_record(input_settings, fold, dataset_dir, trained_cases, loss)
    folder = Path(str(ckpt_dir))
    earlier_model, earlier = folder / BEST_MODEL, read_record(folder / BEST_MODEL)
    if resume_ckpt is None and earlier_model.is_file() and _describes_other_weights(earlier, record):
        how = "trained otherwise" if earlier else "with no training record"
        logger.warning(f"removing '{earlier_model}': the best model of the run this one replaces, {how}")
        earlier_model.unlink(missing_ok=True)  # another rank of this run may have removed it
    if resume_ckpt is not None:
        check_record(
            resume_ckpt, {key: record[key] for key in INPUT_SETTINGS + RUN_SETTINGS + (SCORED_DATASET, LOSS)},
            action="resumed",
            otherwise="\nor train with this run's settings into another --ckpt_dir, without --resume_ckpt",
        )  # fmt: skip
    if fine_tuned_cases is not None:
        for export in (folder / name for name in EXPORTS if (folder / name).is_file()):
            logger.warning(f"removing '{export}': an export of the served weights this fine-tune replaces (MONAI Label "
                           f"serves {BEST_MODEL}); export the fine-tuned weights again before deploying them")
            export.unlink(missing_ok=True)  # another rank of this run may have removed it
        continued = (earlier or {}) if earlier_model.is_file() else {}
        kept = RUN_SETTINGS + (SCORED_DATASET, "dataset_json", "trained_images")
        fine_tuned = fine_tuned_digests(continued)
        for image, digest in case_digests(fine_tuned_cases).items():
            versions = fine_tuned.setdefault(image, [])
            if digest not in versions:
                versions.append(digest)
        record = {**record, **{key: continued[key] for key in kept if key in continued}, FINE_TUNED_IMAGES: fine_tuned}
    write_text_atomically(folder / TRAINING_RECORD, json.dumps(record, indent=4) + "\n")
    return record


def _describes_other_weights(earlier: Mapping | None, record: Mapping) -> bool:
    """Whether weights recorded by ``earlier`` would be misdescribed by ``record``: other input settings, or, where
    this run names a dataset, another fold or dataset.json (the shipped ``bundle/models/``, replaced by
    ``--ckpt_dir models --overwrite True``), no record (runs up to 0.3.11, a ``model.pt`` copied alone) or MONAI Label
    fine-tunes (``FINE_TUNED_IMAGES``: this run's record would not name their studies). A run
    naming no dataset (MONAI Label's served copy: each fine-tune starts from the served model.pt under the same input
    settings, and its record keeps theirs) keeps them."""
    if earlier is not None and any(earlier.get(key) != record[key] for key in INPUT_SETTINGS):
        return True
    if record["dataset_json_sha256"] is None:
        return False
    return earlier is None or bool(earlier.get(FINE_TUNED_IMAGES)) or any(
        earlier.get(key) != record[key] for key in RUN_SETTINGS
    )
