"""Hemisphere symmetry: each case's mid-sagittal line, and its contralateral maps as extra input channels.

Why it exists: a radiologist reads a perfusion deficit by comparing a hemisphere with the other one. A 2D
network sees that only if the mirrored maps are beside the originals, and the mirror must be the brain's
own mid-sagittal line (heads are tilted and off-centre in the scanner), not the image centre. MONAI has
flips about the image centre only. The line is found per volume, in-plane, by maximising the correlation
between the brain and its reflection over candidate lines (coarse-to-fine grid search, every candidate
resampled at once with ``torch.nn.functional.grid_sample``).

Geometry, in pixel coordinates (row = axis 0, column = axis 1) measured from the image centre: the line is
``{p : n . p = offset}`` with unit normal ``n = (cos angle, sin angle)``. Angle 0 is a line across axis 0,
the left-right axis of NIfTI / ISLES 2018 volumes, i.e. an upright mid-sagittal line; ``offset`` is the
line's signed distance from the centre, in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from custom.transforms import PERFUSION_CHANNELS


class MidSagittalLine(NamedTuple):
    """An in-plane line: ``angle_deg`` of its normal from axis 0, ``offset_px`` from the image centre."""

    angle_deg: float
    offset_px: float


def reflection_grid(angles_rad: torch.Tensor, offsets_px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grids (K, H, W, 2) that reflect an (H, W) image about K lines (angles and offsets of
    shape (K,)): output pixel p takes the input at p - 2 (n . p - offset) n (align_corners=True)."""
    rows = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    columns = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    points = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1)  # (H, W, 2) as (row, column)
    normals = torch.stack([torch.cos(angles_rad), torch.sin(angles_rad)], dim=-1).double()  # (K, 2)
    distance = torch.einsum("hwc,kc->khw", points, normals) - offsets_px.double()[:, None, None]
    source = points[None] - 2 * distance[..., None] * normals[:, None, None, :]
    half_size = torch.tensor([max(width - 1, 1) / 2, max(height - 1, 1) / 2], dtype=torch.float64)
    return (source.flip(-1) / half_size).float()  # grid_sample wants (x = column, y = row) in [-1, 1]


def mirror(image: torch.Tensor, line: MidSagittalLine, mode: str = "bilinear") -> torch.Tensor:
    """``image`` (C, H, W) or (C, H, W, D) reflected about ``line`` in every slice; zero where the reflection
    falls outside the image."""
    x = convert_to_tensor(image, track_meta=False, dtype=torch.float32)
    volume = x.ndim == 4
    stack = x.permute(0, 3, 1, 2).reshape(-1, *x.shape[1:3]) if volume else x  # (C * D, H, W)
    grid = reflection_grid(
        torch.tensor([math.radians(line.angle_deg)]), torch.tensor([line.offset_px]), *stack.shape[1:]
    )
    mirrored = F.grid_sample(stack[None], grid, mode=mode, padding_mode="zeros", align_corners=True)[0]
    if volume:
        mirrored = mirrored.reshape(x.shape[0], x.shape[3], *x.shape[1:3]).permute(0, 2, 3, 1)
    return mirrored


def _symmetry_features(image: torch.Tensor, mask_channels: Sequence[int], working_size: int) -> torch.Tensor:
    """(C + 1, h, w) in-plane summary of a (C, H, W[, D]) image: every channel z-scored within the brain and
    averaged over slices, zero outside the brain, plus the brain mask; shrunk to at most ``working_size``."""
    x = image if image.ndim == 4 else image[..., None]
    brain = (x[list(mask_channels)] != 0).any(dim=0)  # (H, W, D)
    if not brain.any():
        raise ValueError("no brain voxel (every mask channel is zero): the mid-sagittal line is undefined")
    values = x[:, brain]
    mean, std = values.mean(dim=1), values.std(dim=1).clamp_min(1e-6)
    normalised = torch.where(brain, (x - mean[:, None, None, None]) / std[:, None, None, None], 0.0)
    features = torch.cat([normalised.mean(dim=-1), brain.float().mean(dim=-1)[None]])
    scale = working_size / max(features.shape[1:])
    if scale < 1:
        features = F.interpolate(features[None], scale_factor=scale, mode="area")[0]
    return features


