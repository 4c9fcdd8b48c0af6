"""From class probabilities to the lesion mask: the post-processing of the bundle and of the runner.

Why it exists: the mask is the lesion probability above ``lesion_threshold`` (MONAI's ``AsDiscrete`` thresholds
every channel alike) within the brain (a lesion outside it is impossible, yet an undertrained network predicts
one over the background), then without the lesions under ``min_lesion_ml`` (MONAI's ``RemoveSmallObjects`` needs
scikit-image, which the bundle does not depend on, and passes it a deprecated ``min_size`` argument). The
MONAI-free runner (``custom/deploy.py``) can use neither MONAI transform. These functions, numpy and scipy only,
serve ``inference.json``, ``evaluate.json`` and the runner alike, so their masks agree voxel for voxel.
"""

import numpy as np
from scipy import ndimage

from custom.clinical import voxel_volume_ml

# 26-connectivity: voxels sharing a face, an edge or a corner belong to the same lesion.
LESION_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def check_lesion_threshold(threshold) -> float:
    """``threshold`` as a float, or a ValueError naming the setting (``lesion_threshold``) when it is not
    strictly between 0 and 1."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ValueError(f"lesion_threshold must be a number between 0 and 1 (exclusive), got {threshold!r}")
    return float(threshold)


def lesion_from_probabilities(probabilities: np.ndarray, threshold: float, brain: np.ndarray) -> np.ndarray:
    """The uint8 lesion mask of (2, ...) class probabilities (background, lesion): 1 where the lesion probability
    is above ``threshold`` and ``brain`` (the probabilities' spatial shape; ``custom.clinical.brain_mask`` of the
    input maps on the same grid) is true. At 0.5 this is the argmax of the two classes within the brain (up to float
    rounding at exact ties)."""
    threshold = check_lesion_threshold(threshold)
    probabilities, brain = np.asarray(probabilities), np.asarray(brain)
    if probabilities.ndim < 2 or probabilities.shape[0] != 2:
        raise ValueError(f"expected (2, ...) class probabilities (background, lesion), got shape {probabilities.shape}")
    if brain.shape != probabilities.shape[1:]:
        raise ValueError(
            f"the brain mask has shape {brain.shape}, the class probabilities {probabilities.shape}: "
            "the brain must be on the probabilities' grid"
        )
    return ((probabilities[1] > threshold) & (brain != 0)).astype(np.uint8)


def check_min_volume(min_volume_ml) -> float:
    """``min_volume_ml`` as a float, or a ValueError naming the setting (``min_lesion_ml``) when it is not >= 0."""
    if isinstance(min_volume_ml, bool) or not isinstance(min_volume_ml, (int, float)) or not min_volume_ml >= 0:
        raise ValueError(f"min_lesion_ml must be a number >= 0 (mL; 0 keeps every lesion), got {min_volume_ml!r}")
    return float(min_volume_ml)


def remove_small_lesions(mask: np.ndarray, affine, min_volume_ml: float) -> np.ndarray:
    """``mask`` (H, W, D) with every 26-connected lesion under ``min_volume_ml`` mL set to 0 (same dtype).

    ``affine`` is the mask's 4 x 4 voxel-to-world matrix (its voxel volume: ``custom.clinical.voxel_volume_ml``);
    ``min_volume_ml`` 0 keeps every lesion.
    """
    min_volume_ml = check_min_volume(min_volume_ml)
    mask, affine = np.asarray(mask), np.asarray(affine)
    if mask.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected an (H, W, D) mask and a 4 x 4 affine, got shapes {mask.shape} and {affine.shape}")
    if min_volume_ml == 0:
        return mask
    components, count = ndimage.label(mask != 0, structure=LESION_CONNECTIVITY)
    volumes_ml = np.bincount(components.ravel(), minlength=count + 1) * voxel_volume_ml(affine)
    keep = volumes_ml >= min_volume_ml
    keep[0] = False  # background
    return np.where(keep[components], mask, np.zeros_like(mask))
