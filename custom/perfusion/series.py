"""Read a raw 4D CT perfusion series and refuse what cannot be analysed, naming the file and the problem.

Why it exists: headers of released 4D series differ (time step in pixdim[4] with seconds or milliseconds,
or missing); a 3D file, a handful of frames or a series without contrast must be refused before any
deconvolution rather than turned into meaningless maps.
"""

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from custom.data.studies import load_nifti, read_voxels, require_finite, require_voxel_size_in_mm

MIN_FRAMES = 10
TIME_UNIT_SECONDS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
# The other time-axis units NIfTI's xyzt_units can hold (spectroscopy's): not a time, so pixdim[4] is no time step.
NOT_TIME_UNITS = ("hz", "ppm", "rads")
# CT perfusion frames are 0.5-4 s apart; outside this range the time unit is wrong (pixdim[4] in ms labelled
# seconds, or the reverse), which would scale CBF and Tmax by 1000 without a word.
FRAME_S_RANGE = (0.1, 20.0)


@dataclass(frozen=True)
class LoadedSeries:
    """A 4D CT perfusion series in HU, (H, W, D, T), with its time step and the spatial grid's image."""

    path: Path
    hu: np.ndarray  # float32 (H, W, D, T)
    frame_s: float
    image: nib.Nifti1Image  # the 4D image (affine and spatial zooms of the CT grid)

    @property
    def spacing_mm(self) -> tuple:
        return tuple(float(z) for z in self.image.header.get_zooms()[:3])


def header_frame_s(image: nib.Nifti1Image) -> float | None:
    """The time step in seconds from pixdim[4] and the NIfTI time unit; None when the header lacks it."""
    zooms = image.header.get_zooms()
    step = float(zooms[3]) if len(zooms) > 3 else 0.0
    unit = image.header.get_xyzt_units()[1]
    if step <= 0 or unit not in TIME_UNIT_SECONDS:
        return None
    return step * TIME_UNIT_SECONDS[unit]


def require_no_blank_frame(path, hu: np.ndarray) -> None:
    """Refuse a frame of one value at every voxel, naming the file and the frames: a dropped frame stored as 0 or
    as padding (-1024) is a drop of tens of HU in every curve, and the maps came out confidently wrong (CBF x 80
    for one -1024 frame in the phantom, x 10 for one 0 HU frame just after the baseline)."""
    frames = hu.reshape(-1, hu.shape[-1])
    blank = np.flatnonzero(frames.min(axis=0) == frames.max(axis=0))
    if blank.size:
        raise ValueError(
            f"'{path}': frame(s) {blank.tolist()} (0-based) hold one value at every voxel "
            f"({float(frames[0, blank[0]]):g}): a dropped or padded frame; re-export the series, or "
            "replace the frame by its neighbours' mean"
        )


def mean_neighbour_difference_hu(hu: np.ndarray, axis: int) -> float:
    """Mean absolute HU difference between neighbours along ``axis`` (2: slices, 3: frames) of (H, W, D, T),
    frame by frame so no second copy of the series is made."""
    if axis == 2:
        return float(np.mean([np.abs(np.diff(hu[..., t], axis=2)).mean() for t in range(hu.shape[3])]))
    return float(np.mean([np.abs(hu[..., t + 1] - hu[..., t]).mean() for t in range(hu.shape[3] - 1)]))


def mean_spread_hu(hu: np.ndarray, axis: int) -> float:
    """Mean absolute HU difference of (H, W, D, T) from its median along ``axis`` (2: slices, 3: frames), slice by
    slice or frame by frame so no second copy of the series is made."""
    if axis == 2:
        parts = (hu[..., t] for t in range(hu.shape[3]))
    else:
        parts = (hu[:, :, k, :] for k in range(hu.shape[2]))
    return float(np.mean([np.abs(part - np.median(part, axis=-1, keepdims=True)).mean() for part in parts]))


