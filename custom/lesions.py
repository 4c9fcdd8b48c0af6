"""Remove predicted lesions smaller than a volume: the post-processing of the bundle and of the runner.

Why it exists: MONAI's ``RemoveSmallObjects`` needs scikit-image, which the bundle does not depend on (and
whose ``min_size`` argument it passes is deprecated there), and the MONAI-free runner (``custom/deploy.py``)
cannot use it. This one function, numpy and scipy only, serves ``inference.json``, ``evaluate.json`` and
the runner alike, so their masks agree voxel for voxel.
"""

import numpy as np
from scipy import ndimage

# 26-connectivity: voxels sharing a face, an edge or a corner belong to the same lesion.
LESION_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def check_min_volume(min_volume_ml) -> float:
    """``min_volume_ml`` as a float, or a ValueError naming the setting (``min_lesion_ml``) when it is not >= 0."""
    if isinstance(min_volume_ml, bool) or not isinstance(min_volume_ml, (int, float)) or not min_volume_ml >= 0:
        raise ValueError(f"min_lesion_ml must be a number >= 0 (mL; 0 keeps every lesion), got {min_volume_ml!r}")
    return float(min_volume_ml)


def remove_small_lesions(mask: np.ndarray, spacing_mm, min_volume_ml: float) -> np.ndarray:
    """``mask`` (H, W, D) with every 26-connected lesion under ``min_volume_ml`` mL set to 0 (same dtype).

    ``spacing_mm`` holds the voxel sizes of the three axes (``nibabel.affines.voxel_sizes`` of the affine);
    ``min_volume_ml`` 0 keeps every lesion.
    """
    min_volume_ml = check_min_volume(min_volume_ml)
    mask = np.asarray(mask)
    if mask.ndim != 3 or len(spacing_mm) != 3:
        raise ValueError(f"expected an (H, W, D) mask and 3 voxel sizes, got shape {mask.shape} and {spacing_mm!r}")
    if min_volume_ml == 0:
        return mask
    components, count = ndimage.label(mask != 0, structure=LESION_CONNECTIVITY)
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    volumes_ml = np.bincount(components.ravel(), minlength=count + 1) * voxel_ml
    keep = volumes_ml >= min_volume_ml
    keep[0] = False  # background
    return np.where(keep[components], mask, np.zeros_like(mask))
