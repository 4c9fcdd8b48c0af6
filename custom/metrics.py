"""Per-case lesion metrics in physical units (ISLES 2018 set plus lesion-wise F1) and their Ignite-ready wrapper.

Overlap and surface metrics come from MONAI (``compute_dice``, ``get_confusion_matrix``,
``compute_hausdorff_distance``, ``compute_average_surface_distance``); this module adds what MONAI lacks:
volumes in mL, lesion-wise detection F1, one explicit convention for empty masks, surface distances on a sheared
grid (MONAI's take one spacing per axis, so axes that are not perpendicular are measured as if they were), and a
cumulative metric that reads each case's affine from its MetaTensor. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import (
    CumulativeIterationMetric,
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    get_confusion_matrix,
)
from monai.metrics.utils import get_mask_edges
from monai.utils import convert_to_numpy, convert_to_tensor
from scipy import ndimage
from scipy.spatial import cKDTree

from custom.clinical import voxel_volume_ml
from custom.lesions import LESION_CONNECTIVITY

METRIC_NAMES = (
    "dice",
    "hd95_mm",
    "assd_mm",
    "precision",
    "recall",
    "avd_ml",
    "pred_ml",
    "label_ml",
    "lesion_f1",
)

# Which direction is better, for paired comparisons; pred_ml and label_ml are descriptive and have none.
HIGHER_IS_BETTER = {
    "dice": True,
    "precision": True,
    "recall": True,
    "lesion_f1": True,
    "hd95_mm": False,
    "assd_mm": False,
    "avd_ml": False,
}

NAN = float("nan")

# Grid axes whose directions have a cosine below this are perpendicular: a rotated affine stored as float32 (NIfTI's
# sform) stays under 1e-7, while a gantry tilt of 1 degree is 0.017. Ignoring a shear this small changes a distance
# by a relative 1e-6 at most.
ORTHOGONALITY_TOLERANCE = 1e-6

# The single place where empty masks are handled, keyed by (prediction empty, label empty). Follows the ISLES'22
# scoring code (Dice and lesion F1 are 1 when both masks are empty); a ratio whose denominator is zero is undefined
# (NaN), and so is a surface distance to a surface that does not exist. Volumes are always defined.
EMPTY_MASK_CONVENTION = {
    (True, True): {"dice": 1.0, "precision": 1.0, "recall": 1.0, "lesion_f1": 1.0, "hd95_mm": 0.0, "assd_mm": 0.0},
    (False, True): {"dice": 0.0, "precision": 0.0, "recall": NAN, "lesion_f1": 0.0, "hd95_mm": NAN, "assd_mm": NAN},
    (True, False): {"dice": 0.0, "precision": NAN, "recall": 0.0, "lesion_f1": 0.0, "hd95_mm": NAN, "assd_mm": NAN},
}


def _binary_mask(mask, argument: str) -> torch.Tensor:
    """Return ``mask`` as a CPU bool tensor after checking it is a 3D array of 0/1 values."""
    tensor = convert_to_tensor(mask, device="cpu", track_meta=False)
    if tensor.ndim != 3:
        raise ValueError(f"{argument} must be a 3D (H, W, D) mask, got shape {tuple(tensor.shape)}.")
    if not bool(((tensor == 0) | (tensor == 1)).all()):
        raise ValueError(f"{argument} must be binary (values 0 and 1 only); threshold or argmax it first.")
    return tensor.bool()


def _checked_spacing(spacing) -> tuple[float, float, float]:
    """Return ``spacing`` as three positive floats (mm per axis), or raise naming the bad value."""
    values = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    if len(values) != 3 or not all(s > 0 and math.isfinite(s) for s in values):
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}.")
    return values


def _checked_affine(affine) -> np.ndarray:
    """The 3 x 3 voxel-to-mm part of ``affine`` (4 x 4 or 3 x 3, numpy or torch) as float64, or raise naming it."""
    matrix = convert_to_numpy(affine, dtype=np.float64, wrap_sequence=True)
    if matrix.shape not in ((3, 3), (4, 4)) or not np.isfinite(matrix).all() or voxel_volume_ml(matrix) == 0:
        raise ValueError(
            f"affine must be the masks' 4 x 4 (or 3 x 3) voxel-to-mm matrix, finite with a non-zero voxel volume, "
            f"got {affine!r}."
        )
    return matrix[:3, :3]


def is_orthogonal(matrix: np.ndarray) -> bool:
    """Whether the axes of the 3 x 3 voxel-to-mm ``matrix`` are perpendicular (axis-aligned, rotated or flipped),
    within ``ORTHOGONALITY_TOLERANCE``; a sheared grid (CT with gantry tilt stored uncorrected) is not."""
    directions = matrix / np.linalg.norm(matrix, axis=0)
    return bool(np.abs(directions.T @ directions - np.eye(3)).max() <= ORTHOGONALITY_TOLERANCE)


def surface_distances(y_pred: torch.Tensor, y: torch.Tensor, matrix: np.ndarray, names: Sequence[str]) -> dict:
    """``hd95_mm`` and ``assd_mm`` (those in ``names``) of two non-empty (1, 1, H, W, D) masks on the grid ``matrix``.

    On an orthogonal grid these are MONAI's functions with the lengths of the axes as spacing, unchanged. A sheared
    grid has no such spacing: MONAI's distance transform would measure along slanted axes as if they were
    perpendicular. There the boundary voxels MONAI's functions use (``get_mask_edges``) are mapped through the
    matrix to mm and paired with their nearest neighbour on the other boundary (scipy's ``cKDTree``), then reduced
    as MONAI does: the larger of the two directed 95th percentiles, and the mean of both directed sets.
    """
    if not {"hd95_mm", "assd_mm"} & set(names):
        return {}
    values = {}
    if is_orthogonal(matrix):
        # The columns' lengths, computed as nibabel's voxel_sizes (the spacing score-masks and baseline passed).
        spacing = tuple(float(s) for s in np.sqrt(np.sum(matrix * matrix, axis=0)))
        with warnings.catch_warnings():
            # MONAI 1.6 passes its own deprecated `always_return_as_numpy` argument internally; nothing to act on.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            if "hd95_mm" in names:
                values["hd95_mm"] = compute_hausdorff_distance(
                    y_pred, y, include_background=True, percentile=95, spacing=spacing
                ).item()
            if "assd_mm" in names:
                values["assd_mm"] = compute_average_surface_distance(
                    y_pred, y, include_background=True, symmetric=True, spacing=spacing
                ).item()
        return values
    edges = get_mask_edges(y_pred[0, 0].bool().numpy(), y[0, 0].bool().numpy())
    points = [np.argwhere(edge) @ matrix.T for edge in edges]  # voxel centres in mm (the crop's offset cancels)
    directed = [torch.from_numpy(cKDTree(points[1 - i]).query(points[i])[0]) for i in (0, 1)]
    values["hd95_mm"] = max(torch.quantile(d, 0.95).item() for d in directed)
    values["assd_mm"] = torch.cat(directed).mean().item()
    return {name: values[name] for name in ("hd95_mm", "assd_mm") if name in names}


def lesion_f1(pred: np.ndarray, label: np.ndarray) -> float:
    """Lesion-wise detection F1 of two non-empty boolean volumes (lesions = 26-connected components).

    A label lesion is detected (true positive) when any predicted voxel overlaps it, otherwise it is a false
    negative; a predicted component overlapping no label voxel is a false positive. F1 = 2TP / (2TP + FP + FN).
    """
    label_components, num_label = ndimage.label(label, structure=LESION_CONNECTIVITY)
    pred_components, num_pred = ndimage.label(pred, structure=LESION_CONNECTIVITY)
    detected = np.count_nonzero(np.unique(label_components[pred]))
    true_pred = np.count_nonzero(np.unique(pred_components[label]))
    false_negatives = num_label - detected
    false_positives = num_pred - true_pred
    return float(2.0 * detected / (2.0 * detected + false_positives + false_negatives))


def case_metrics(pred, label, affine, names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Metrics of one case: binary (H, W, D) ``pred`` and ``label`` (numpy or torch) on the grid ``affine``.

    ``affine`` is the masks' 4 x 4 voxel-to-mm matrix (NIfTI's, a MetaTensor's; its 3 x 3 part will do): the voxel
    volume is ``custom.clinical.voxel_volume_ml`` of it, as in the inference table, and surface distances follow its
    axes, sheared ones included (``surface_distances``). Returns the requested ``names`` (default: all of
    ``METRIC_NAMES``) as floats. Distances are in mm between boundary voxel centres, volumes in mL. Empty masks
    follow ``EMPTY_MASK_CONVENTION``; only the surface distances and lesion F1 that are asked for are computed,
    since they are the expensive ones.
    """
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; available: {list(METRIC_NAMES)}.")
    pred_mask, label_mask = _binary_mask(pred, "pred"), _binary_mask(label, "label")
    if pred_mask.shape != label_mask.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(pred_mask.shape)} vs {tuple(label_mask.shape)}.")
    matrix = _checked_affine(affine)

    voxel_ml = voxel_volume_ml(matrix)
    pred_voxels, label_voxels = int(pred_mask.sum()), int(label_mask.sum())
    pred_ml, label_ml = pred_voxels * voxel_ml, label_voxels * voxel_ml
    values = {"pred_ml": pred_ml, "label_ml": label_ml, "avd_ml": abs(pred_ml - label_ml)}

    pred_empty, label_empty = pred_voxels == 0, label_voxels == 0
    if pred_empty or label_empty:
        values.update(EMPTY_MASK_CONVENTION[(pred_empty, label_empty)])
        return {name: values[name] for name in names}

    # MONAI's functions take batch-first, channel-first one-hot tensors: (1 case, 1 lesion channel, H, W, D).
    y_pred, y = pred_mask[None, None].float(), label_mask[None, None].float()
    values["dice"] = compute_dice(y_pred, y, include_background=True, ignore_empty=False).item()
    confusion = get_confusion_matrix(y_pred, y, include_background=True)
    values["precision"] = compute_confusion_matrix_metric("precision", confusion).item()
    values["recall"] = compute_confusion_matrix_metric("recall", confusion).item()
    values.update(surface_distances(y_pred, y, matrix, names))
    if "lesion_f1" in names:
        values["lesion_f1"] = lesion_f1(pred_mask.numpy(), label_mask.numpy())
    return {name: values[name] for name in names}


