"""CBF, CBV, MTT, Tmax and TTP maps from a 4D CT perfusion series: mask, baseline, AIF/VOF, deconvolution.

Why it exists: the bundle needs perfusion maps and research sites often hold only the raw series; no
MONAI component computes them. The model and the equations: docs/perfusion.md.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.networks.layers import GaussianFilter
from scipy import ndimage

from custom.perfusion.deconvolution import OSCILLATION_LIMIT, TIKHONOV_LAMBDA, deconvolve
from custom.perfusion.units import FLOW_TO_RATE, VOLUME_FACTOR

MAP_NAMES = ("CBF", "CBV", "MTT", "Tmax", "TTP")
logger = logging.getLogger(__name__)
# Baseline HU of brain parenchyma, CSF and blood; bone is above, air and padding below.
BRAIN_HU = (-15.0, 100.0)
BONE_HU = 150.0
# Without the rescale intercept (-1024) the brain lies above BONE_HU and the mask finds the air around the head,
# holes filled: the whole head, bone (> BONE_HU) and all. A brain in HU encloses almost no bone (calcifications).
MAX_BONE_FRACTION = 0.05
ARRIVAL_FRACTION = 0.1  # the bolus arrives when the mean brain curve passes this fraction of its peak
# ... and stays above it for this many frames: a bolus rises over several frames, while one outlying pre-contrast frame
# (+20 HU over the brain in frame 3) passed the fraction alone, was taken for the arrival and ended the baseline before
# it (on the 8 cases of the accuracy table at 128, median brain CBF 0.66-27.6 times the series', docs/perfusion.md).
ARRIVAL_FRAMES = 2
FLAT_ENHANCEMENT_HU = 1.0  # a mean brain enhancement below this means no contrast reached the brain
# A baseline frame whose mean brain HU is further than this from the baseline's median (a mask, higher-dose or corrupt
# frame, or one still settling) is replaced by the nearest frame that is not (replace_outlying_frames): the baseline
# took it, and 20 HU on frame 0 doubled the phantom's CBV (-20) or had the series refused as flat (+20); 0.45 HU moved
# the median CBV by at most 10 % (docs/perfusion.md).
FIRST_FRAME_TOLERANCE_HU = 0.5
FIRST_FRAMES_COMPARED = 5  # frames 0 and 1 are compared with the median of frames 0-4
# Per slice the tolerance is also this many times the noise of the slice's mean brain HU (measured between frames): a
# slice of few voxels (the top of the head) has a mean too noisy for FIRST_FRAME_TOLERANCE_HU alone.
SLICE_NOISE_FACTOR = 5.0
# The frames before the arrival give the baseline level when at least two thirds of them share it: 3 warm-up frames
# 40 HU down among 5 pre-arrival frames were the median, the 2 good frames were replaced by them, and the median brain
# CBF of 3 phantom cases came out 5.9-6.8 times the series' (docs/perfusion.md).
MAX_OUTLYING_FRACTION = 1 / 3
CANDIDATE_FRACTION = 0.01  # AIF and VOF are searched among this top fraction of brain voxels by curve area
MIN_CANDIDATES = 20
VESSEL_VOXELS = 8  # voxels averaged into the AIF and into the VOF
# An artery's peak enhancement is tens of times the mean brain's (brain CBV is a few %); an AIF below this
# ratio is tissue or noise (no artery in the slab, a misplaced --aif_mask), and CBF, MTT and Tmax would be wrong.
MIN_AIF_TO_BRAIN_PEAK = 4.0
# Without a bolus (a failed injection) and a global drift of a few HU, the automatic AIF was the 8 largest noise
# peaks, 2-3 times the voxel noise, and passed the brain-ratio check; a real arterial peak is tens of times the noise.
MIN_AIF_TO_NOISE = 5.0
MTT_CAP_S = 30.0
# The mean brain enhancement falls to a few % of its peak by the end of a complete series (recirculation
# included); above this fraction at the last frame the bolus had not passed and CBF, CBV and MTT are biased.
MAX_TAIL_FRACTION = 0.5
# The deconvolution needs the arterial bolus whole: on the phantom, series cut while the AIF was still above half its
# peak gave a tissue CBF of 0.45 to 2.63 times the whole series' (5 of 9 cuts beyond a factor of 2); cut later, 0.57
# to 1.30 times (38 cuts). docs/perfusion.md, "Truncated series".
MAX_AIF_END_FRACTION = 0.5
SMOOTHING_MM = 2.0


@dataclass(frozen=True)
class VascularCurve:
    """An arterial input or venous output function (HU above baseline per frame) and where it came from."""

    curve: np.ndarray  # (T,)
    voxels: np.ndarray  # (n, 3) voxel indices (i, j, k) averaged into it
    peak_hu: float
    time_to_peak_s: float


@dataclass
class PerfusionResult:
    """The maps (float32, zero outside the brain) with everything needed to judge them."""

    maps: dict  # name -> (H, W, D): CBF ml/100 g/min, CBV ml/100 g, MTT s, Tmax s, TTP s
    brain: np.ndarray  # (H, W, D) bool
    aif: VascularCurve
    vof: VascularCurve | None
    partial_volume_scale: float  # area(VOF) / area(AIF) applied to the AIF (1 without a VOF)
    baseline_frames: int
    frame_s: float
    notes: list = field(default_factory=list)

    def report(self) -> dict:
        """A JSON-ready summary: AIF and VOF voxels, peaks, the partial-volume scale, baseline frames."""

        def curve(c):
            if c is None:
                return None
            return {
                "voxels": c.voxels.tolist(),
                "peak_hu": round(c.peak_hu, 1),
                "time_to_peak_s": round(c.time_to_peak_s, 2),
                "curve_hu": [round(float(v), 1) for v in c.curve],
            }

        return {
            "frame_s": self.frame_s,
            "baseline_frames": self.baseline_frames,
            "brain_voxels": int(self.brain.sum()),
            "aif": curve(self.aif),
            "vof": curve(self.vof),
            "partial_volume_scale": round(self.partial_volume_scale, 3),
            "notes": self.notes,
        }


def brain_mask(baseline: np.ndarray) -> np.ndarray:
    """Intracranial soft tissue on the pre-contrast mean image (H, W, D): HU within BRAIN_HU away from bone,
    per slice the largest connected region (the skull separates it from the scalp), holes filled."""
    bone = ndimage.binary_dilation(baseline > BONE_HU, iterations=1, structure=np.ones((3, 3, 1), bool))
    candidate = (baseline > BRAIN_HU[0]) & (baseline < BRAIN_HU[1]) & ~bone
    mask = np.zeros_like(candidate)
    for k in range(candidate.shape[2]):
        labels, count = ndimage.label(candidate[..., k])
        if count:
            largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
            mask[..., k] = ndimage.binary_fill_holes(labels == largest)
    return mask


def vessel_search_region(pre_contrast: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The brain and the non-bone voxels up to two pixels around it in-plane: the sagittal sinus lies against
    the skull, where the brain mask (kept away from bone) does not reach."""
    around = ndimage.binary_dilation(brain, iterations=2, structure=np.ones((3, 3, 1), bool))
    return around & (pre_contrast > BRAIN_HU[0]) & (pre_contrast < BONE_HU)


