"""Standalone lesion segmentation with the exported TorchScript model: torch, numpy, scipy and nibabel only.

Clinical machines that run the model often cannot install MONAI. This module reproduces the bundle's
``configs/inference.json`` step by step, so its masks equal the bundle's voxel for voxel:
``LoadImaged`` (nibabel) -> ``EnsureChannelFirstd`` -> ``NormalizeWithinBraind`` -> ``DivisiblePadd(k=16,
symmetric)`` -> ``SliceInferer`` (2D slices in batches) -> softmax -> crop the padding (``Invertd``) ->
lesion probability above ``lesion_threshold`` within the brain of the input maps (``BrainMaskd``, ``LesionMaskd``)
-> lesions under ``min_lesion_ml`` removed
(``RemoveSmallLesionsd``) -> uint8 NIfTI on the input grid,
plus the ``LesionVolumeWriter`` table (``custom.clinical``: lesion and clinical volumes from the raw maps,
research use only).

It imports nothing from MONAI, and from the rest of ``custom`` only its ``__version__`` (the runner's bundle version),
``custom.atomic``, ``custom.data.datalist`` and ``custom.training_record`` with its ``custom.wording`` (standard
library; the training record beside a model names the input settings of its weights), ``custom.clinical`` (numpy),
``custom.lesions`` (numpy and scipy) and ``custom.data.studies`` (numpy and nibabel: the case reader and the input
checks, shared with the converter and the dataset check); the other modules import MONAI. Keep it so: the tests run
it with MONAI made unimportable and from a copy of these files (docs/deployment.md). It also holds the brain
normalisation that the bundle's ``custom.transforms.NormalizeWithinBrain`` wraps, so the two cannot diverge.
"""

import argparse
import contextlib
import json
import os
import sys
import traceback
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import torch

from custom import __version__ as RUNNER_VERSION
from custom.atomic import require_writable_folder, write_atomically
from custom.clinical import MODALITIES, VOLUME_TABLE, brain_mask, case_volumes, describe, write_volume_table
from custom.clinical import PERFUSION_CHANNELS as BRAIN_CHANNELS  # brain: any of CBF, CBV, MTT, Tmax non-zero
from custom.data.datalist import (
    nifti_files_in, output_case_name, refuse_a_shared_case_name, refuse_earlier_outputs, relative_path_note,
)
from custom.data.studies import SMIR_NAME, find_case_maps, image_problems, load_case, read_nifti
from custom.lesions import check_lesion_threshold, check_min_volume, lesion_from_probabilities, remove_small_lesions
from custom.training_record import read_record, record_of

CLASSES = ("background", "lesion")
CLIP_PERCENTILES = (0.5, 99.5)  # brain percentiles each channel is clipped to before its z-score
NORMALIZE_EPS = 1e-6  # floor of the brain standard deviation
LESION_THRESHOLD = 0.5  # inference.json's lesion_threshold (a test checks that they agree)
MIN_LESION_ML = 0.5  # inference.json's min_lesion_ml (a test checks that they agree)
SPATIAL_DIVISOR = 16  # the U-Net's four stride-2 levels need H and W divisible by 2**4
TRACEBACK_VARIABLE = "CTP_TRACEBACK"  # set (to any text) to see the traceback of a command line's refusal
PACKAGE = Path(__file__).resolve().parent  # this project's code, whose raise statements are its refusals
# What the runner feeds the network: the 5 maps on the grid they come with, no contralateral or neighbouring-slice
# channels, no resampling. The values of inference.json's input settings (custom.training_record.INPUT_SETTINGS) that
# take it; a test checks that they agree.
RUNNER_INPUT_SETTINGS = {"contralateral_channels": None, "adjacent_slices": 0, "spacing_mm": None}
METADATA_FILE = "metadata.json"  # the bundle's metadata as ckpt_export and export_onnx embed it (its "version")