def _symmetry_scores(features: torch.Tensor, angles: torch.Tensor, offsets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Normalised cross-correlation between ``features`` and their reflection about each candidate line."""
    scores = []
    for start in range(0, len(angles), chunk):
        grid = reflection_grid(angles[start : start + chunk], offsets[start : start + chunk], *features.shape[1:])
        reflected = F.grid_sample(
            features[None].expand(len(grid), -1, -1, -1), grid, mode="bilinear", padding_mode="zeros",
            align_corners=True,
        )
        product = (reflected * features).sum(dim=(1, 2, 3))
        norms = (reflected.square().sum(dim=(1, 2, 3)) * features.square().sum()).sqrt().clamp_min(1e-12)
        scores.append(product / norms)
    return torch.cat(scores)


def _grid_search(features: torch.Tensor, centre: tuple[float, float], ranges: tuple[float, float],
                 steps: tuple[float, float], levels: int, chunk: int) -> tuple[float, float]:
    """Best (angle in degrees, offset in working pixels) within ``ranges`` of ``centre``, on a grid of
    ``steps`` refined ``levels - 1`` times (each time 4 x finer, within 1.5 steps of the best so far)."""
    (angle_range, offset_range), (angle_step, offset_step) = ranges, steps
    best_angle, best_offset = centre
    for _ in range(levels):
        angles = torch.arange(-angle_range, angle_range + 1e-9, angle_step, dtype=torch.float64) + best_angle
        offsets = torch.arange(-offset_range, offset_range + 1e-9, offset_step, dtype=torch.float64) + best_offset
        grid_angles, grid_offsets = (g.reshape(-1) for g in torch.meshgrid(angles, offsets, indexing="ij"))
        best = int(_symmetry_scores(features, torch.deg2rad(grid_angles), grid_offsets, chunk).argmax())
        best_angle, best_offset = float(grid_angles[best]), float(grid_offsets[best])
        angle_range, offset_range = 1.5 * angle_step, 1.5 * offset_step
        angle_step, offset_step = angle_step / 4, offset_step / 4
    return best_angle, best_offset


def estimate_midline(
    image: NdarrayOrTensor,
    mask_channels: Sequence[int] = PERFUSION_CHANNELS,
    max_angle_deg: float = 30.0,
    max_offset_fraction: float = 0.25,
    working_size: int = 128,
    chunk: int = 64,
) -> MidSagittalLine:
    """The in-plane mid-sagittal line of a channel-first (C, H, W) or (C, H, W, D) volume (one line for all
    slices), from the brain mask (voxels where any ``mask_channels`` is non-zero) and intensity symmetry.

    First the brain mask alone (a smooth landscape without local optima from texture): grid search over
    angles within ``max_angle_deg`` of upright and offsets within ``max_offset_fraction`` of the image size,
    steps of 3 degrees and 3 working pixels, refined twice. Then every channel's intensities refine it
    within 4 degrees and 4 working pixels (final steps 0.06 degree and 0.06 working pixel). Works on an
    in-plane summary shrunk to ``working_size`` pixels for speed.
    """
    x = convert_to_tensor(image, track_meta=False, dtype=torch.float32)
    if x.ndim not in (3, 4) or x.shape[0] <= max(mask_channels):
        raise ValueError(f"expected a channel-first (C, H, W[, D]) image with channels {tuple(mask_channels)}, "
                         f"got shape {tuple(x.shape)}")
    features = _symmetry_features(x, mask_channels, working_size)
    to_working = features.shape[1] / x.shape[1]
    offset_range = max_offset_fraction * max(features.shape[1:])
    from_mask = _grid_search(features[-1:], (0.0, 0.0), (max_angle_deg, offset_range), (3.0, 3.0), 3, chunk)
    angle, offset = _grid_search(features, from_mask, (4.0, 4.0), (1.0, 1.0), 3, chunk)
    return MidSagittalLine(angle, offset / to_working)


class ContralateralChannels(Transform):
    """Append the contralateral maps of a (C, H, W[, D]) image as C extra channels: the image mirrored about
    its own mid-sagittal line (``mode="mirror"``) or the image minus that mirror (``mode="difference"``).

    The line is estimated per volume by :func:`estimate_midline` unless given. Output: (2C, H, W[, D]),
    float32, the original channels first. Voxels outside the brain stay zero in the mirrored channels when
    the input is zero there (as after ``NormalizeWithinBrain``).
    """

    backend = [TransformBackends.TORCH]
    MODES = ("mirror", "difference")

    def __init__(self, mode: str = "mirror", mask_channels: Sequence[int] = PERFUSION_CHANNELS,
                 max_angle_deg: float = 30.0) -> None:
        if mode not in self.MODES:
            raise ValueError(f"ContralateralChannels mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.mask_channels = tuple(mask_channels)
        self.max_angle_deg = max_angle_deg

    def __call__(self, img: NdarrayOrTensor, line: MidSagittalLine | None = None) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if line is None:
            line = estimate_midline(x, self.mask_channels, self.max_angle_deg)
        mirrored = mirror(x, line)
        extra = mirrored if self.mode == "mirror" else x - mirrored
        return convert_to_dst_type(torch.cat([x, extra]), img, dtype=torch.float32)[0]


class ContralateralChannelsd(MapTransform):
    """Dictionary wrapper of :class:`ContralateralChannels`."""

    backend = ContralateralChannels.backend

    def __init__(self, keys: KeysCollection, mode: str = "mirror", mask_channels: Sequence[int] = PERFUSION_CHANNELS,
                 max_angle_deg: float = 30.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.contralateral = ContralateralChannels(mode, mask_channels, max_angle_deg)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.contralateral(d[key])
        return d