def bolus_arrival(hu: np.ndarray, brain: np.ndarray, path_name: str) -> int:
    """Number of pre-contrast (baseline) frames: those before the bolus reaches the most enhancing voxels.

    The arrival is the first frame where the mean curve of the top CANDIDATE_FRACTION of brain voxels by
    enhancement (the large vessels, arteries first), both less the mean brain HU of each frame, passes ARRIVAL_FRACTION
    of the vessels' peak enhancement and stays above it for ARRIVAL_FRAMES frames: one outlying pre-contrast frame is
    not a bolus, whether offset as a whole (cancelled by the brain's level, even just before the arrival) or in the
    vessels alone (it does not persist). One frame of margin is kept before it. Refuses a flat series (no enhancement
    of the mean brain curve) and one whose first frames already hold contrast.
    """
    curves = hu[brain]
    # above the brain's mean HU of each frame: an offset of a whole frame (a corrupt or higher-dose frame) cancels, in
    # the choice of the vessels as in their curve (on a weak bolus, tissue voxels 20 HU up in one frame were chosen);
    # the fraction is of the vessels' own peak as stored, so the arrival of a series without outliers stays where it was
    relative = curves - curves.mean(axis=0)
    level = np.median(relative, axis=1, keepdims=True)  # selection on the whole curve, not on its first frames
    count = max(MIN_CANDIDATES, int(CANDIDATE_FRACTION * len(curves)))
    chosen = np.argsort((relative - level).max(axis=1))[::-1][:count]
    stored, vessels = curves[chosen].mean(axis=0), relative[chosen].mean(axis=0)
    vessel_rise = vessels - np.median(vessels[:3])
    above = vessel_rise > ARRIVAL_FRACTION * (stored - np.median(stored[:3])).max()
    # the first frame from which the rise stays above for ARRIVAL_FRAMES frames (or to the end of a cut series)
    arrival = next((t for t in range(above.size) if above[t:t + ARRIVAL_FRAMES].all()), int(np.argmax(above)))
    # the enhancement over the median level of the frames before the arrival, not over frame 0's: three frames of a
    # warm-up 40 HU up among frames 0-4 (left to the caller's pre-arrival check) had the series refused as flat
    level = curves.mean(axis=0)
    rise = level - np.median(level[:max(arrival, 1)])
    if float(rise.max()) < FLAT_ENHANCEMENT_HU:
        raise ValueError(
            f"'{path_name}': flat series, the mean brain enhancement peaks at {float(rise.max()):.2f} HU "
            f"(< {FLAT_ENHANCEMENT_HU} HU): no contrast bolus to analyse"
        )
    if arrival < 2:
        raise ValueError(f"'{path_name}': the bolus arrives in frame {arrival}: no pre-contrast baseline frame")
    return arrival - 1