def _refuse_problems(path: Path, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` if it and its ``affine`` meet the data contract (``custom.data.studies.image_problems``, the rules
    of the bundle and of ``python -m custom check``); a ValueError naming the file and every problem otherwise."""
    problems = image_problems(f"'{path}'", volume, affine)
    if problems:
        raise ValueError("; ".join(problems))
    return volume


def read_stacked_image(path) -> tuple[np.ndarray, np.ndarray]:
    """The (H, W, D, 5) float32 data and affine of a converted 5-channel NIfTI, read as the bundle's LoadImaged
    reads it (nibabel's affine, the NIfTI scaling applied) and checked as the bundle checks it; every problem raises
    a ValueError naming the file."""
    path = Path(path)
    image, data = read_nifti(path)
    return _refuse_problems(path, np.asarray(data, dtype=np.float32), image.affine), image.affine


def read_case(path) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, D, 5) float32 data and affine of an input: a 5-channel NIfTI file or an ISLES 2018 case folder
    (``custom.data.studies.load_case``: every map on the CT's grid, nothing resampled).

    Every problem of the input raises a ValueError naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input '{path}' does not exist")
    if not path.is_dir():
        return read_stacked_image(path)
    ct_image, volume, _ = load_case(find_case_maps(path), with_label=False)
    return _refuse_problems(path, volume, ct_image.affine), ct_image.affine


def brain_quantiles(values: torch.Tensor, quantiles: Sequence[float]) -> tuple[float, ...]:
    """Quantiles (linear interpolation) of a 1D float64 tensor, any number of elements.

    ``torch.quantile`` of the PyTorch releases this project supports (setup.cfg: >= 2.4) refuses inputs
    above 2**24 elements (16.7 M, less than the brain of a 512 x 512 x 320 volume; pytorch/pytorch#64947,
    lifted only in 2026); numpy's ``quantile`` has no limit and the same definition.
    """
    return tuple(float(q) for q in np.quantile(values.cpu().numpy(), quantiles))


def normalize_within_brain(volume: torch.Tensor, mask_channels: Sequence[int] = BRAIN_CHANNELS,
                           percentiles: Sequence[float] = CLIP_PERCENTILES,
                           eps: float = NORMALIZE_EPS) -> torch.Tensor:  # fmt: skip
    """The brain normalisation of a channel-first (C, spatial...) float32 tensor, for the bundle
    (``custom.transforms.NormalizeWithinBrain`` wraps it) and the runner alike.

    The brain is where any of ``mask_channels`` is non-zero. Per channel: clip the brain voxels to their
    ``percentiles`` (linear interpolation), z-score them with the population std (floored at ``eps``), zero
    everything outside the brain. A volume without brain voxels gives zeros.
    """
    if volume.shape[0] <= max(mask_channels):
        raise ValueError(f"expected channels {tuple(mask_channels)} in a channel-first image, got shape {volume.shape}")
    brain = (volume[list(mask_channels)] != 0).any(dim=0)
    out = torch.zeros_like(volume)
    if brain.any():
        quantiles = [p / 100.0 for p in percentiles]
        for c in range(volume.shape[0]):
            values = volume[c][brain].double()
            low, high = brain_quantiles(values, quantiles)
            values = values.clamp(low, high)
            mean, std = values.mean(), values.std(unbiased=False)
            out[c][brain] = ((values - mean) / std.clamp_min(eps)).float()
    return out


def symmetric_padding(size: int, divisor: int = SPATIAL_DIVISOR) -> tuple[int, int]:
    """Padding (before, after) that makes ``size`` a multiple of ``divisor``, split as MONAI's
    ``DivisiblePad(method="symmetric")`` splits it: half before, the odd remainder after."""
    total = -size % divisor
    return total // 2, total - total // 2


@torch.inference_mode()
def class_probabilities(network, volume: np.ndarray, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """The (2, H, W, D) float32 class probabilities (background, lesion) of one (H, W, D, 5) volume, slice by slice.

    ``network`` maps a (B, 5, H', W') float32 batch to (B, 2, H', W') logits (the TorchScript model,
    or any callable doing the same); H' and W' are H and W padded to multiples of 16.
    """
    image = normalize_within_brain(torch.movedim(torch.from_numpy(np.asarray(volume, dtype=np.float32)), -1, 0))
    (h_before, h_after), (w_before, w_after) = (symmetric_padding(s) for s in image.shape[1:3])
    padded = torch.nn.functional.pad(image, (0, 0, w_before, w_after, h_before, h_after))
    slices = torch.movedim(padded, -1, 0)  # (D, 5, H', W')
    # Filled in place, in the (classes, H', W', D) layout MONAI's SliceInferer produces, so the softmax
    # below runs on the same layout as in the bundle (the agreement test compares masks voxel for voxel).
    logits = torch.zeros((len(CLASSES), *padded.shape[1:]), dtype=torch.float32)
    for start in range(0, slices.shape[0], batch_size):
        batch = slices[start : start + batch_size].contiguous().to(device)
        logits[..., start : start + batch.shape[0]] = torch.movedim(network(batch).float().cpu(), 0, -1)
    probabilities = torch.softmax(logits, dim=0)
    height, width = image.shape[1:3]
    return probabilities[:, h_before : h_before + height, w_before : w_before + width]


def segment_volume(network, volume: np.ndarray, batch_size: int = 16, device="cpu",
                   lesion_threshold: float = LESION_THRESHOLD) -> np.ndarray:  # fmt: skip
    """The uint8 lesion mask (H, W, D) of one (H, W, D, 5) volume: the lesion probability of
    ``class_probabilities`` above ``lesion_threshold`` within the volume's brain (``custom.lesions.
    lesion_from_probabilities``, ``custom.clinical.brain_mask``)."""
    probabilities = class_probabilities(network, volume, batch_size, device)
    return lesion_from_probabilities(probabilities.numpy(), lesion_threshold, brain_mask(volume))


def lesion_mask(network, volume: np.ndarray, affine: np.ndarray, batch_size: int = 16, device="cpu",
                min_lesion_ml: float = MIN_LESION_ML,
                lesion_threshold: float = LESION_THRESHOLD) -> np.ndarray:  # fmt: skip
    """The bundle's mask of one (H, W, D, 5) volume with its ``affine``: ``segment_volume`` at ``lesion_threshold``,
    then the lesions under ``min_lesion_ml`` mL removed (``custom.lesions.remove_small_lesions``, voxel volume from
    ``affine``)."""
    mask = segment_volume(network, volume, batch_size, device, lesion_threshold)
    return remove_small_lesions(mask, affine, min_lesion_ml)


def write_mask(mask: np.ndarray, affine: np.ndarray, path) -> None:
    """Write a uint8 mask as NIfTI with ``affine``, atomically (never a half-written file under ``path``).

    The sform and qform codes are set to 1 (scanner), as MONAI's ``NibabelWriter`` sets them, so the masks
    of this runner and of the bundle are interchangeable.
    """
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.header.set_data_dtype(np.uint8)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    write_atomically(path, lambda temporary: nib.save(image, temporary))


def load_model(path: Path, device="cpu"):
    """The TorchScript model at ``path``, checked by ``check_model`` with the files ``ckpt_export`` embedded in it
    (``embedded_files``); a file that is not TorchScript is refused naming it."""
    try:
        network = torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # torch raises RuntimeError or ValueError for files that are not TorchScript
        raise ValueError(f"model '{path}' is not a TorchScript file ({err})") from err
    check_model(network, path, embedded_files(path), device)
    return network


def embedded_files(path) -> dict[str, str]:
    """The files stored in the TorchScript file ``path`` beside the model (``monai.bundle ckpt_export``: its
    ``metadata.json`` and each ``--config_file`` under its own name), name -> text, in the order stored.

    Read from the zip archive that TorchScript is (``<archive>/extra/<name>``): ``torch.jit.load`` returns only the
    extra files asked for by name, and an override file (``inputs.json``) has a name of the user's choosing."""
    with zipfile.ZipFile(path) as archive:
        return {
            PurePosixPath(name).name: archive.read(name).decode("utf-8", errors="replace")
            for name in archive.namelist()
            if PurePosixPath(name).parent.name == "extra"
        }


def check_model(network, path, embedded: Mapping[str, str], device="cpu") -> None:
    """Refuse a model the runner cannot feed, naming its file ``path``; one check for TorchScript (``load_model``)
    and ONNX (``custom.onnx_export.OnnxNetwork``).

    Why: a model exported from weights of other input settings, or by another bundle version, ran as if it were this
    runner's. ``embedded`` holds the files the export stored in the model (name -> text: ``metadata.json`` and the
    config files). In order:

    1. input settings: a model whose embedded config files set an input setting (in any of them) to another value
       than the runner feeds (``RUNNER_INPUT_SETTINGS``) is refused, naming the setting, both values and the file; so
       is one whose training record beside it (``custom.training_record.read_record``: ``training_inputs.json``,
       where ``ckpt_export --filepath runs/fold0/model.ts`` leaves it, and in ``bundle/models/``) names another value
       (the export embeds the config files, not command-line overrides such as ``--spacing_mm 0.9``, which the record
       holds: the channel settings' are caught by 2 too, ``spacing_mm``, which keeps 5 channels, by the record only;
       a record without a setting, of an earlier version, is not compared on it);
    2. the probe: the model must map a (1, 5, 32, 32) batch to (1, 2, 32, 32) logits (another channel count or
       architecture is refused, naming the layer's complaint);
    3. the bundle version: a model of another version than this runner's (``custom.__version__``) is run, with a
       warning on stderr naming both: its input contract is the runner's (1 and 2), its masks may still differ.
    """
    # Any config file setting another value: TorchScript keeps no order of its extra files (inputs.json, passed after
    # inference.json, is stored before it), so which file overrode which is not known.
    recorded = read_record(path) or {}
    other = [
        (key, value, f"its embedded {name}")
        for name, text in sorted(embedded.items())
        if name.endswith(".json") and name != METADATA_FILE
        for key, value in _embedded_json(path, name, text).items()
        if key in RUNNER_INPUT_SETTINGS and value != RUNNER_INPUT_SETTINGS[key]
    ] + [
        (key, recorded[key], f"its training record '{record_of(path)}'")
        for key, runners in RUNNER_INPUT_SETTINGS.items()
        if key in recorded and recorded[key] != runners
    ]  # fmt: skip
    if other:
        settings = ", ".join(
            f"{key} {value!r} ({source}; this runner's: {RUNNER_INPUT_SETTINGS[key]!r})" for key, value, source in other
        )
        overrides = " ".join(dict.fromkeys(f"--{key} {value}" for key, value, _ in other))
        raise ValueError(
            f"model '{path}' was exported with other input settings than this runner's, {settings}: the runner feeds "
            f"the {len(MODALITIES)} maps only ({', '.join(MODALITIES)}), on the grid they come with (it does not "
            f"resample); segment with its weights through "
            f"inference.json with {overrides}"
        )
    probe = torch.zeros((1, len(MODALITIES), 32, 32), device=device)
    try:
        with torch.inference_mode():
            shape = tuple(network(probe).shape)
    except Exception as err:  # a scripted model fails with a RuntimeError naming its own layer
        # after the interpreter's traceback of the scripted code, which made the one-line refusal some 15 lines
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise ValueError(
            f"model '{path}' does not take a (1, {len(MODALITIES)}, 32, 32) input ({', '.join(MODALITIES)}; a model "
            f"trained with contralateral_channels or adjacent_slices takes more channels and runs through "
            f"inference.json only): {reason}"
        ) from err
    if shape != (1, len(CLASSES), 32, 32):
        raise ValueError(f"model '{path}' gives output shape {shape}, expected (1, {len(CLASSES)}, 32, 32)")
    metadata = _embedded_json(path, METADATA_FILE, embedded[METADATA_FILE]) if METADATA_FILE in embedded else {}
    version = metadata.get("version")
    if version is not None and str(version) != RUNNER_VERSION:
        print(
            f"warning: model '{path}' was exported by bundle version {version}, this runner is version "
            f"{RUNNER_VERSION}: their inputs agree, but its masks may differ from that version's bundle; run it with "
            f"the runner of version {version}, or export the weights with this version's bundle",
            file=sys.stderr,
        )


def _embedded_json(path, name: str, text: str) -> dict:
    """The JSON object ``text`` of the file ``name`` embedded in the model ``path``; a ValueError naming both
    otherwise."""
    try:
        content = json.loads(text)
    except ValueError as err:
        raise ValueError(f"model '{path}': its embedded {name} is not JSON ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"model '{path}': its embedded {name} is not a JSON object")
    return content


def usable_device(device, setting="device", gpu_index=False) -> torch.device:
    """``device`` as a torch device this machine has; otherwise a ValueError naming ``setting`` and the devices to use
    (loading the model onto a missing CUDA device fails inside ``torch.jit.load``, which reads as a broken model file).
    The one rule of the runner, the project's command lines and the bundle's ``device`` id (``custom.config_check``).

    ``gpu_index``: a bare number N means ``cuda:N``, for the command lines' ``--device``: Fire read ``--device 0`` as
    the number 0 (``cuda:0`` to torch); they now keep the text ``"0"``, which ``torch.device`` refuses."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    usable = "use cpu" + (f", cuda, cuda:N{' or N' if gpu_index else ''} with N < {count}" if count else "")
    typed = str(device)
    try:
        parsed = torch.device(f"cuda:{typed}" if gpu_index and typed.isascii() and typed.isdigit() else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{setting} '{typed}' is not a torch device ({usable}): {err}") from err
    if parsed.type == "cuda" and (parsed.index or 0) >= count:
        raise ValueError(f"{setting} '{typed}': this machine's PyTorch sees {count} CUDA device(s) ({usable})")
    return parsed


def _images_in_folder(path: Path) -> list[str]:
    """The NIfTI files directly in the folder ``path`` (``custom.data.datalist.nifti_files_in``) when none is an ISLES
    map (SMIR name): a folder of 5-channel images, whose files the runner takes as inputs, not the folder."""
    images = nifti_files_in(path) if path.is_dir() else []
    return [] if any(SMIR_NAME.match(name) for name in images) else images


def _check_inputs(inputs: list[Path]) -> None:
    """Fail before any computation on no input, a missing input, or two inputs with one case name (a mistake in
    the command, not in the data: the contents of each input are checked case by case)."""
    if not inputs:
        raise ValueError("no input given: pass 5-channel NIfTI files and/or ISLES 2018 case folders")
    for path in inputs:
        if not path.exists():
            raise FileNotFoundError(f"input '{path}' does not exist{relative_path_note(path)}")
        images = _images_in_folder(path)
        if images:  # was refused case by case as an ISLES case folder missing every map
            raise ValueError(
                f"input '{path}' is a folder of {len(images)} NIfTI file(s), not an ISLES 2018 case folder: pass the "
                f"files themselves, e.g. '{path / images[0]}' (or '{path}/*.nii.gz')"
            )
    refuse_a_shared_case_name(inputs, "inputs")


def deploy(*inputs, model="bundle/models/model.ts", out="deploy_out", batch_size=16, device="cpu",
           min_lesion_ml=MIN_LESION_ML, lesion_threshold=LESION_THRESHOLD, overwrite=False):  # fmt: skip
    """Segment stroke lesions with the exported TorchScript model, without MONAI.

    Args:
        inputs: 5-channel NIfTI files (H, W, D, 5; CT, CBF, CBV, MTT, Tmax on the CT grid) and/or
            ISLES 2018 case folders (``case_N/SMIR.Brain.XX.O.<MOD>.<id>/...nii``).
        model: the TorchScript file written by ``python -m monai.bundle ckpt_export``.
        out: output folder; receives ``<case>_seg.nii.gz`` (uint8, 1 = lesion, the input's grid and
            affine) per input and ``lesion_volumes.csv`` (``custom.clinical.VOLUME_COLUMNS``: case, image,
            lesion_voxels, lesion_ml, then hypoperfusion_ml, core_rule_ml, mismatch_ml, mismatch_ratio from the
            raw maps, and intended_use: research use only, not for diagnosis or treatment decisions).
        batch_size: slices per forward pass.
        device: torch device, e.g. ``cpu`` or ``cuda:0``.
        min_lesion_ml: predicted lesions (26-connected) smaller than this are removed, as ``inference.json``'s
            ``min_lesion_ml`` does; 0 keeps every lesion.
        lesion_threshold: a voxel is lesion where its lesion probability is above this, as ``inference.json``'s
            ``lesion_threshold`` (0.5: the argmax of the two classes).
        overwrite: replace the masks and ``lesion_volumes.csv`` of an earlier run in ``out``; without it such a
            run is refused before anything is computed (a mask there may have been corrected by hand).

    Returns:
        The path of ``lesion_volumes.csv``.
    """
    paths = [Path(str(p)) for p in inputs]
    _check_inputs(paths)
    out = Path(str(out))
    model = Path(str(model))
    if not model.is_file():
        raise FileNotFoundError(f"TorchScript model '{model}' does not exist (export it with monai.bundle ckpt_export)")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    min_lesion_ml = check_min_volume(min_lesion_ml)
    lesion_threshold = check_lesion_threshold(lesion_threshold)
    device = usable_device(device)
    network = load_model(model, device)
    require_writable_folder(out, create=False)  # a file, a path under one, a read-only folder: named before any work
    # after the settings and the model are checked: with overwrite it removes the earlier table (and uncertainty maps)
    refuse_earlier_outputs(out, paths, overwrite, tables=(VOLUME_TABLE,), unwritten=("uncertainty",))
    require_writable_folder(out)
    rows, failures = [], []
    for path in paths:
        try:
            volume, affine = read_case(path)
        except ValueError as err:  # this input's fault: report it, go on with the others
            failures.append(str(err))
            print(f"not segmented: {err}", file=sys.stderr)
            continue
        mask = lesion_mask(network, volume, affine, int(batch_size), device, min_lesion_ml, lesion_threshold)
        name = output_case_name(path)
        write_mask(mask, affine, out / f"{name}_seg.nii.gz")
        row = {"case": name, "image": str(path), **case_volumes(volume, mask, affine, name)}
        rows.append(row)
        print(f"{describe(row)} -> {out / f'{name}_seg.nii.gz'}")
    table = out / VOLUME_TABLE
    if rows:
        write_volume_table(rows, table)
    if failures:
        listing = "\n  - ".join(failures)
        raise ValueError(
            f"{len(failures)} of {len(paths)} input(s) not segmented"
            f"{f' (the others were written to {out})' if rows else ''}:\n  - {listing}"
        )
    return str(table)


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is a refusal of this project: a ValueError or an OSError (FileNotFoundError, FileExistsError,
    NotADirectoryError, ...), the types its checks raise for a wrong value and for a missing, existing or unwritable
    file, raised by a ``raise`` statement of this package. The same types raised inside a library or by Python itself
    (``int("x")``, an unpacking of the wrong length) are programming errors, as is any other type (the project's
    refusals are raised as ValueErrors, not KeyErrors or IndexErrors, and its RuntimeErrors report a failed run or
    a misuse of its code: Python and torch raise those types for a missing dict key or a failing tensor operation)."""
    frames = traceback.extract_tb(error.__traceback__)
    return (
        isinstance(error, (ValueError, OSError))
        and bool(frames)
        and (frames[-1].line or "").startswith("raise ")
        and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)
    )


@contextlib.contextmanager
def refusals_exit(prog: str):
    """Exit with status 1 and the one line ``<prog>: error: <message>`` on stderr on a refusal (``is_refusal``), as
    argparse reports a bad argument: the traceback above the message, which was its last line, only showed where the
    project checked. Any other exception keeps its traceback, and ``CTP_TRACEBACK=1`` keeps it for refusals too."""
    try:
        yield
    except (ValueError, OSError) as error:
        if os.environ.get(TRACEBACK_VARIABLE) or not is_refusal(error):
            raise
        sys.exit(f"{prog}: error: {error}")


def main(argv=None, prog=None) -> None:
    """Command line for machines with neither MONAI nor this project: ``python -m custom.deploy INPUT... --model m.ts``
    from the folder holding the copied ``custom/`` (docs/deployment.md); ``python -m custom deploy`` runs it too.

    argparse, not Fire (the project's other commands): Fire reads every value as a Python literal, so a case folder
    named ``20240105_1`` became 202401051, ``P1,P2`` a tuple, and ``--out 2024_05_01`` the folder ``20240501``."""
    parser = argparse.ArgumentParser(prog=prog, description=deploy.__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help="5-channel NIfTI files and/or ISLES 2018 case folders")
    parser.add_argument("--model", default="bundle/models/model.ts", help="TorchScript model (ckpt_export)")
    parser.add_argument("--out", default="deploy_out", help="output folder")
    parser.add_argument("--batch_size", type=int, default=16, help="slices per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda:0, or 0 for cuda:0")
    parser.add_argument("--min_lesion_ml", type=float, default=MIN_LESION_ML,
                        help="remove predicted lesions smaller than this (mL); 0 keeps every lesion")  # fmt: skip
    parser.add_argument("--lesion_threshold", type=float, default=LESION_THRESHOLD,
                        help="lesion where its probability is above this (0.5: the two-class argmax)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the masks and lesion_volumes.csv of an earlier run in --out")  # fmt: skip
    arguments = parser.parse_args(argv)
    with refusals_exit(parser.prog):
        deploy(
            *arguments.inputs,
            model=arguments.model,
            out=arguments.out,
            batch_size=arguments.batch_size,
            device=usable_device(arguments.device, "--device", gpu_index=True),
            min_lesion_ml=arguments.min_lesion_ml,
            lesion_threshold=arguments.lesion_threshold,
            overwrite=arguments.overwrite,
        )


if __name__ == "__main__":
    main()
