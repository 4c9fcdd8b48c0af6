"""Refuse bundle settings of the wrong type, override ids that nothing uses, a training run that would
overwrite an earlier run's checkpoints or draw over its TensorBoard logs, and an inference or evaluation run that
would replace an earlier run's masks or tables, naming the config id.

Why it exists: ``python -m monai.bundle run --epochs abc`` fails deep inside Ignite with an error that
names no config id, and ``--epochz 5`` is added to the configuration and silently ignored, so the run
trains with the default epochs. MONAI validates neither. The configs' ``check_settings`` id, the first
step of ``run``, calls ``check_settings`` with the resolved values of their documented ids before anything
is built (not ``initialize``: MONAI puts the bundle root, and so a bundle's own copy of ``custom``, on the
Python path only when ``run`` starts); train.json's ``check_ckpt_dir`` and the ``check_output_dir`` of
inference.json and evaluate.json follow it. ``config_values`` gives train.json's training record the loss's config
ids as the run's configuration holds them (``custom.training_record``).
"""

import inspect
import json
import os
import re
import warnings
from numbers import Real
from pathlib import Path

import ignite.distributed as idist
from monai.bundle import ConfigParser
from monai.bundle.config_item import ConfigComponent
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS
from monai.utils.module import locate

from custom.atomic import require_writable_folder
from custom.clinical import VOLUME_TABLE
from custom.data.datalist import refuse_earlier_outputs
from custom.data.studies import VOXEL_MM_RANGE
from custom.deploy import usable_device
from custom.lifecycle import latest_checkpoint
from custom.symmetry import ContralateralChannels


