"""CTP study transforms MONAI does not offer: load-time validation naming the file, the brain mask, brain
normalisation, slice context, the lesion mask within the brain, removal of small predicted lesions; and the
training batches' padding collate."""

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor, pad_list_data_collate
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, convert_to_tensor

from custom.clinical import MODALITIES, PERFUSION_CHANNELS, brain_mask  # PERFUSION_CHANNELS: all but CT
from custom.data.studies import image_problems, label_problems, load_nifti, require_voxel_size_in_mm
from custom.deploy import CLIP_PERCENTILES, NORMALIZE_EPS, normalize_within_brain
from custom.lesions import check_lesion_threshold, check_min_volume, lesion_from_probabilities, remove_small_lesions


def pad_samples_collate(batch: list):
    """MONAI's ``pad_list_data_collate`` over the samples of every item (``RandCropByPosNegLabeld`` with
    ``num_samples`` gives each item a list of crops): each batch is padded to its largest slice.

    Why it exists: with ``patch_size`` -1 (whole slices) cases of different in-plane sizes give crops of different
    sizes, which ``list_data_collate`` cannot stack (the first epoch stopped naming no file), and MONAI's padding
    collate pads a flat batch only. Crops of one size are collated unchanged.
    """
    return pad_list_data_collate([sample for item in batch for sample in (item if isinstance(item, list) else [item])])


def _file_name(array) -> str:
    """The file an array was read from (``LoadImage`` records it in the MetaTensor's meta), for messages."""
    meta = array.meta if isinstance(array, MetaTensor) else {}
    return str(meta.get("filename_or_obj") or "<array without file name>")


def _voxel_size_problems(array) -> list[str]:
    """The problem of the NIfTI file an array was read from whose voxel size nibabel does not read in mm
    (``custom.data.studies.require_voxel_size_in_mm``: the header is read again, unfixed; MONAI's meta holds the one
    nibabel fixed). An array not read from a NIfTI file has none."""
    name = _file_name(array)
    if not name.lower().endswith((".nii", ".nii.gz")):
        return []
    try:
        require_voxel_size_in_mm(name, load_nifti(name, name), name)
    except ValueError as err:
        return [str(err)]
    return []


class ValidateStudy(Transform):
    """Raise a ValueError naming the file when an image (and its label) breaks the data contract.

    Why it exists: nothing in MONAI checks that values are finite or labels binary, and a bad study gives a
    silently wrong result: one NaN voxel turns the brain statistics of ``NormalizeWithinBrain`` into NaN and
    the mask into background; a 0.5 label is truncated by the loss; an all-zero perfusion map crashes
    ``RandCropByPosNegLabeld`` deep inside a DataLoader worker. The rules are those of
    ``python -m custom check`` (``custom.data.check``).

    Place it right after ``LoadImage``: ``image`` is the array as read, (H, W, D, 5) with channels CT, CBF,
    CBV, MTT, Tmax (NaN/Inf, an all-zero perfusion map and other shapes are refused); the optional
    ``label`` (H, W, D) must have the image's shape and only the values 0 and 1. A MetaTensor's affine must make the
    third axis the head-foot one (axial slices), and the header of the file it was read from must give the voxel size
    in mm (read again: nibabel reads a stored 0 as 1 mm and ignores a unit of meters). Returns ``image`` unchanged.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __call__(self, image: NdarrayOrTensor, label: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        image_name = _file_name(image)
        image_array = convert_to_numpy(image)
        affine = convert_to_numpy(image.affine) if isinstance(image, MetaTensor) else None
        problems = _voxel_size_problems(image) + image_problems(image_name, image_array, affine)
        if label is not None:
            problems += label_problems(_file_name(label), convert_to_numpy(label), image_name, image_array.shape)
        if problems:
            raise ValueError("; ".join(problems))
        return image


class ValidateStudyd(MapTransform):
    """Dictionary wrapper of :class:`ValidateStudy`: ``keys`` holds the image key, then optionally the label key."""

    backend = ValidateStudy.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 1 <= len(self.keys) <= 2:
            raise ValueError(f"keys must be the image key and optionally the label key, got {self.keys}")
        self.validator = ValidateStudy()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        image_key, label_key = (*self.keys, None)[:2]
        if image_key not in d and self.allow_missing_keys:
            return d
        label = None if label_key is None or (label_key not in d and self.allow_missing_keys) else d[label_key]
        self.validator(d[image_key], label)
        return d


class BrainMaskd(MapTransform):
    """Store the brain of the image under ``brain_key``: the boolean (H, W, D) voxels where any perfusion map is
    non-zero (:func:`custom.clinical.brain_mask`), for :class:`LesionMaskd`.

    Why it exists: the network sees the maps normalised and padded, and the post-processing gets the probabilities
    back on the image's grid (``Invertd``); the brain must be taken from the maps as read, on that grid. Place it
    right after ``ValidateStudyd``: ``image`` is then the channels-last (H, W, D, 5) array as read, and anything else
    is refused (a channel-first or padded image would give a brain on another grid).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection, brain_key: str = "brain") -> None:
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"BrainMaskd takes one image key, got {self.keys}")
        self.brain_key = brain_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        key = self.keys[0]
        image = convert_to_numpy(d[key])
        if image.ndim != 4 or image.shape[-1] != len(MODALITIES):
            raise ValueError(
                f"BrainMaskd expects '{key}' channels last, (H, W, D, {len(MODALITIES)}) as read from "
                f"{_file_name(d[key])}, got shape {image.shape}: place it right after ValidateStudyd"
            )
        d[self.brain_key] = brain_mask(image)
        return d


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
    reports such cases). The computation is ``custom.deploy.normalize_within_brain``, which the MONAI-free
    runner calls too.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        mask_channels: Sequence[int] = PERFUSION_CHANNELS,
        lower_percentile: float = CLIP_PERCENTILES[0],
        upper_percentile: float = CLIP_PERCENTILES[1],
        eps: float = NORMALIZE_EPS,
    ) -> None:
        if not 0.0 <= lower_percentile < upper_percentile <= 100.0:
            raise ValueError(
                f"need 0 <= lower_percentile < upper_percentile <= 100, got {lower_percentile}, {upper_percentile}"
            )
        self.mask_channels = tuple(mask_channels)
        self.percentiles = (lower_percentile, upper_percentile)
        self.eps = eps

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        out = normalize_within_brain(x, self.mask_channels, self.percentiles, self.eps)
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class NormalizeWithinBraind(MapTransform):
    """Dictionary wrapper of :class:`NormalizeWithinBrain`."""

    backend = NormalizeWithinBrain.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_channels: Sequence[int] = PERFUSION_CHANNELS,
        lower_percentile: float = CLIP_PERCENTILES[0],
        upper_percentile: float = CLIP_PERCENTILES[1],
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeWithinBrain(mask_channels, lower_percentile, upper_percentile)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


