"""Hemisphere symmetry: the mid-sagittal line of a synthetic asymmetric volume, exact mirroring, the transform."""

import math

import numpy as np
import pytest
import torch

from custom.symmetry import (
    ContralateralChannels,
    ContralateralChannelsd,
    MidSagittalLine,
    estimate_midline,
    mirror,
)

TRUE_LINE = MidSagittalLine(angle_deg=8.0, offset_px=5.0)
SIZE, SLICES, CHANNELS = 96, 3, 5


def _line_coordinates(line: MidSagittalLine, size: int = SIZE):
    """Signed distance to ``line`` (u) and position along it (v) of every pixel, in pixels."""
    centred = np.arange(size) - (size - 1) / 2
    rows, columns = np.meshgrid(centred, centred, indexing="ij")
    angle = math.radians(line.angle_deg)
    u = rows * math.cos(angle) + columns * math.sin(angle) - line.offset_px
    v = -rows * math.sin(angle) + columns * math.cos(angle)
    return u, v


def _head(u, v, lesion: bool = True) -> np.ndarray:
    """A (C, H, W, D) head symmetric in u (both hemispheres alike) except for a lesion in the u > 0 hemisphere."""
    brain = (u / 34.0) ** 2 + (v / 42.0) ** 2 < 1.0
    channels = []
    for c in range(CHANNELS):
        slices = []
        for z in range(SLICES):
            texture = 2.0 + np.cos(u / 4.0) * np.cos(v / 6.0 + z + c) + 0.3 * np.cos(u / 7.0) * np.sin(v / 9.0 - c)
            if lesion:
                texture = np.where((u > 8) & (u < 20) & (v > -12) & (v < 6), 0.3 * texture, texture)
            slices.append(np.where(brain, texture, 0.0))
        channels.append(np.stack(slices, axis=-1))
    return np.stack(channels).astype(np.float32)


def test_midline_of_a_tilted_off_centre_asymmetric_head_is_recovered():
    u, v = _line_coordinates(TRUE_LINE)
    line = estimate_midline(_head(u, v))
    assert abs(line.angle_deg - TRUE_LINE.angle_deg) < 0.5  # degrees
    assert abs(line.offset_px - TRUE_LINE.offset_px) < 0.5  # pixels


def test_mirroring_about_the_true_line_swaps_the_hemispheres():
    u, v = _line_coordinates(TRUE_LINE)
    mirrored = mirror(torch.from_numpy(_head(u, v, lesion=False)), TRUE_LINE).numpy()
    expected = _head(-u, v, lesion=False)  # the analytic reflection: u -> -u
    interior = (u / 34.0) ** 2 + (v / 42.0) ** 2 < 0.85  # away from the brain edge, where zeros interpolate in
    assert np.abs(mirrored - expected)[:, interior].max() < 0.05  # bilinear interpolation of values 0.7 to 3.3


def test_mirroring_twice_gives_back_the_image():
    u, v = _line_coordinates(TRUE_LINE)
    head = torch.from_numpy(_head(u, v))
    twice = mirror(mirror(head, TRUE_LINE), TRUE_LINE).numpy()
    interior = (u / 34.0) ** 2 + (v / 42.0) ** 2 < 0.85
    lesion_edges = (np.abs(u - 8) < 2) | (np.abs(u - 20) < 2) | (np.abs(v + 12) < 2) | (np.abs(v - 6) < 2)
    smooth = interior & ~lesion_edges
    assert np.abs(twice - head.numpy())[:, smooth].max() < 0.05


def test_mirror_about_an_upright_centred_line_is_a_flip():
    image = torch.rand(2, 16, 12, 3)
    assert torch.allclose(mirror(image, MidSagittalLine(0.0, 0.0)), image.flip(1), atol=1e-5)


@pytest.mark.parametrize("mode", ["mirror", "difference"])
def test_transform_appends_contralateral_channels(mode):
    u, v = _line_coordinates(TRUE_LINE)
    head = torch.from_numpy(_head(u, v))
    out = ContralateralChannels(mode)(head, line=TRUE_LINE)
    assert out.shape == (2 * CHANNELS, SIZE, SIZE, SLICES)
    assert torch.equal(out[:CHANNELS], head)
    mirrored = mirror(head, TRUE_LINE)
    assert torch.allclose(out[CHANNELS:], mirrored if mode == "mirror" else head - mirrored)


def test_dictionary_transform_estimates_the_line_like_the_array_transform():
    u, v = _line_coordinates(MidSagittalLine(-5.0, -3.0), size=48)
    head = torch.from_numpy(_head(u, v))
    out = ContralateralChannelsd("image", "difference")({"image": head, "label": 1})
    assert torch.allclose(out["image"], ContralateralChannels("difference")(head)) and out["label"] == 1


def test_a_volume_without_brain_is_refused():
    with pytest.raises(ValueError, match="no brain voxel"):
        estimate_midline(np.zeros((5, 32, 32, 2), dtype=np.float32))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        ContralateralChannels("sideways")