def whole_number(value) -> bool:
    """An int and not a bool (``True == 1``): the rule of every count option, config id or command-line flag."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _flag(key: str) -> tuple:
    """The rule of a bool setting: fire passes ``--key false`` as the string 'false', which is truthy."""
    return (lambda v: isinstance(v, bool), f"True or False (a bool: --{key} True on the command line)")


def _present_device(value) -> bool:
    """A device PyTorch parses and, for CUDA, one this machine has (``custom.deploy.usable_device``, the rule of the
    runner and of ``python -m custom``): ``--device cpux`` or ``--device cuda:1`` on a one-GPU machine failed when the
    network was moved, in PyTorch's words, naming no config id. (MONAI Label sets ``device`` itself, to the CPU where
    CUDA is missing.)"""
    try:
        usable_device(value)
    except ValueError:
        return False
    return True


def _patch_size(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(whole_number(v) and (v == -1 or (v > 0 and v % 16 == 0)) for v in value)
    )


# A folder id given on the command line as a name that Fire, monai.bundle's command line, reads as a number:
# `--ckpt_dir 2018_01` became 201801, which wrote training_inputs.json and the TensorBoard files to a folder
# "201801" and then failed deep in pathlib (`expected str, bytes or os.PathLike object, not int`).
_FOLDER = (
    lambda v: isinstance(v, (str, os.PathLike)),
    "a folder path (the command line reads a name such as 2018_01 as the number 201801: pass ./2018_01)",
)
# Documented id -> (test of its resolved value, what the value must be).
SETTING_RULES = {
    "dataset_dir": _FOLDER,
    "ckpt_dir": _FOLDER,
    "output_dir": _FOLDER,
    "epochs": (lambda v: whole_number(v) and v >= 1, "a whole number >= 1"),
    "val_interval": (lambda v: whole_number(v) and v >= 1, "a whole number >= 1"),
    "warmup_epochs": (lambda v: whole_number(v) and v >= 0, "a whole number >= 0"),
    "learning_rate": (lambda v: _number(v) and v > 0, "a number > 0"),
    "batch_size": (lambda v: whole_number(v) and v >= 1, "a whole number >= 1"),
    "samples_per_volume": (lambda v: whole_number(v) and v >= 1, "a whole number >= 1"),
    "patch_size": (_patch_size, "two whole numbers, each -1 (whole slice) or a positive multiple of 16"),
    "num_folds": (lambda v: whole_number(v) and v >= 2, "a whole number >= 2"),
    "num_workers": (lambda v: whole_number(v) and v >= 0, "a whole number >= 0"),
    "adjacent_slices": (lambda v: whole_number(v) and v >= 0, "a whole number >= 0 (slices on each side; 0 is off)"),
    "contralateral_channels": (
        lambda v: v is None or v in ContralateralChannels.MODES,
        f"null (off) or one of {', '.join(ContralateralChannels.MODES)}",
    ),
    "spacing_mm": (
        lambda v: v is None or (_number(v) and VOXEL_MM_RANGE[0] <= v <= VOXEL_MM_RANGE[1]),
        f"null (off: each image's own grid) or a number of mm from {VOXEL_MM_RANGE[0]} to {VOXEL_MM_RANGE[1]} (the "
        "in-plane voxel size to resample to)",
    ),
    "cache_rate": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    "lesion_threshold": (lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "min_lesion_ml": (lambda v: _number(v) and v >= 0, "a number >= 0 (mL; 0 keeps every lesion)"),
    "seed": (whole_number, "a whole number"),
    # checked here, before the datasets are cached and TensorBoard's files created, not when the trainer is built
    "time_budget_s": (
        lambda v: v is None or (whole_number(v) and v >= 1), "null (off) or a whole number of seconds >= 1"
    ),
    # checked before the dataset is cached, not after, as MONAI's CheckpointLoader would
    "resume_ckpt": (
        lambda v: v is None or (isinstance(v, str) and Path(v).is_file()), "null or an existing checkpoint file"
    ),
    "ckpt_path": (lambda v: isinstance(v, str), "a checkpoint path"),
    "overwrite": _flag("overwrite"),
    "amp": _flag("amp"),
    "device": (_present_device, "a device of this machine: cpu, or cuda / cuda:N where N < the GPU count"),
    "save_masks": _flag("save_masks"),
    "write_uncertainty": _flag("write_uncertainty"),
}
# Root ids that MONAI's workflow reads by name (entry points, imports, metadata, experiment tracking)
# rather than through a reference.
WORKFLOW_IDS = {"imports", "initialize", "run", "training", "finalize", "_meta_"}
WORKFLOW_IDS |= {key for settings in DEFAULT_EXP_MGMT_SETTINGS.values() for key in settings.get("configs", {})}
_REFERENCE = re.compile(r"[@%]([\w#:]+)")  # @id, @id#sub, %id::sub; the root id ends at # or ::


def check_settings(bundle_root, **settings) -> None:
    """Refuse any of ``settings`` (documented id -> resolved value) that breaks ``SETTING_RULES``, ``fold``
    outside ``range(num_folds)`` other than -1 (every training case, as ``fold_datalist`` reads it), and any
    root id of the running configuration that nothing uses and that no config file of ``bundle_root/configs``
    defines (a misspelt override).

    All problems are reported in one ``ValueError``, each naming its config id.
    """
    problems = [
        f"config id '{key}' must be {SETTING_RULES[key][1]}, got {value!r}"
        for key, value in settings.items()
        if key in SETTING_RULES and not SETTING_RULES[key][0](value)
    ]
    if "fold" in settings:
        fold, num_folds = settings["fold"], settings.get("num_folds")
        if not whole_number(fold) or (whole_number(num_folds) and not -1 <= fold < num_folds):
            problems.append(
                f"config id 'fold' must be a whole number from 0 to num_folds - 1, or -1 (every training case), "
                f"got {fold!r} (num_folds is {num_folds!r}: --num_folds N for a dataset of N folds)"
            )
    parser, config_folder = _running_parser(), Path(str(bundle_root)) / "configs"
    if parser is None or not config_folder.is_dir():
        warnings.warn(f"config_check: no running ConfigParser or no '{config_folder}': override ids not checked")
    else:
        config = parser.get()
        known = known_ids(config_folder)
        unknown = [key for key in unused_root_ids(config) if key not in known]
        valid = ", ".join(sorted(key for key in config if key not in WORKFLOW_IDS and key not in unknown))
        problems += [
            f"config id '{key}' is used by nothing in the configuration and defined in no config of "
            f"'{config_folder}': a misspelt override? (ids of this configuration: {valid})"
            for key in unknown
        ]
    if problems:
        raise ValueError("invalid bundle settings:\n  " + "\n  ".join(problems))


def _resumes_in(ckpt_dir, resume_ckpt) -> bool:
    return isinstance(resume_ckpt, str) and Path(resume_ckpt).resolve().parent == Path(str(ckpt_dir)).resolve()


def check_ckpt_dir(ckpt_dir, resume_ckpt=None, overwrite=False) -> None:
    """Refuse a training run that would replace an earlier run's checkpoints in ``ckpt_dir``.

    Why it exists: MONAI's and Ignite's checkpoint savers replace ``model.pt`` and
    ``latest_checkpoint_epoch=<n>.pt`` of the same names without a word, so a second run with the same
    ``ckpt_dir`` would lose the first run's model. Allowed: a folder without ``*.pt`` files, a run resuming
    from a checkpoint in that folder, and ``overwrite`` true. A run resuming from a checkpoint in another folder
    is refused: it restores that run's best Dice, so its own validations need not beat it and the folder could
    end without a ``model.pt`` (the resumed run's best model stays where it was written).
    """
    folder = Path(str(ckpt_dir))
    if resume_ckpt is not None and not _resumes_in(folder, resume_ckpt):
        raise ValueError(
            f"config id 'resume_ckpt': '{os.path.normpath(resume_ckpt)}' is not in ckpt_dir "
            f"'{os.path.normpath(folder)}': a resumed run goes on in the folder of the run it continues, where that "
            f"run's model.pt and best Dice are: add --ckpt_dir '{os.path.normpath(Path(resume_ckpt).parent)}'"
        )
    earlier = sorted(path.name for path in folder.glob("*.pt")) if folder.is_dir() else []
    if earlier and resume_ckpt is None and overwrite is not True:
        newest = latest_checkpoint(folder)
        resume = f"continue that run with --resume_ckpt '{os.path.normpath(newest)}', " if newest else ""
        raise FileExistsError(
            f"config id 'ckpt_dir': '{os.path.normpath(folder)}' holds checkpoints of an earlier run "
            f"({', '.join(earlier)}) that this run would overwrite: {resume}replace them with --overwrite True, "
            f"or train into another --ckpt_dir"
        )


def claim_log_dir(output_dir, ckpt_dir, resume_ckpt=None, overwrite=False) -> str:
    """``output_dir`` as the TensorBoard folder of a training run, once no earlier run's event files are in it.

    Why it exists: TensorBoard draws all event files of a folder as one run, so a second run logging into the
    same ``output_dir`` would draw its curves over the first's. Allowed: a folder without
    ``events.out.tfevents.*`` files and a run resuming from a checkpoint in ``ckpt_dir`` (its curves go on);
    with ``overwrite`` true the earlier run's event files are removed (the run replaces that run), otherwise
    the run is refused. train.json's TensorBoard handlers take their ``log_dir`` from this, so it runs before
    they create this run's files, whenever they are built; train.json's ``run`` resolves it before
    ``training_record``, so a refused run leaves no ``ckpt_dir`` record behind. In a multi-process run every rank
    resolves this id
    (multi_gpu_train.json builds the TensorBoard handlers on rank 0 only): rank 0 checks, the others wait for it.
    """
    folder = Path(str(output_dir))
    if idist.get_rank() == 0 and folder.is_dir() and not _resumes_in(ckpt_dir, resume_ckpt):
        earlier = sorted(folder.glob("events.out.tfevents.*"))
        if earlier and overwrite is True:
            for path in earlier:
                path.unlink()
        elif earlier:
            raise FileExistsError(
                f"config id 'output_dir': '{os.path.normpath(folder)}' holds TensorBoard logs of an earlier run "
                f"({len(earlier)} events.out.tfevents.* files) that this run's curves would be drawn over: "
                f"replace them with --overwrite True, or log into another --output_dir"
            )
    idist.barrier()  # no-op in a single process
    return str(output_dir)


def check_output_dir(output_dir, images, write_uncertainty=False, overwrite=False) -> None:
    """Refuse an inference run that would replace the masks or the table of an earlier run in ``output_dir``.

    Why it exists: MONAI's ``SaveImaged`` replaces files of the same name without a word, and a mask in an output
    folder may have been corrected by hand since (3D Slicer saves a label map over the file it was loaded from).
    A case's outputs are its mask and its uncertainty map, whichever this run writes, so a run without
    ``write_uncertainty`` never leaves an earlier run's map beside its new mask. Allowed: none of these files
    exists, or ``overwrite`` true (they are replaced; an earlier uncertainty map this run does not write is
    removed). The folder is probed with a file (where it will be made, if it does not exist yet), so an unwritable
    one fails before the first image rather than at its first mask.
    """
    require_writable_folder(output_dir, create=False)
    written = ("seg", "uncertainty") if write_uncertainty else ("seg",)
    refuse_earlier_outputs(
        output_dir, images, overwrite, written, (VOLUME_TABLE,),
        setting="config id 'output_dir':", overwrite_flag="--overwrite True", folder_flag="--output_dir",
        unwritten=() if write_uncertainty else ("uncertainty",),
    )


def check_evaluation_dir(output_dir, images, metrics, save_masks=False, overwrite=False) -> None:
    """Refuse an evaluation (evaluate.json) that would replace the metric tables or masks of an earlier one in
    ``output_dir``.

    Why it exists: MONAI's ``MetricsSaver`` and ``SaveImaged`` replace files of the same name without a word, so a
    second evaluation into the same folder replaced ``metrics.csv`` and the per-case tables (perhaps with fewer
    cases) and mixed its masks with the first's. An evaluation's outputs are ``metrics.csv``,
    ``<metric>_raw.csv`` and ``<metric>_summary.csv`` of each of ``metrics`` (MetricsSaver's names) and
    ``masks/<case>_seg.nii.gz`` of each of ``images``, written with ``save_masks`` (without it an earlier mask of
    these cases is refused too: it would sit beside metrics it was not scored by). Allowed: none of these files
    exists, or ``overwrite`` true (they are replaced, and those earlier masks removed; masks of cases this run
    does not evaluate are left, this run's cases are the rows of its ``*_raw.csv``), as inference's
    ``check_output_dir``. In a multi-process evaluation (multi_gpu_evaluate.json) every rank checks and waits for
    the others: a rank that started late took the masks an earlier rank had just written for an earlier run's.
    The folders written (``masks`` with ``save_masks``) are probed with a file (where they will be made, if they do
    not exist yet), so an unwritable one fails before the first case rather than when MetricsSaver writes the tables
    at the end.
    """
    for folder in [output_dir] + ([Path(str(output_dir)) / "masks"] if save_masks else []):
        require_writable_folder(folder, create=False)
    tables = ["metrics.csv"] + [f"{name}_{kind}.csv" for name in metrics for kind in ("raw", "summary")]
    refuse_earlier_outputs(
        output_dir, images, overwrite, ("seg",) if save_masks else (), tables,
        setting="config id 'output_dir':", overwrite_flag="--overwrite True", folder_flag="--output_dir",
        unwritten=() if save_masks else ("seg",), case_folder="masks",
    )
    idist.barrier()  # no-op in a single process


def unused_root_ids(config: dict) -> list[str]:
    """Root ids of ``config`` that no ``@``/``%`` reference names and that the workflow does not run."""
    referenced = set()
    pending = [config]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            referenced |= {re.split("#|::", match)[0] for match in _REFERENCE.findall(item)}
    return sorted(key for key in config if key not in referenced and key not in WORKFLOW_IDS)


def known_ids(config_folder) -> set[str]:
    """Root ids defined by the JSON configs of ``config_folder`` (the bundle's ``configs``)."""
    ids = set()
    for path in Path(config_folder).glob("*.json"):
        if path.name == "metadata.json":  # MONAI reads it as _meta_, its keys are no config ids
            continue
        content = json.loads(path.read_text())
        if isinstance(content, dict):
            ids |= set(content)
    return ids


def config_values(root_id: str) -> dict:
    """The running configuration's ``root_id`` as config id -> value, as written: overrides applied, references and
    expressions unresolved, nested ids joined with ``#`` (train.json's ``loss`` gives ``{"loss#_target_":
    "custom.losses.WeightedCEGeneralizedDiceLoss", "loss#gdl_batch": True}``; ``--loss#lambda_gdl 0`` adds
    ``"loss#lambda_gdl": 0``), a value that is no dictionary under ``root_id`` itself. Where ``root_id`` names a
    ``_target_``, each argument of its signature that the config does not set is added with its default (a number,
    text, bool or null; train.json's loss adds ``"loss#lambda_gdl": 1.0`` and the others), so that an argument set to
    its default equals one left out.

    Why it exists: a config item is given the resolved content of another (the instantiated loss, which keeps none
    of its arguments), and training records the loss's config ids so that a resume with another loss is refused
    naming them (``custom.training_record``)."""
    parser = _running_parser()
    if parser is None:
        raise RuntimeError(f"config_values('{root_id}') reads the running bundle configuration, and none is running")

    def flattened(value, config_id: str) -> dict:
        if not isinstance(value, dict):
            return {config_id: value}
        ids = {}
        for name, content in value.items():
            ids.update(flattened(content, f"{config_id}#{name}"))
        return ids

    config = parser.get(root_id)
    ids = flattened(config, root_id)
    target = config.get("_target_") if isinstance(config, dict) else None
    if isinstance(target, str):
        component = locate(ConfigComponent(config, id=root_id).resolve_module_name())
        for name, parameter in inspect.signature(component).parameters.items():
            default = parameter.default
            if default is not parameter.empty and (default is None or isinstance(default, (bool, int, float, str))):
                ids.setdefault(f"{root_id}#{name}", default)
    return ids


def _running_parser() -> ConfigParser | None:
    """The ConfigParser resolving the calling config item: MONAI gives an item no handle on it, but it is on
    the call stack (``ConfigParser.get_parsed_content`` -> reference resolver -> ``instantiate`` -> here)."""
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    return None
