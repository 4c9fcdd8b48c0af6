"""The per-case table of an inference run (``lesion_volumes.csv``): predicted lesion and clinical volumes.

Why it exists: a clinician reads volumes first, and next to the predicted lesion wants the numbers the
perfusion software would show: the hypoperfused tissue (Tmax > 6 s), the threshold-rule core (rCBF < 30 %
within Tmax > 6 s) and the mismatch between them. The bundle's ``custom.handlers.LesionVolumeWriter`` and the
MONAI-free runner ``custom/deploy.py`` both build their rows with :func:`case_volumes` and write them with
:func:`write_volume_table`, so the two tables agree column for column. Research use only, not for diagnosis
or treatment decisions.

It also holds what the threshold rule needs and every caller shares: the bundle's channel order, the brain
mask (any perfusion map non-zero), and the rule itself (``custom.baseline`` scores it on a dataset).
numpy and the standard-library ``custom.atomic`` only: ``custom/deploy.py`` imports it and must run without
MONAI (copy this file with it).
"""

import csv
import logging
import math

import numpy as np

from custom.atomic import write_atomically

logger = logging.getLogger(__name__)

# The bundle's fixed channel order (docs/data.md; dataset.json "modality"): channels last in the
# NIfTI, first in the network input.
MODALITIES = ("CT", "CBF", "CBV", "MTT", "Tmax")
CBF_CHANNEL = MODALITIES.index("CBF")
TMAX_CHANNEL = MODALITIES.index("Tmax")
# A voxel is brain when any perfusion map (every channel but CT) is non-zero: the maps are zero outside the brain.
PERFUSION_CHANNELS = tuple(index for index, name in enumerate(MODALITIES) if name != "CT")

TMAX_THRESHOLD_S = 6.0  # hypoperfused: Tmax above this (seconds), the DEFUSE 3 / RAPID threshold
RCBF_THRESHOLD = 0.3  # threshold-rule core: CBF below 30 % of the healthy-tissue reference
HEALTHY_TMAX_S = 4.0  # healthy tissue for the CBF reference: Tmax below this (seconds)
# Above this median of the brain's non-zero Tmax the map is not in seconds (healthy tissue: 0-2 s, so about 1000 in
# milliseconds): no acquisition is long enough for most of a brain to be delayed by a minute.
TMAX_MEDIAN_LIMIT_S = 60.0
TMAX_COLUMNS = ("hypoperfusion_ml", "core_rule_ml", "mismatch_ml", "mismatch_ratio")  # need Tmax in seconds

RESEARCH_USE_ONLY = "research use only, not for diagnosis or treatment decisions"
VOLUME_TABLE = "lesion_volumes.csv"
VOLUME_COLUMNS = (
    "case",
    "image",
    "lesion_voxels",
    "lesion_ml",
    "hypoperfusion_ml",
    "core_rule_ml",
    "mismatch_ml",
    "mismatch_ratio",
    "intended_use",
)
DECIMALS = 4  # volumes in mL rounded to 0.1 uL, ratios to 1e-4


def brain_mask(volume: np.ndarray, perfusion_channels=PERFUSION_CHANNELS) -> np.ndarray:
    """Boolean (H, W, D) brain of a channels-last (H, W, D, C) volume: voxels where any perfusion map is non-zero."""
    return (np.asarray(volume)[..., list(perfusion_channels)] != 0).any(axis=-1)


def tmax_unit_problem(tmax: np.ndarray, brain: np.ndarray) -> str | None:
    """Why ``tmax`` cannot be a map in seconds (its brain's median non-zero value above
    :data:`TMAX_MEDIAN_LIMIT_S`: milliseconds?), or None. Thresholds in seconds on it give meaningless volumes."""
    delayed = tmax[brain & (tmax != 0)]
    median = float(np.median(delayed)) if delayed.size else 0.0
    if median > TMAX_MEDIAN_LIMIT_S:
        return f"the brain's median Tmax is {median:.4g}, so Tmax is not in seconds (milliseconds?)"
    return None


def threshold_core(
    cbf: np.ndarray,
    tmax: np.ndarray,
    brain: np.ndarray,
    rcbf_threshold: float = RCBF_THRESHOLD,
    tmax_threshold: float = TMAX_THRESHOLD_S,
    healthy_tmax: float = HEALTHY_TMAX_S,
) -> tuple[np.ndarray, float, bool]:
    """Core mask of one volume by the threshold rule, with the reference CBF it used.

    The reference is the median CBF of brain voxels with Tmax < ``healthy_tmax`` (normally perfused tissue);
    when there are none it is the whole brain's median. Core = brain & CBF < ``rcbf_threshold`` x reference &
    Tmax > ``tmax_threshold``. Returns (core mask, reference CBF, whether the whole-brain fallback was used).
    """
    healthy = brain & (tmax < healthy_tmax)
    used_fallback = not healthy.any()
    reference = float(np.median(cbf[brain if used_fallback else healthy]))
    core = brain & (cbf < rcbf_threshold * reference) & (tmax > tmax_threshold)
    return core, reference, used_fallback


