"""Calibration of the voxel lesion probability (expected calibration error) and the lesion volume it implies.

Why it exists: Dice scores the mask; a probability that is also read as a probability (an ensemble's, a
volume summed over probabilities) must be checked against the labels too. MONAI has no calibration metric.
numpy only. Definitions (docs/metrics.md style):

- Bins: ``bins`` equal-width bins of the lesion probability p over [0, 1]; bin b holds 0 <= b/bins <= p <
  (b+1)/bins, the last bin also holds p = 1.
- ECE = sum over non-empty bins of (n_b / N) * |mean of p in b - fraction of lesion voxels in b|
  = sum_b |sum of p in b - lesion voxels in b| / N, N = the voxels scored (optionally within a mask, e.g. the
  brain). Pooled: bins accumulated over several cases (``calibration_bins`` + ``ece_from_bins``) weigh every
  voxel equally, so large cases count more than small ones.
- Probabilistic lesion volume = sum of p x voxel volume (mL): the expected lesion volume if the probabilities
  were calibrated; the mask volume counts the voxels of the argmax mask (p > 0.5 for two classes).
"""

import math

import numpy as np

DEFAULT_BINS = 10


def _checked(probability, label=None, mask=None):
    p = np.asarray(probability, dtype=np.float64)
    if not np.all(np.isfinite(p)) or (p.size and (p.min() < 0 or p.max() > 1)):
        raise ValueError("probability must hold finite values from 0 to 1")
    arrays = [p]
    for name, other in (("label", label), ("mask", mask)):
        if other is None:
            arrays.append(None)
            continue
        other = np.asarray(other)
        if other.shape != p.shape:
            raise ValueError(f"{name} shape {other.shape} differs from the probability's {p.shape}")
        if not np.all((other == 0) | (other == 1)):
            raise ValueError(f"{name} must be binary (values 0 and 1 only)")
        arrays.append(other.astype(bool))
    return arrays


def calibration_bins(probability, label, bins: int = DEFAULT_BINS, mask=None) -> np.ndarray:
    """Per-bin (voxel count, sum of p, lesion voxel count) of one case, a (bins, 3) float64 array.

    ``probability``: lesion probability per voxel; ``label``: binary ground truth of the same shape; ``mask``:
    optional binary array of the voxels to score (e.g. the brain). Add the arrays of several cases to pool them.
    """
    if int(bins) < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p, y, m = _checked(probability, label, mask)
    if y is None:
        raise ValueError("label is required")
    if m is not None:
        p, y = p[m], y[m]
    index = np.minimum((p * bins).astype(np.int64), bins - 1).ravel()
    counts = np.bincount(index, minlength=bins)
    prob_sums = np.bincount(index, weights=p.ravel(), minlength=bins)
    label_sums = np.bincount(index, weights=y.ravel().astype(np.float64), minlength=bins)
    return np.stack([counts, prob_sums, label_sums], axis=1).astype(np.float64)


def ece_from_bins(table: np.ndarray) -> float:
    """Expected calibration error of a ``calibration_bins`` table (summed over cases to pool them); NaN if empty."""
    table = np.asarray(table, dtype=np.float64)
    total = table[:, 0].sum()
    if total == 0:
        return math.nan
    return float(np.abs(table[:, 1] - table[:, 2]).sum() / total)


def probabilistic_volume_ml(probability, voxel_ml: float) -> float:
    """Lesion volume in mL from the probabilities: sum of p times the voxel volume ``voxel_ml`` (mL, e.g.
    ``custom.clinical.voxel_volume_ml``)."""
    (p, _, _), voxel_ml = _checked(probability), float(voxel_ml)
    if not (voxel_ml > 0 and math.isfinite(voxel_ml)):
        raise ValueError(f"voxel_ml must be a positive voxel volume in mL, got {voxel_ml!r}")
    return float(p.sum() * voxel_ml)