def require_time_on_the_fourth_axis(path, hu: np.ndarray) -> None:
    """Refuse a series whose neighbouring frames differ more than its neighbouring slices and whose frames spread
    more about their median than its slices about theirs, naming the file: frames share the anatomy (only noise,
    contrast and motion change) while slices cut other anatomy (skull, ventricles), so such a series holds time on
    the 3rd axis and slices on the 4th (x, y, t, z). Read as (x, y, z, t), it gave maps without a word
    (docs/perfusion.md).

    The spread is the second test: head motion moves neighbouring frames apart by its own amplitude, and thin slices
    (0.5-1 mm, whole-brain CTP) lie closer than that, but a head moving in the scanner stays one head, while the
    slices of a whole-brain series span it. A phantom series of 128 slices of 0.5 mm moved 5 mm and 5 degrees for three
    frames, or 64 slices of 1 mm moved about 1 mm and 1 degree every frame, was refused by the neighbours alone
    (before --motion_correction could run)."""
    if hu.shape[2] < 2 or hu.shape[3] < 2:
        return  # one slice or one frame: nothing to compare
    between_slices, between_frames = mean_neighbour_difference_hu(hu, 2), mean_neighbour_difference_hu(hu, 3)
    if between_frames <= between_slices:
        return
    slices_spread, frames_spread = mean_spread_hu(hu, 2), mean_spread_hu(hu, 3)
    if frames_spread > slices_spread:
        raise ValueError(
            f"'{path}': neighbouring frames (4th axis, {hu.shape[3]}) differ by {between_frames:.1f} HU on average, "
            f"more than neighbouring slices (3rd axis, {hu.shape[2]}: {between_slices:.1f} HU), and frames spread "
            f"{frames_spread:.1f} HU about their median, slices {slices_spread:.1f} HU; frames of one head differ less "
            "than slices, so the axes are likely (x, y, time, slices): store the series as (x, y, slices, time), e.g. "
            "numpy.swapaxes(data, 2, 3) with pixdim[3] and pixdim[4] swapped"
        )


def load_series(path, frame_s: float | None = None) -> LoadedSeries:
    """Load a 4D CTP NIfTI; the time step comes from ``frame_s`` (seconds) if given, else from the header.

    Refused with a ValueError naming ``path``: unreadable files, not 4D (e.g. a 3D map), fewer than
    MIN_FRAMES frames, no time step in the header and none given (or a time unit that is not a time, e.g. 'hz'),
    a time step outside FRAME_S_RANGE, a voxel size not read in mm (``require_voxel_size_in_mm``),
    non-finite values, a blank frame, time on the 3rd axis (``require_time_on_the_fourth_axis``).
    """
    path = Path(path)
    image = load_nifti(path)
    require_voxel_size_in_mm(path, image)  # the in-plane smoothing and the maps' grid take the voxel size in mm
    if len(image.shape) != 4:
        raise ValueError(f"'{path}': expected a 4D perfusion series (x, y, z, time), found shape {image.shape}")
    frames = image.shape[3]
    if frames < MIN_FRAMES:
        raise ValueError(f"'{path}': {frames} frames; at least {MIN_FRAMES} are needed to deconvolve a bolus")
    if frame_s is None:
        unit = image.header.get_xyzt_units()[1]
        if unit in NOT_TIME_UNITS:
            raise ValueError(
                f"'{path}': the header's time unit (NIfTI xyzt_units) is '{unit}', which is not a time, so pixdim[4] "
                f"= {image.header.get_zooms()[3]:g} is no time step; pass the frame interval with --dt SECONDS"
            )
        frame_s = header_frame_s(image)
        if frame_s is None:
            raise ValueError(
                f"'{path}': no time step in the header (pixdim[4] = {image.header.get_zooms()[3]}, time unit "
                f"'{image.header.get_xyzt_units()[1]}'); pass the frame interval with --dt SECONDS"
            )
        low, high = FRAME_S_RANGE
        if not low <= frame_s <= high:
            raise ValueError(
                f"'{path}': the header's time step is {frame_s:g} s (pixdim[4] = {image.header.get_zooms()[3]:g}, "
                f"time unit '{image.header.get_xyzt_units()[1]}'), outside the {low:g}-{high:g} s of CT perfusion "
                "frames: is the time unit wrong? Pass the frame interval with --dt SECONDS"
            )
    elif not FRAME_S_RANGE[0] <= frame_s <= FRAME_S_RANGE[1]:
        raise ValueError(
            f"'{path}': --dt {frame_s:g} is outside the {FRAME_S_RANGE[0]:g}-{FRAME_S_RANGE[1]:g} s of CT perfusion "
            "frames; --dt is in seconds"
        )
    hu = read_voxels(path, lambda: image.get_fdata(dtype=np.float32))
    require_finite(path, hu)
    require_no_blank_frame(path, hu)
    require_time_on_the_fourth_axis(path, hu)
    return LoadedSeries(path, hu, float(frame_s), image)