def _lesion_mask(item: torch.Tensor, argument: str) -> torch.Tensor:
    """The (H, W, D) lesion mask of one channel-first item: channel 1 of a one-hot (2, ...) item, or the only
    channel of a (1, ...) binary mask."""
    if item.ndim != 4 or item.shape[0] not in (1, 2):
        raise ValueError(
            f"CaseMetric expects each {argument} item as (2, H, W, D) one-hot or (1, H, W, D) mask, "
            f"got shape {tuple(item.shape)}."
        )
    return item[item.shape[0] - 1]


class CaseMetric(CumulativeIterationMetric):
    """One metric of ``case_metrics`` per case, accumulated over an evaluation for Ignite/bundle evaluators.

    MONAI's own metric classes take one spacing for the whole call; this class reads each case's affine from its
    MetaTensor (the label's, else the prediction's), so cases with different slice thickness, or a sheared grid,
    are each measured in mm. Items are channel-first (2, H, W, D) one-hot or (1, H, W, D) masks, as a list
    or as a batch-first tensor. The buffer holds one value per case, shape (num_cases, 1), which is what
    ``IgniteMetricHandler(save_details=True)`` hands to ``MetricsSaver``.

    Args:
        name: one of ``METRIC_NAMES``, e.g. ``"hd95_mm"``.
        reduction: ``"mean"`` or ``"median"`` over the cases, ignoring NaN (see the empty-mask convention);
            NaN when every case is NaN.
        spacing: fixed voxel size in mm for all cases, an axis-aligned grid; when given it overrides the affines,
            and it is required when the items are plain tensors without an affine.
    """

    # nanquantile(0.5) averages the two middle values of an even count, as numpy's median does in reporting.py.
    REDUCTIONS = {"mean": torch.nanmean, "median": lambda values: torch.nanquantile(values, 0.5)}

    def __init__(self, name: str, reduction: str = "mean", spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        if name not in METRIC_NAMES:
            raise ValueError(f"CaseMetric name must be one of {list(METRIC_NAMES)}, got {name!r}.")
        if reduction not in self.REDUCTIONS:
            raise ValueError(f"CaseMetric reduction must be one of {list(self.REDUCTIONS)}, got {reduction!r}.")
        self.name = name
        self.reduction = reduction
        self.affine = None if spacing is None else np.diag([*_checked_spacing(spacing), 1.0])

    def _case_affine(self, pred_item: torch.Tensor, label_item: torch.Tensor):
        """The grid of one case: the fixed spacing if given, else the label's affine, else the prediction's."""
        if self.affine is not None:
            return self.affine
        for item in (label_item, pred_item):
            if isinstance(item, MetaTensor):
                return item.affine
        raise ValueError(
            f"CaseMetric({self.name!r}) needs each case's affine: pass pred/label as MetaTensors carrying "
            "one (e.g. loaded with LoadImaged) or give CaseMetric(spacing=...)."
        )

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Metric of each case of a batch-first (B, C, H, W, D) batch, as a (B, 1) float64 tensor."""
        if y is None:
            raise ValueError(f"CaseMetric({self.name!r}) needs the label (y) as well as the prediction.")
        values = []
        for pred_item, label_item in zip(y_pred, y):
            affine = self._case_affine(pred_item, label_item)
            metrics = case_metrics(
                _lesion_mask(pred_item, "pred"), _lesion_mask(label_item, "label"), affine, names=(self.name,)
            )
            values.append([metrics[self.name]])
        return torch.tensor(values, dtype=torch.float64)

    def aggregate(self) -> torch.Tensor:
        """NaN-ignoring mean or median over all accumulated cases, as a 0-d float64 tensor."""
        buffer = self.get_buffer()
        if buffer is None:
            raise RuntimeError(f"CaseMetric({self.name!r}) has no cases to aggregate; call it on data first.")
        return self.REDUCTIONS[self.reduction](buffer.reshape(-1))