def voxel_volume_ml(affine) -> float:
    """The volume of one voxel in mL: the absolute determinant of the affine's 3 x 3 part (mm^3 / 1000).

    For an orthogonal grid (rotated and/or flipped included) this is the product of the spacings, the lengths of
    the axis columns (MONAI's ``MetaTensor.pixdim``). A sheared grid (CT with gantry tilt stored uncorrected) has
    voxels smaller than that product by the cosine of the tilt (10 % at 25 degrees), which the product reported.
    The determinant is the triple product of the columns, not ``np.linalg.det`` (LU and a logarithm): on an
    axis-aligned grid it is then exactly the product of the voxel sizes, to the last digit.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    return abs(float(np.dot(matrix[:, 2], np.cross(matrix[:, 0], matrix[:, 1])))) / 1000.0


def volume_ml(voxels: int, affine) -> float:
    """``voxels`` voxels of the grid ``affine`` in mL, rounded to 0.1 uL (the table's rounding)."""
    return round(voxels * voxel_volume_ml(affine), DECIMALS)


def case_volumes(volume: np.ndarray, lesion: np.ndarray, affine, name: str = "") -> dict:
    """The volume columns of one case, from its raw maps and its predicted lesion mask.

    Args:
        volume: (H, W, D, 5) maps as read from the file (not normalised), channels CT, CBF, CBV, MTT, Tmax;
            Tmax in seconds, CBF in any unit (the rule is relative).
        lesion: (H, W, D) predicted mask; non-zero = lesion.
        affine: the 4 x 4 affine of the grid (voxel volume).
        name: the case, for the warning when the rule falls back to the whole brain's CBF median.

    Returns:
        ``lesion_voxels``; ``lesion_ml``; ``hypoperfusion_ml`` (brain & Tmax > 6 s); ``core_rule_ml``
        (:func:`threshold_core` with its defaults); ``mismatch_ml`` = hypoperfusion - lesion (negative when the
        predicted lesion is the larger) and ``mismatch_ratio`` = hypoperfusion / lesion, both with the
        predicted lesion as the core and computed from voxel counts before rounding; a zero lesion gives a
        ratio of ``inf`` when there is hypoperfusion and ``None`` (an empty CSV cell: undefined) when there is
        none; ``intended_use`` = :data:`RESEARCH_USE_ONLY`. When the brain's median non-zero Tmax exceeds
        :data:`TMAX_MEDIAN_LIMIT_S` (a map in milliseconds) the :data:`TMAX_COLUMNS` are ``None`` (empty cells) and a
        warning names the case: their 6 s and 4 s thresholds would give meaningless volumes.
    """
    volume = np.asarray(volume)
    lesion = np.asarray(lesion)
    if volume.ndim != 4 or volume.shape[-1] != len(MODALITIES):
        raise ValueError(f"expected (H, W, D, {len(MODALITIES)}) maps {', '.join(MODALITIES)}, got {volume.shape}")
    if lesion.shape != volume.shape[:3]:
        raise ValueError(f"lesion mask shape {lesion.shape} differs from the maps' {volume.shape[:3]}")
    cbf, tmax = volume[..., CBF_CHANNEL], volume[..., TMAX_CHANNEL]
    brain = brain_mask(volume)
    lesion_voxels = int(np.count_nonzero(lesion))
    row = {
        "lesion_voxels": lesion_voxels,
        "lesion_ml": volume_ml(lesion_voxels, affine),
        **dict.fromkeys(TMAX_COLUMNS),
        "intended_use": RESEARCH_USE_ONLY,
    }
    unit_problem = tmax_unit_problem(tmax, brain)
    if unit_problem:  # the rule is not applied, so none of its warnings either
        logger.warning("%s: %s: %s left empty", name or "case", unit_problem, ", ".join(TMAX_COLUMNS))
        return row
    core, _, used_fallback = threshold_core(cbf, tmax, brain) if brain.any() else (brain, 0.0, False)
    if used_fallback:
        logger.warning(
            "%s: no brain voxel has Tmax < %s s; the rCBF reference of core_rule_ml is the whole brain's median CBF",
            name or "case",
            HEALTHY_TMAX_S,
        )
    hypoperfusion_voxels = int(np.count_nonzero(brain & (tmax > TMAX_THRESHOLD_S)))
    if lesion_voxels:
        ratio = round(hypoperfusion_voxels / lesion_voxels, DECIMALS)
    else:
        ratio = math.inf if hypoperfusion_voxels else None
    row.update(
        hypoperfusion_ml=volume_ml(hypoperfusion_voxels, affine),
        core_rule_ml=volume_ml(int(np.count_nonzero(core)), affine),
        mismatch_ml=volume_ml(hypoperfusion_voxels - lesion_voxels, affine),
        mismatch_ratio=ratio,
    )
    return row


def describe(row: dict) -> str:
    """The log line of one table row, ending with the research-use label; an empty cell reads ``undefined``."""
    value = {key: "undefined" if row[key] is None else f"{row[key]} mL" for key in TMAX_COLUMNS[:3]}
    ratio = row["mismatch_ratio"]
    value["mismatch_ratio"] = "undefined" if ratio is None else str(ratio)  # as the table writes it (not :g's 6 digits)
    return (
        f"{row['case']}: {row['lesion_voxels']} lesion voxels, {row['lesion_ml']} mL; "
        f"Tmax > {TMAX_THRESHOLD_S:g} s {value['hypoperfusion_ml']}; "
        f"rCBF < {RCBF_THRESHOLD * 100:g} % core {value['core_rule_ml']}; "
        f"mismatch {value['mismatch_ml']}, ratio {value['mismatch_ratio']} ({RESEARCH_USE_ONLY})"
    )


def write_volume_table(rows: list[dict], path) -> None:
    """Write the :data:`VOLUME_COLUMNS` table atomically; ``inf`` is written as ``inf``, ``None`` as an empty cell.

    Always UTF-8: with the locale's encoding a case name such as ``Müller`` failed to encode (ASCII, cp1252 for
    other scripts) after every mask was written, or gave a file that a UTF-8 reader (pandas) cannot read.
    """

    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=VOLUME_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)
