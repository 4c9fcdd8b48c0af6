"""Intensity normalisation of CTP studies that MONAI does not offer as one transform."""

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

PERFUSION_CHANNELS = (1, 2, 3, 4)  # CBF, CBV, MTT, Tmax; channel 0 is CT


class NormalizeWithinBrain(Transform):
    """Clip each channel to its brain percentiles, z-score it within the brain, and zero it outside.

    Why it exists: CTP map units differ between centres and scanners, and the maps are zero outside
    the brain. ``NormalizeIntensity(nonzero=True)`` takes each channel's own non-zero voxels, which for
    CT (air at -1000 HU, skull) is the whole field of view, and it cannot clip outliers first. Here the
    brain is the union of the non-zero perfusion maps and every channel, CT included, is normalised
    over those voxels only, per case (nnU-Net's CT scheme, restricted to the brain).

    Input: channel-first array (C, spatial...) with C >= max(mask_channels) + 1.
    Output: float32 of the same shape; brain voxels are (clip(x, p_low, p_high) - mean) / std with
    the percentiles, mean and std of the clipped brain voxels of that channel; other voxels are 0.
    A study with no brain voxel is returned as zeros (nothing to normalise; the dataset check
    reports such cases).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        mask_channels: Sequence[int] = PERFUSION_CHANNELS,
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        eps: float = 1e-6,
    ) -> None:
        if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {lower_percentile}, {upper_percentile}"
            )
        self.mask_channels = tuple(mask_channels)
        self.quantiles = (lower_percentile / 100.0, upper_percentile / 100.0)
        self.eps = eps

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if x.shape[0] <= max(self.mask_channels):
            raise ValueError(f"expected channels {self.mask_channels} in a channel-first image, got shape {x.shape}")
        brain = (x[list(self.mask_channels)] != 0).any(dim=0)
        out = torch.zeros_like(x)
        if brain.any():
            for c in range(x.shape[0]):
                values = x[c][brain].double()
                low, high = torch.quantile(values, torch.tensor(self.quantiles, dtype=values.dtype))
                values = values.clamp(low, high)
                mean, std = values.mean(), values.std(unbiased=False)
                out[c][brain] = ((values - mean) / std.clamp_min(self.eps)).float()
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class NormalizeWithinBraind(MapTransform):
    """Dictionary wrapper of :class:`NormalizeWithinBrain`."""

    backend = NormalizeWithinBrain.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_channels: Sequence[int] = PERFUSION_CHANNELS,
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeWithinBrain(mask_channels, lower_percentile, upper_percentile)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d