class AdjacentSlices(Transform):
    """Append each slice's neighbours along the last (slice) axis as extra channels: 2.5D input for a 2D network.

    Why it exists: a 2D network sees one slice, but perfusion-map noise is independent from slice to slice
    while the hypoperfused territory is smooth across slices, so the neighbours are further observations
    of the same tissue. MONAI has no transform that turns slice context into channels.

    Input: channel-first (C, H, W, D). Output: float32 (C * (2n + 1), H, W, D) with n = ``neighbours``:
    channel block k holds the slice at offset k - n (offsets -n .. n; block n is the input itself), the slab's
    first and last slices repeated beyond its ends (a 1-slice slab gets n copies of itself on each side).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, neighbours: int = 1) -> None:
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise ValueError(f"AdjacentSlices needs neighbours >= 1 (slices on each side), got {neighbours!r}")
        self.neighbours = neighbours

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if x.ndim != 4:
            raise ValueError(f"AdjacentSlices expects a channel-first (C, H, W, D) volume, got shape {tuple(x.shape)}")
        depth = x.shape[-1]
        slices = torch.arange(depth, device=x.device)
        offsets = range(-self.neighbours, self.neighbours + 1)
        blocks = [x[..., (slices + offset).clamp(0, depth - 1)] for offset in offsets]
        return convert_to_dst_type(torch.cat(blocks), img, dtype=torch.float32)[0]


class AdjacentSlicesd(MapTransform):
    """Dictionary wrapper of :class:`AdjacentSlices`."""

    backend = AdjacentSlices.backend

    def __init__(self, keys: KeysCollection, neighbours: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.adjacent = AdjacentSlices(neighbours)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.adjacent(d[key])
        return d


class LesionMaskd(MapTransform):
    """The (1, H, W, D) lesion mask of channel-first (2, H, W, D) class probabilities: the lesion probability
    above ``threshold`` within the brain stored under ``brain_key`` by :class:`BrainMaskd`
    (:func:`custom.lesions.lesion_from_probabilities`, shared with the MONAI-free runner; 0.5 is the argmax of the
    two classes). The probabilities must be back on the image's grid (after ``Invertd``); a brain of another shape
    is refused. The mask keeps the probabilities' metadata and float dtype, as ``AsDiscreted(argmax=True)`` does.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self, keys: KeysCollection, threshold: float, brain_key: str = "brain", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = check_lesion_threshold(threshold)
        self.brain_key = brain_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.brain_key not in d:
                raise ValueError(
                    f"LesionMaskd needs the brain mask under '{self.brain_key}' (BrainMaskd in the preprocessing)"
                )
            brain = convert_to_numpy(d[self.brain_key])
            mask = lesion_from_probabilities(convert_to_numpy(d[key]), self.threshold, brain)
            d[key] = convert_to_dst_type(mask[None], d[key])[0]
        return d


class RemoveSmallLesionsd(MapTransform):
    """Set the predicted lesions under ``min_volume_ml`` mL to 0 in a channel-first (1, H, W, D) mask
    (:func:`custom.lesions.remove_small_lesions`, shared with the MONAI-free runner).

    The voxel volume comes from the mask's affine (a MetaTensor, as ``Invertd`` and ``LoadImage`` give it), the
    input's; ``min_volume_ml`` 0 keeps every lesion.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: KeysCollection, min_volume_ml: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_volume_ml = check_min_volume(min_volume_ml)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if not isinstance(mask, MetaTensor) or mask.ndim != 4 or mask.shape[0] != 1:
                raise ValueError(
                    f"RemoveSmallLesionsd expects '{key}' as a (1, H, W, D) MetaTensor with its affine, got "
                    f"{type(mask).__name__} of shape {tuple(mask.shape)}"
                )
            kept = remove_small_lesions(convert_to_numpy(mask[0]), convert_to_numpy(mask.affine), self.min_volume_ml)
            d[key] = convert_to_dst_type(kept[None], mask)[0]
        return d
