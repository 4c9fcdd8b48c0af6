"""Per-case lesion metrics in physical units (ISLES 2018 set plus lesion-wise F1) and their Ignite-ready wrapper.

Overlap and surface metrics come from MONAI (``compute_dice``, ``get_confusion_matrix``,
``compute_hausdorff_distance``, ``compute_average_surface_distance``); this module adds what MONAI lacks:
volumes in mL, lesion-wise detection F1, one explicit convention for empty masks, and a cumulative metric
that reads each case's voxel spacing from its MetaTensor affine. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import (
    CumulativeIterationMetric,
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    get_confusion_matrix,
)
from monai.utils import convert_to_tensor
from scipy import ndimage

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


def case_metrics(pred, label, spacing, names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """Metrics of one case: binary (H, W, D) ``pred`` and ``label`` (numpy or torch), ``spacing`` in mm per axis.

    Returns the requested ``names`` (default: all of ``METRIC_NAMES``) as floats. Distances are in mm between
    boundary voxel centres, volumes in mL. Empty masks follow ``EMPTY_MASK_CONVENTION``; only the surface
    distances and lesion F1 that are asked for are computed, since they are the expensive ones.
    """
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; available: {list(METRIC_NAMES)}.")
    pred_mask, label_mask = _binary_mask(pred, "pred"), _binary_mask(label, "label")
    if pred_mask.shape != label_mask.shape:
        raise ValueError(f"pred and label shapes differ: {tuple(pred_mask.shape)} vs {tuple(label_mask.shape)}.")
    spacing = _checked_spacing(spacing)

    voxel_ml = math.prod(spacing) / 1000.0
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
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` argument internally; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        if "hd95_mm" in names:
            values["hd95_mm"] = compute_hausdorff_distance(
                y_pred, y, include_background=True, percentile=95, spacing=spacing
            ).item()
        if "assd_mm" in names:
            values["assd_mm"] = compute_average_surface_distance(
                y_pred, y, include_background=True, symmetric=True, spacing=spacing
            ).item()
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

    MONAI's own metric classes take one spacing for the whole call; this class reads each case's voxel spacing
    from its MetaTensor affine (the label's, else the prediction's), so cases with different slice thickness
    are each measured in mm. Items are channel-first (2, H, W, D) one-hot or (1, H, W, D) masks, as a list
    or as a batch-first tensor. The buffer holds one value per case, shape (num_cases, 1), which is what
    ``IgniteMetricHandler(save_details=True)`` hands to ``MetricsSaver``.

    Args:
        name: one of ``METRIC_NAMES``, e.g. ``"hd95_mm"``.
        reduction: ``"mean"`` or ``"median"`` over the cases, ignoring NaN (see the empty-mask convention);
            NaN when every case is NaN.
        spacing: fixed voxel size in mm for all cases; when given it overrides the affines, and it is required
            when the items are plain tensors without an affine.
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
        self.spacing = None if spacing is None else _checked_spacing(spacing)

    def _case_spacing(self, pred_item: torch.Tensor, label_item: torch.Tensor) -> tuple[float, float, float]:
        """The spacing of one case: the fixed one if given, else from the label's affine, else the prediction's."""
        if self.spacing is not None:
            return self.spacing
        for item in (label_item, pred_item):
            if isinstance(item, MetaTensor):
                return _checked_spacing(affine_to_spacing(item.affine, r=3))
        raise ValueError(
            f"CaseMetric({self.name!r}) needs each case's voxel spacing: pass pred/label as MetaTensors carrying "
            "an affine (e.g. loaded with LoadImaged) or give CaseMetric(spacing=...)."
        )

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Metric of each case of a batch-first (B, C, H, W, D) batch, as a (B, 1) float64 tensor."""
        if y is None:
            raise ValueError(f"CaseMetric({self.name!r}) needs the label (y) as well as the prediction.")
        values = []
        for pred_item, label_item in zip(y_pred, y):
            spacing = self._case_spacing(pred_item, label_item)
            metrics = case_metrics(
                _lesion_mask(pred_item, "pred"), _lesion_mask(label_item, "label"), spacing, names=(self.name,)
            )
            values.append([metrics[self.name]])
        return torch.tensor(values, dtype=torch.float64)

    def aggregate(self) -> torch.Tensor:
        """NaN-ignoring mean or median over all accumulated cases, as a 0-d float64 tensor."""
        buffer = self.get_buffer()
        if buffer is None:
            raise RuntimeError(f"CaseMetric({self.name!r}) has no cases to aggregate; call it on data first.")
        return self.REDUCTIONS[self.reduction](buffer.reshape(-1))