def replace_outlying_frames(hu: np.ndarray, brain: np.ndarray, checked: int, among: int, replaced: dict,
                            notes: list, name: str) -> np.ndarray:
    """``hu`` (H, W, D, T) with each of its first ``checked`` frames that is outlying among the first ``among`` replaced
    by the nearest of those frames that is not, recorded in ``replaced`` (frame -> the frame copied) and ``notes``. A
    frame is outlying when its mean brain HU is further than FIRST_FRAME_TOLERANCE_HU from the median of the ``among``
    frames' (the lower median: a frame's), or when the mean over the brain of one slice is that far from the slice's
    median (or SLICE_NOISE_FACTOR times the noise of that slice's mean, where few voxels make it noisy). Refuses the
    series, naming ``name`` and the frames, when every compared frame is checked (the frames before the arrival) and
    more than MAX_OUTLYING_FRACTION of them are outlying: the level the others share is not clearly the baseline's
    (frames 0 and 1 checked against frames 0-4 are replaced as above, and that longer window decides). A copy when the
    first frame is replaced (``replaced`` empty before): the caller's array is left as it is.

    Why it exists: the baseline (mean of the pre-contrast frames) takes every frame before the bolus alike. Frame 0
    compared with frame 1 alone replaced a good frame 0 by a corrupt frame 1 (frame 1 at -20 HU over the brain gave the
    test phantom case a median CBF of 79.7 for 19.8) and let two outlying first frames through (-20 HU: CBF 78.8; +20
    HU: refused as flat). Frames 0-4 at -40 HU gave CBF 347 for 19.8 (the median of frames 0-9 was theirs), one slice
    of 8 at +2 HU in frame 0 (+0.25 HU over the brain) passed."""
    curves = hu[..., :among][brain]  # (N, among)
    level = curves.mean(axis=0)
    median = float(np.sort(level)[(among - 1) // 2])
    whole_off = np.abs(level - median) > FIRST_FRAME_TOLERANCE_HU
    # the same per slice, on each slice's mean over its brain voxels; the noise of those means is measured, not
    # assumed (CT noise is correlated in-plane): the spread of their frame-to-frame differences, scaled by the voxels
    slice_of = np.nonzero(brain)[2]
    counts = np.bincount(slice_of)
    slices = np.flatnonzero(counts)
    voxels = counts[slices, None].astype(np.float64)
    slice_level = np.stack([np.bincount(slice_of, weights=curves[:, t])[slices] for t in range(among)], 1) / voxels
    slice_median = np.sort(slice_level, axis=1)[:, [(among - 1) // 2]]
    deviation = slice_level - slice_median  # (slices, among)
    noise = 1.4826 * float(np.median(np.abs(np.diff(slice_level, axis=1)) * np.sqrt(voxels))) / np.sqrt(2.0)
    slice_off = np.abs(deviation) > np.maximum(FIRST_FRAME_TOLERANCE_HU, SLICE_NOISE_FACTOR * noise / np.sqrt(voxels))
    off = whole_off | slice_off.any(axis=0)
    if checked == among and off.sum() > MAX_OUTLYING_FRACTION * among:
        raise ValueError(
            f"'{name}': the baseline level cannot be estimated: of frames 0-{among - 1} (before the bolus), frames "
            f"{np.flatnonzero(~off).tolist()} lie within {FIRST_FRAME_TOLERANCE_HU:g} HU of their median mean brain "
            f"HU ({median:.1f} HU) and frames {np.flatnonzero(off).tolist()} do not (offsets "
            f"{[round(float(v), 1) for v in level[off] - median]} HU over the brain, or off in one slice): more than "
            f"{MAX_OUTLYING_FRACTION:.0%} of them are off, so which level is the baseline's is not clear (a scanner "
            "warm-up or a corrupt start of the series)"
        )
    outliers = [t for t in range(checked) if off[t]]
    if outliers and not replaced:
        hu = hu.copy()
    for frame in outliers:
        source = min((t for t in range(among) if not off[t]), key=lambda t: (abs(t - frame), -t))
        hu[..., frame] = hu[..., source]
        replaced[frame] = source
        if whole_off[frame]:
            where = f"its mean brain HU is {level[frame] - median:+.1f} HU from the median of frames 0-{among - 1} " \
                    f"({median:.1f} HU; a mask, higher-dose or corrupt frame, or one still settling)"
        else:
            worst = int(np.argmax(np.abs(deviation[:, frame]) * slice_off[:, frame]))
            where = f"its mean HU over the brain of slice {slices[worst]} is {deviation[worst, frame]:+.1f} HU from " \
                    f"that slice's median over frames 0-{among - 1} ({slice_median[worst, 0]:.1f} HU; a partial " \
                    "acquisition glitch)"
        notes.append(f"frame {frame} replaced by frame {source}: {where}, which would have shifted the baseline")
    return hu


def smooth_in_plane(values: torch.Tensor, mask: torch.Tensor, sigma_px: tuple) -> torch.Tensor:
    """Gaussian smoothing of (H, W, D, T) curves inside ``mask`` (H, W, D) only (normalised convolution)."""
    gaussian = GaussianFilter(spatial_dims=2, sigma=list(sigma_px), truncated=3.0).to(values.device)
    weights = mask.to(values.dtype)
    stacked = (values * weights[..., None]).permute(2, 3, 0, 1)  # (D, T, H, W)
    smoothed = gaussian(stacked).permute(2, 3, 0, 1)
    norm = gaussian(weights.permute(2, 0, 1)[:, None]).permute(2, 3, 0, 1)  # (H, W, D, 1)
    return torch.where(mask[..., None], smoothed / norm.clamp_min(1e-6), torch.zeros_like(values))


def curve_features(curves: np.ndarray, frame_s: float) -> dict:
    """Area, peak, time to peak and first moment (s) of concentration curves (N, T)."""
    times = np.arange(curves.shape[1]) * frame_s
    positive = np.clip(curves, 0.0, None)
    area = positive.sum(axis=1) * frame_s
    moment = (positive * times).sum(axis=1) * frame_s / np.maximum(area, 1e-6)
    return {"area": area, "peak": curves.max(axis=1), "ttp": times[curves.argmax(axis=1)], "moment": moment}


def _vascular_curve(curves: np.ndarray, voxels: np.ndarray, frame_s: float) -> VascularCurve:
    curve = curves.mean(axis=0)
    return VascularCurve(curve, voxels, float(curve.max()), float(np.argmax(curve) * frame_s))


def find_aif_and_vof(concentration: np.ndarray, region: np.ndarray, frame_s: float):
    """Automatic AIF (early, high, narrow curves: arteries) and VOF (late, largest area: the sinus).

    Candidates are the top CANDIDATE_FRACTION of ``region``'s voxels by peak enhancement (large vessels: even
    partial-volumed arteries peak far above tissue). The AIF averages the VESSEL_VOXELS highest peaks
    among the earliest quarter of candidates by first moment (early and narrow); the VOF the
    VESSEL_VOXELS largest areas among candidates peaking later than the AIF (None when none do).
    """
    positions = np.argwhere(region)
    curves = concentration[region]
    features = curve_features(curves, frame_s)
    count = min(len(curves), max(MIN_CANDIDATES, int(CANDIDATE_FRACTION * len(curves))))
    candidates = np.argsort(features["peak"])[::-1][:count]
    early_count = max(1, count // 4)
    early = candidates[np.argsort(features["moment"][candidates])[:early_count]]
    arterial = early[np.argsort(features["peak"][early])[::-1][:VESSEL_VOXELS]]
    aif = _vascular_curve(curves[arterial], positions[arterial], frame_s)
    late = candidates[features["ttp"][candidates] > aif.time_to_peak_s + frame_s]
    if late.size == 0:
        return aif, None
    venous = late[np.argsort(features["area"][late])[::-1][:VESSEL_VOXELS]]
    return aif, _vascular_curve(curves[venous], positions[venous], frame_s)


def refine_peak(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sub-sample position of each row's maximum at ``index`` by a parabola through it and its neighbours."""
    length = values.shape[1]
    left = values.gather(1, ((index - 1) % length)[:, None])[:, 0]
    centre = values.gather(1, index[:, None])[:, 0]
    right = values.gather(1, ((index + 1) % length)[:, None])[:, 0]
    curvature = left - 2 * centre + right
    offset = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp_max(-1e-12), torch.zeros_like(centre))
    return index.to(values.dtype) + offset.clamp(-0.5, 0.5)


def compute_perfusion_maps(
    hu: np.ndarray,
    frame_s: float,
    aif_mask: np.ndarray | None = None,
    method: str = "osvd",
    oscillation_limit: float = OSCILLATION_LIMIT,
    tikhonov_lambda: float = TIKHONOV_LAMBDA,
    smoothing_mm: float = SMOOTHING_MM,
    spacing_mm: tuple = (1.0, 1.0, 1.0),
    venous_scaling: bool = True,
    device: str = "cpu",
    name: str = "series",
    motion_correction: bool = False,
) -> PerfusionResult:
    """CBF, CBV, MTT, Tmax, TTP (ISLES units) of a 4D series ``hu`` (H, W, D, T) in HU with time step ``frame_s``.

    Steps, in this order: frames 0 and 1 whose mean brain HU (over the brain or one slice's) is more than
    FIRST_FRAME_TOLERANCE_HU from the median of frames 0-4 replaced, with a note, by the nearest that is not
    (``replace_outlying_frames``; the brain there is that of the frames' voxelwise median); with ``motion_correction``
    every frame registered rigidly to the mean of frames 0 and 1 (``custom.perfusion.motion``, ``spacing_mm``); brain
    mask on the mean of frames 0 and 1 (refused when it encloses bone: not in HU); baseline frames before the bolus,
    each frame before the arrival that far from their median replaced likewise (refused when more than
    MAX_OUTLYING_FRACTION of them are); concentration = HU minus baseline; AIF from ``aif_mask`` (H, W, D) or found
    automatically (refused when it ends above MAX_AIF_END_FRACTION of its peak: the series ends before the arterial
    bolus has passed; when it enhances less than MIN_AIF_TO_BRAIN_PEAK times the mean brain: not an artery; or less than
    MIN_AIF_TO_NOISE times the voxel noise: no bolus), scaled by area(VOF) / area(AIF) when larger (arterial
    partial volume); tissue curves smoothed in-plane (``smoothing_mm``) inside the brain;
    deconvolution (``method`` 'osvd' or 'tikhonov') of all brain voxels in one batch on ``device``.
    ``name`` names the series in errors.
    """
    hu = np.asarray(hu, dtype=np.float32)
    notes = []
    no_brain = f"'{name}': no brain found (no voxel of {BRAIN_HU[0]:g} to {BRAIN_HU[1]:g} HU inside bone)"
    # Frames 0 and 1 (pre-contrast in a series analysed) against frames 0-4 (the bolus reaches the mean brain after
    # them: its arrival in the vessels is frame 2 or later, and the mean brain lags), measured inside the brain of the
    # voxelwise median of frames 0-4, which one or two outlying frames among them do not move: the motion reference and
    # the brain mask are then taken from frames 0 and 1 after replacement (frame 0 at -100 HU over the brain left a
    # mask of 50-189 voxels for 15773-44812 on the phantom, and CBF 2.5-4 times the series').
    compared = min(FIRST_FRAMES_COMPARED, hu.shape[-1])
    region = brain_mask(np.median(hu[..., :compared], axis=-1))
    if not region.any():
        raise ValueError(no_brain)
    replaced: dict[int, int] = {}
    hu = replace_outlying_frames(hu, region, 2, compared, replaced, notes, name)
    if motion_correction:
        from custom.perfusion.motion import correct_motion

        hu = correct_motion(hu, spacing_mm)
    pre_contrast = hu[..., :2].mean(axis=-1)
    brain = brain_mask(pre_contrast)
    if not brain.any():
        raise ValueError(no_brain)
    bone_fraction = float(np.mean(pre_contrast[brain] > BONE_HU))
    if bone_fraction > MAX_BONE_FRACTION:
        raise ValueError(
            f"'{name}': {bone_fraction:.0%} of the region found as brain is above {BONE_HU:g} HU (bone): the "
            "series is not in HU (stored values without the rescale intercept -1024? set scl_slope/scl_inter)"
        )
    # Then every frame before the arrival (the baseline and the margin frame after it, whose mean brain HU the phantom's
    # bolus moves by 0.03 HU at most) against their median: outliers among the later frames are replaced too.
    baseline_frames = bolus_arrival(hu, brain, name)
    if baseline_frames + 1 >= 3:
        before = len(replaced)
        hu = replace_outlying_frames(hu, brain, baseline_frames + 1, baseline_frames + 1, replaced, notes, name)
        if len(replaced) > before:
            baseline_frames = bolus_arrival(hu, brain, name)
    concentration = hu - hu[..., :baseline_frames].mean(axis=-1, keepdims=True)
    vessel_region = vessel_search_region(pre_contrast, brain)
    if aif_mask is None:
        aif, vof = find_aif_and_vof(concentration, vessel_region, frame_s)
    else:
        aif_mask = np.asarray(aif_mask) > 0
        if aif_mask.shape != brain.shape or not aif_mask.any():
            raise ValueError(f"'{name}': the AIF mask must be a non-empty 3D mask of shape {brain.shape}")
        voxels = np.argwhere(aif_mask)
        aif = _vascular_curve(concentration[aif_mask], voxels, frame_s)
        vof = find_aif_and_vof(concentration, vessel_region, frame_s)[1] if venous_scaling else None
    brain_curve = concentration[brain].mean(axis=0)
    brain_peak = float(brain_curve.max())
    if brain_curve[-1] > MAX_TAIL_FRACTION * brain_peak:
        notes.append(
            f"truncated bolus: the mean brain enhancement is still {brain_curve[-1] / brain_peak:.0%} of its peak "
            "at the last frame; CBF, CBV and MTT are biased (acquire until the bolus has passed)"
        )
    aif_end = float(aif.curve[-1]) / aif.peak_hu
    if aif_end > MAX_AIF_END_FRACTION:
        raise ValueError(
            f"'{name}': the AIF (voxels {aif.voxels[:3].tolist()}...) peaks in frame {int(np.argmax(aif.curve))} "
            f"({aif.time_to_peak_s:g} s) and is still at {aif_end:.0%} of its peak in the last frame "
            f"({aif.curve.size - 1}): the series ends before the arterial bolus has passed (on the phantom CBF was off "
            f"by up to a factor of 2.6); these maps need a series acquired until the AIF has fallen below "
            f"{MAX_AIF_END_FRACTION:.0%} of its peak"
        )
    if aif.peak_hu < MIN_AIF_TO_BRAIN_PEAK * brain_peak:
        source = "the --aif_mask voxels" if aif_mask is not None else "no artery found: the automatic AIF"
        raise ValueError(
            f"'{name}': {source} (voxels {aif.voxels[:3].tolist()}...) peak at {aif.peak_hu:.1f} HU, "
            f"{aif.peak_hu / brain_peak:.1f} times the mean brain enhancement ({brain_peak:.1f} HU); an artery "
            f"enhances at least {MIN_AIF_TO_BRAIN_PEAK:g} times more. Give arterial voxels with --aif_mask"
        )
    # Voxel noise from the first two frames not replaced (bolus_arrival refuses contrast in frames 0 and 1; from frame
    # 2 on only the vessels may enhance, which the median ignores): a replaced frame is a copy of another.
    first, second = [t for t in range(hu.shape[-1]) if t not in replaced][:2]
    noise_hu = 1.4826 * float(np.median(np.abs(hu[..., second][brain] - hu[..., first][brain]))) / np.sqrt(2.0)
    if aif.peak_hu < MIN_AIF_TO_NOISE * noise_hu:
        raise ValueError(
            f"'{name}': the AIF (voxels {aif.voxels[:3].tolist()}...) peaks at {aif.peak_hu:.1f} HU, "
            f"{aif.peak_hu / noise_hu:.1f} times the voxel noise ({noise_hu:.1f} HU between frames {first} and "
            f"{second}); an artery enhances at least {MIN_AIF_TO_NOISE:g} times more: no contrast bolus reached the "
            "vessels"
        )
    scale = 1.0
    if venous_scaling and vof is not None:
        scale = max(1.0, float(np.clip(vof.curve, 0, None).sum() / max(np.clip(aif.curve, 0, None).sum(), 1e-6)))
    elif venous_scaling:
        notes.append("no venous output found: AIF not corrected for partial volume")

    dev = torch.device(device)
    box = ndimage.find_objects(brain.astype(np.int8))[0]  # the brain's bounding box: smoothing stays inside it
    values = torch.from_numpy(np.ascontiguousarray(concentration[box])).to(dev)
    mask = torch.from_numpy(np.ascontiguousarray(brain[box])).to(dev)
    if smoothing_mm > 0:
        values = smooth_in_plane(values, mask, (smoothing_mm / spacing_mm[0], smoothing_mm / spacing_mm[1]))
    curves = values[mask]  # (N, T)
    arterial = torch.from_numpy(aif.curve * scale).to(dev, torch.float32)
    residue = deconvolve(curves, arterial, frame_s, method, oscillation_limit, tikhonov_lambda)

    peak_value, peak_index = residue.max(dim=1)
    frames = hu.shape[-1]
    delay = refine_peak(residue, peak_index)
    delay = torch.where(delay >= frames, delay - residue.shape[1], delay)  # wrapped: tissue ahead of the AIF
    cbf = peak_value.clamp_min(0) / FLOW_TO_RATE
    cbv = VOLUME_FACTOR * curves.clamp_min(0).sum(dim=1) / arterial.clamp_min(0).sum()
    mtt = torch.where(cbf > 0, 60.0 * cbv / cbf.clamp_min(1e-6), torch.zeros_like(cbf)).clamp_max(MTT_CAP_S)
    ttp = refine_peak(curves, curves.argmax(dim=1))
    maps = {}
    for map_name, voxel_values in zip(MAP_NAMES, (cbf, cbv, mtt, delay.clamp_min(0) * frame_s, ttp * frame_s)):
        volume = np.zeros(brain.shape, np.float32)
        volume[brain] = voxel_values.cpu().numpy()
        maps[map_name] = volume
    for note in notes:
        logger.warning("'%s': %s", name, note)
    return PerfusionResult(maps, brain, aif, vof, scale, baseline_frames, frame_s, notes)
