"""Per-case metrics against hand-computed values, CaseMetric through Ignite and MetricsSaver, and the reporting
aggregations (summarise, summary_markdown, paired_comparison, CSV round trip)."""

import csv
import math
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from monai.handlers import IgniteMetricHandler, MetricsSaver, from_engine
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy import ndimage
from scipy.spatial.distance import cdist

from custom.metrics import EMPTY_MASK_CONVENTION, METRIC_NAMES, CaseMetric, case_metrics, is_orthogonal
from custom.reporting import (
    paired_comparison,
    read_case_csv,
    summarise,
    summary_markdown,
    write_case_csv,
)

# 0.9 mm in plane, 5 mm slices: one voxel is 0.9 * 0.9 * 5 = 4.05 mm^3.
SPACING = (0.9, 0.9, 5.0)
GRID = np.diag([*SPACING, 1.0])  # the axis-aligned affine of that spacing
SHAPE = (32, 32, 8)


def _rotation(degrees: float, axis: int) -> np.ndarray:
    """The 3 x 3 rotation by ``degrees`` about ``axis``."""
    angle, (i, j) = np.deg2rad(degrees), [a for a in range(3) if a != axis]
    rotation = np.eye(3)
    rotation[[i, i, j, j], [i, j, i, j]] = np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    return rotation


def box(x=(10, 20), y=(10, 20), z=(2, 4), shape=SHAPE):
    """A uint8 volume with one axis-aligned box of ones; every voxel of a 2-slice box lies on its surface."""
    volume = np.zeros(shape, dtype=np.uint8)
    volume[x[0] : x[1], y[0] : y[1], z[0] : z[1]] = 1
    return volume


def test_box_shifted_one_slice_along_the_5mm_axis():
    # 10 x 10 x 2 boxes overlapping on one slice: half of each surface lies on the other (0 mm), half one slice
    # away (5 mm). HD95 = 5, ASSD = (100 * 0 + 100 * 5) / 200 = 2.5; 200 voxels = 0.81 mL each.
    values = case_metrics(box(z=(3, 5)), box(), GRID)
    assert set(values) == set(METRIC_NAMES)
    assert values["dice"] == pytest.approx(0.5)
    assert values["precision"] == pytest.approx(0.5)
    assert values["recall"] == pytest.approx(0.5)
    assert values["hd95_mm"] == pytest.approx(5.0)
    assert values["assd_mm"] == pytest.approx(2.5)
    assert values["pred_ml"] == pytest.approx(0.81)
    assert values["label_ml"] == pytest.approx(0.81)
    assert values["avd_ml"] == pytest.approx(0.0)
    assert values["lesion_f1"] == 1.0


def test_box_shifted_two_voxels_along_a_0p9mm_axis():
    # 160 of 200 voxels overlap; the 40 non-overlapping surface voxels per side lie 0.9 mm (20) and 1.8 mm (20)
    # from the other surface: HD95 = 1.8 (per-direction 95th percentile), ASSD = 2 * (20 * 0.9 + 20 * 1.8) / 400.
    values = case_metrics(box(x=(12, 22)), box(), GRID)
    assert values["dice"] == pytest.approx(0.8)
    assert values["precision"] == pytest.approx(0.8)
    assert values["recall"] == pytest.approx(0.8)
    assert values["hd95_mm"] == pytest.approx(1.8)
    assert values["assd_mm"] == pytest.approx(0.27)


def test_spacing_scales_distances_and_volumes_per_axis():
    # The same one-voxel shift costs 5 mm along the slice axis but 0.9 mm in plane.
    along_slices = case_metrics(box(z=(3, 5)), box(), GRID, names=("hd95_mm",))
    in_plane = case_metrics(box(x=(11, 21)), box(), GRID, names=("hd95_mm",))
    assert along_slices["hd95_mm"] == pytest.approx(5.0)
    assert in_plane["hd95_mm"] == pytest.approx(0.9)
    thin_slices = case_metrics(box(), box(), np.diag([0.9, 0.9, 1.0, 1.0]), names=("label_ml",))
    assert thin_slices["label_ml"] == pytest.approx(200 * 0.81 / 1000)


def test_over_segmentation_volume_precision_recall():
    # Prediction has one extra slice: 300 vs 200 voxels, all label voxels found.
    values = case_metrics(box(z=(2, 5)), box(), GRID, names=("dice", "precision", "recall", "avd_ml", "pred_ml"))
    assert values == pytest.approx(
        {"dice": 400 / 500, "precision": 200 / 300, "recall": 1.0, "avd_ml": 100 * 4.05e-3, "pred_ml": 300 * 4.05e-3}
    )


def test_lesion_f1_counts_detected_missed_and_false_lesions():
    label = box(x=(2, 6), y=(2, 6)) | box(x=(20, 24), y=(20, 24))  # two lesions
    pred = box(x=(3, 7), y=(3, 7)) | box(x=(10, 14), y=(26, 30))  # hits the first, plus one false lesion
    # TP = 1, FN = 1, FP = 1: F1 = 2 / (2 + 1 + 1).
    assert case_metrics(pred, label, GRID)["lesion_f1"] == pytest.approx(0.5)


def test_lesion_f1_uses_26_connectivity():
    # Two label voxels touching only at a corner are one lesion, so hitting one of them detects it.
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[5, 5, 2] = label[6, 6, 3] = 1
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[5, 5, 2] = 1
    assert case_metrics(pred, label, GRID)["lesion_f1"] == 1.0


@pytest.mark.parametrize(
    "pred_empty, label_empty",
    [(True, True), (False, True), (True, False)],
    ids=["both_empty", "label_empty", "prediction_empty"],
)
def test_empty_mask_convention_without_warnings(pred_empty, label_empty):
    pred = box() * (not pred_empty)
    label = box() * (not label_empty)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values = case_metrics(pred, label, GRID)
    expected = EMPTY_MASK_CONVENTION[(pred_empty, label_empty)]
    for name, value in expected.items():
        assert (math.isnan(values[name]) and math.isnan(value)) or values[name] == value, name
    assert values["avd_ml"] == pytest.approx(0.0 if pred_empty == label_empty else 0.81)


def test_empty_mask_convention_values():
    both, label_empty, pred_empty = (EMPTY_MASK_CONVENTION[key] for key in [(True, True), (False, True), (True, False)])
    assert both == {"dice": 1, "precision": 1, "recall": 1, "lesion_f1": 1, "hd95_mm": 0, "assd_mm": 0}
    assert label_empty["dice"] == 0 and label_empty["precision"] == 0 and math.isnan(label_empty["recall"])
    assert pred_empty["dice"] == 0 and pred_empty["recall"] == 0 and math.isnan(pred_empty["precision"])
    assert all(math.isnan(convention["hd95_mm"]) for convention in (label_empty, pred_empty))


def test_torch_and_numpy_inputs_agree():
    from_numpy = case_metrics(box(z=(3, 5)), box(), GRID)
    from_torch = case_metrics(torch.from_numpy(box(z=(3, 5))).float(), torch.from_numpy(box()), torch.from_numpy(GRID))
    assert from_torch == pytest.approx(from_numpy)


@pytest.mark.parametrize(
    "pred, label, grid, message",
    [
        (box() * 0.5, box(), GRID, "pred must be binary"),
        (box(), box()[..., 0], GRID, "label must be a 3D"),
        (box(), box(shape=(32, 32, 9)), GRID, "shapes differ"),
        (box(), box(), SPACING, "affine must be the masks' 4 x 4"),
        (box(), box(), np.diag([0.9, 0.0, 5.0, 1.0]), "non-zero voxel volume"),
        (box(), box(), np.diag([0.9, np.nan, 5.0, 1.0]), "finite"),
    ],
)
def test_bad_inputs_are_named(pred, label, grid, message):
    with pytest.raises(ValueError, match=message):
        case_metrics(pred, label, grid)


# A sheared grid (gantry tilt atan(2 / 4) = 26.6 degrees stored uncorrected): 1 mm pixels, 4 mm between slices, each
# slice shifted 2 mm along y. A voxel is 4 mm^3 (|det|); the columns' lengths multiply to 4.47 mm^3.
SHEARED = np.array([[1.0, 0, 0, 0], [0, 1.0, 2.0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1.0]])


def sheared_boxes():
    """(pred, label): 10 x 10 x 2 boxes, the prediction the label moved 4 mm straight up in mm (index (0, -2, +1)).
    Every voxel lies on the surface; in mm each directed set of distances is 80 x 0, 10 x 1, 10 x 2 and 100 x 4 mm:
    HD95 = 4 mm, ASSD = 2 (10 + 20 + 400) / 400 = 2.15 mm; each box is 200 x 4 mm^3 = 0.8 mL."""
    return box(y=(8, 18), z=(3, 5)), box()


def test_sheared_grid_is_measured_in_mm_by_case_metrics_and_case_metric():
    """Before: the spacing (1, 1, 4.47) taken as perpendicular axes gave HD95 4.60 mm, ASSD 2.41 mm, 0.894 mL."""
    pred, label = sheared_boxes()
    expected = {"hd95_mm": 4.0, "assd_mm": 2.15, "pred_ml": 0.8, "label_ml": 0.8, "avd_ml": 0.0, "dice": 0.4}
    assert case_metrics(pred, label, SHEARED, names=tuple(expected)) == pytest.approx(expected)
    pred_item, label_item = (MetaTensor(torch.from_numpy(m)[None].float(), affine=SHEARED) for m in (pred, label))
    case_metric = {name: CaseMetric(name=name)([pred_item], [label_item]).item() for name in expected}
    assert case_metric == pytest.approx(expected)


def blobs(seed: int):
    """(pred, label): two overlapping irregular masks of a (24, 24, 6) grid, with boundary voxels inside them."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(24, 24, 6)), (3, 3, 1))
    return (field > 0.02).astype(np.uint8), (field > -0.02).astype(np.uint8)


def test_sheared_and_rotated_grid_distances_match_brute_force():
    """Boundary voxels (erosion by the 6-neighbour cross, as MONAI) in mm, every pair's distance, nearest neighbour."""
    tilt = SHEARED[:3, :3] * [0.9, 0.9, 1.0]
    linear = _rotation(20, axis=0) @ _rotation(35, axis=2) @ tilt
    pred, label = blobs(0)
    points = [np.argwhere(m & ~ndimage.binary_erosion(m)) @ linear.T for m in (pred.astype(bool), label.astype(bool))]
    pairwise = cdist(points[0], points[1])
    directed = pairwise.min(axis=1), pairwise.min(axis=0)
    values = case_metrics(pred, label, linear, names=("hd95_mm", "assd_mm"))
    assert values["hd95_mm"] == pytest.approx(max(np.percentile(d, 95) for d in directed), rel=1e-12)
    assert values["assd_mm"] == pytest.approx(np.concatenate(directed).mean(), rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI 1.6 internally
@pytest.mark.parametrize("diagonal", [(-0.98, -0.98, 6.0), (0.9, 0.9, 5.0)])  # the phantom's; np.linalg.det is off
def test_orthogonal_grid_gives_monais_values_and_the_spacing_product_to_the_last_digit(diagonal):
    """The values evaluation reported before sheared grids were handled: MONAI's functions with the spacing, volumes
    as voxels times the product of the spacings."""
    spacing = tuple(abs(s) for s in diagonal)
    pred, label = blobs(1)
    values = case_metrics(pred, label, np.diag([*diagonal, 1.0]))
    y_pred, y = (torch.from_numpy(m)[None, None].float() for m in (pred, label))
    assert values["hd95_mm"] == compute_hausdorff_distance(y_pred, y, True, percentile=95, spacing=spacing).item()
    assd = compute_average_surface_distance(y_pred, y, True, symmetric=True, spacing=spacing)
    assert values["assd_mm"] == assd.item()
    voxel_ml = math.prod(spacing) / 1000.0
    assert (values["pred_ml"], values["label_ml"]) == (pred.sum() * voxel_ml, label.sum() * voxel_ml)


@pytest.mark.parametrize(
    "rotation", [_rotation(35, axis=2), _rotation(20, axis=0) @ _rotation(-50, axis=1), np.eye(3)[[2, 0, 1]] * -1],
    ids=["about_z", "oblique", "permuted_flipped"],
)
def test_rotated_orthogonal_grid_gives_the_unrotated_values(rotation):
    pred, label = blobs(2)
    unrotated = case_metrics(pred, label, GRID)
    rotated = np.eye(4)
    rotated[:3, :3], rotated[:3, 3] = rotation @ GRID[:3, :3], [10.0, -20.0, 30.0]
    assert is_orthogonal(rotated[:3, :3])
    assert case_metrics(pred, label, rotated) == pytest.approx(unrotated, rel=1e-6)


def test_a_slight_shear_changes_the_distances_slightly():
    """The nearest-neighbour path of a sheared grid measures as MONAI's distance transform does (same boundary,
    same percentile and mean): a shear just above the tolerance gives the orthogonal grid's values."""
    pred, label = blobs(3)
    slightly_sheared = GRID.copy()
    slightly_sheared[1, 2] = 1e-5 * GRID[2, 2]
    assert not is_orthogonal(slightly_sheared[:3, :3])
    names = ("hd95_mm", "assd_mm")
    assert case_metrics(pred, label, slightly_sheared, names) == pytest.approx(case_metrics(pred, label, GRID, names),
                                                                               rel=1e-4)


def test_unknown_metric_name_is_refused():
    with pytest.raises(ValueError, match="hd99"):
        case_metrics(box(), box(), GRID, names=("hd99",))
    with pytest.raises(ValueError, match="hd99"):
        CaseMetric(name="hd99")
    with pytest.raises(ValueError, match="max"):
        CaseMetric(name="dice", reduction="max")


def affine(spacing):
    return torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))


def one_hot(mask, spacing):
    """(2, H, W, D) one-hot MetaTensor with the spacing on the affine diagonal."""
    lesion = torch.from_numpy(mask).float()
    return MetaTensor(torch.stack([1 - lesion, lesion]), affine=affine(spacing))


def index_mask(mask, spacing):
    """(1, H, W, D) binary MetaTensor."""
    return MetaTensor(torch.from_numpy(mask)[None].float(), affine=affine(spacing))


def evaluation_batches():
    """Two iterations of decollated outputs: the same one-slice shift at 5 mm and at 3 mm slices, then a missed
    lesion (HD95 undefined)."""
    cases = [
        ("case_1", box(z=(3, 5)), box(), (0.9, 0.9, 5.0)),
        ("case_2", box(z=(3, 5)), box(), (0.8, 0.8, 3.0)),
        ("case_3", box() * 0, box(), (0.9, 0.9, 5.0)),
    ]
    items = [
        {
            "image": MetaTensor(
                torch.zeros(1, *SHAPE), affine=affine(spacing), meta={"filename_or_obj": f"{name}.nii.gz"}
            ),
            "pred": one_hot(pred, spacing),
            "label": index_mask(label, spacing),
        }
        for name, pred, label, spacing in cases
    ]
    return [items[:2], items[2:]]


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # MetricsSaver's per-row nanmean of the NaN case
def test_case_metric_through_ignite_and_metrics_saver(tmp_path):
    engine = Engine(lambda engine, batch: batch)
    IgniteMetricHandler(
        metric_fn=CaseMetric(name="hd95_mm", reduction="mean"),
        output_transform=from_engine(["pred", "label"]),
        save_details=True,
    ).attach(engine, "hd95_mm")
    MetricsSaver(
        save_dir=str(tmp_path),
        metrics="*",
        metric_details="*",
        batch_transform=lambda batch: [item["image"].meta for item in batch],
        summary_ops=["mean", "notnans"],
    ).attach(engine)
    engine.run(evaluation_batches(), max_epochs=1)

    # Each case is measured with its own slice thickness; the missed lesion is NaN and left out of the mean.
    assert engine.state.metrics["hd95_mm"] == pytest.approx(4.0)
    details = engine.state.metric_details["hd95_mm"]
    assert details.shape == (3, 1)
    assert details[:2, 0].tolist() == pytest.approx([5.0, 3.0]) and math.isnan(details[2, 0])

    with open(tmp_path / "hd95_mm_raw.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0][0] == "filename"
    assert [row[0] for row in rows[1:]] == ["case_1.nii.gz", "case_2.nii.gz", "case_3.nii.gz"]
    assert [row[1] for row in rows[1:]] == ["5.0000", "3.0000", "nan"]
    assert (tmp_path / "metrics.csv").read_text().strip() == "hd95_mm,4.0"
    summary = (tmp_path / "hd95_mm_summary.csv").read_text()
    assert "class0,4.0000,2.0000" in summary


def test_case_metric_on_collated_batch_uses_each_affine():
    batch = list_data_collate(
        [
            {"pred": one_hot(box(z=(3, 5)), (0.9, 0.9, 5.0)), "label": one_hot(box(), (0.9, 0.9, 5.0))},
            {"pred": one_hot(box(z=(3, 5)), (1.0, 1.0, 2.0)), "label": one_hot(box(), (1.0, 1.0, 2.0))},
        ]
    )
    metric = CaseMetric(name="label_ml", reduction="median")
    values = metric(batch["pred"], batch["label"])
    assert values[:, 0].tolist() == pytest.approx([200 * 4.05e-3, 200 * 2.0e-3])
    assert metric.aggregate().item() == pytest.approx((0.81 + 0.4) / 2)


def test_case_metric_spacing_from_prediction_or_argument():
    pred, label = one_hot(box(z=(3, 5)), (0.9, 0.9, 4.0)), torch.from_numpy(box())[None].float()
    assert CaseMetric(name="hd95_mm")([pred], [label]).item() == pytest.approx(4.0)
    plain_pred = pred.as_tensor()
    with pytest.raises(ValueError, match="spacing"):
        CaseMetric(name="hd95_mm")([plain_pred], [label])
    assert CaseMetric(name="hd95_mm", spacing=(1, 1, 2))([plain_pred], [label]).item() == pytest.approx(2.0)


def test_case_metric_rejects_other_layouts_and_empty_aggregation():
    metric = CaseMetric(name="dice", spacing=SPACING)
    with pytest.raises(ValueError, match=r"\(2, H, W, D\) one-hot"):
        metric([torch.zeros(3, *SHAPE)], [torch.zeros(3, *SHAPE)])
    with pytest.raises(RuntimeError, match="no cases"):
        CaseMetric(name="dice").aggregate()


NAN = float("nan")
ROWS = [
    {"case": "case_1", "fold": 0, "dice": 0.2, "hd95_mm": 10.0},
    {"case": "case_2", "fold": 0, "dice": 0.4, "hd95_mm": NAN},
    {"case": "case_3", "fold": 1, "dice": 0.9, "hd95_mm": 2.0},
]


def test_summarise_per_fold_and_overall():
    summary = summarise(ROWS, ["dice", "hd95_mm"])
    assert [row["fold"] for row in summary] == [0, 1, "all"]
    fold_0, fold_1, overall = summary
    assert fold_0["cases"] == 2
    assert fold_0["dice_mean"] == pytest.approx(0.3)
    assert fold_0["dice_std"] == pytest.approx(0.1)
    assert fold_0["dice_median"] == pytest.approx(0.3)
    assert fold_0["hd95_mm_n"] == 1 and fold_0["hd95_mm_mean"] == 10.0
    assert fold_1["dice_n"] == 1 and fold_1["dice_std"] == 0.0
    assert overall["cases"] == 3 and overall["dice_mean"] == pytest.approx(0.5) and overall["dice_median"] == 0.4
    assert overall["hd95_mm_n"] == 2 and overall["hd95_mm_median"] == pytest.approx(6.0)


def test_summarise_sorts_folds_read_as_strings_and_names_missing_columns():
    rows = [{"case": f"case_{fold}", "fold": str(fold), "dice": "0.5"} for fold in (10, 2)]
    assert [row["fold"] for row in summarise(rows, ["dice"])] == ["2", "10", "all"]
    with pytest.raises(ValueError, match="'case_2'.*'recall'"):
        summarise(rows, ["recall"])
    with pytest.raises(ValueError, match="'centre'"):
        summarise(rows, ["dice"], group_key="centre")


def test_summary_markdown_shows_mean_std_median_and_defined_count():
    table = summary_markdown(summarise(ROWS, ["dice", "hd95_mm"]), ["dice", "hd95_mm"])
    lines = table.strip().splitlines()
    assert lines[0] == "| fold | cases | dice | hd95_mm |"
    assert lines[2] == "| 0 | 2 | 0.300 ± 0.100 (0.300) | 10.000 ± 0.000 (10.000), n=1 |"
    assert lines[-1].startswith("| all | 3 | 0.500 ± ")


def test_paired_comparison_counts_by_metric_direction():
    better = [dict(row) for row in ROWS]
    better[0].update(dice=0.3, hd95_mm=8.0)  # improved on both
    better[1].update(dice=0.4)  # equal dice, HD95 still NaN
    better[2].update(dice=0.8, hd95_mm=3.0)  # worse on both
    dice = paired_comparison(ROWS, better, "dice")
    assert dice["cases"] == 3 and dice["excluded_nan"] == 0
    assert (dice["improved"], dice["worse"], dice["equal"]) == (1, 1, 1)
    assert dice["mean_difference"] == pytest.approx(0.0)
    hd95 = paired_comparison(ROWS, better, "hd95_mm")
    assert hd95["cases"] == 2 and hd95["excluded_nan"] == 1
    assert (hd95["improved"], hd95["worse"], hd95["equal"]) == (1, 1, 0)
    assert hd95["mean_difference"] == pytest.approx(-0.5) and hd95["std_difference"] == pytest.approx(1.5)


def test_paired_comparison_of_cv_values_with_the_same_full_precision_values_is_equal(tmp_path):
    from monai.handlers.utils import write_metrics_reports

    from custom.crossval import read_raw_metric

    # cv reads MetricsSaver's 4-decimal CSV, score-masks and accuracy-bench keep full precision: the same masks
    # scored both ways were counted as improved on some cases and worse on others
    full = [{"case": f"case_{i}", "dice": dice} for i, dice in enumerate((0.043934006, 0.094466939, 0.10880302))]
    details = torch.tensor([[row["dice"]] for row in full], dtype=torch.float64)
    write_metrics_reports(tmp_path, [row["case"] for row in full], None, {"dice": details}, None)
    saved = [{"case": case, "dice": value} for case, value in read_raw_metric(tmp_path / "dice_raw.csv")]
    assert [row["dice"] for row in saved] != [row["dice"] for row in full]
    comparison = paired_comparison(saved, full, "dice")
    assert (comparison["improved"], comparison["worse"], comparison["equal"]) == (0, 0, 3)
    assert comparison["mean_difference"] == 0.0


def test_paired_comparison_refuses_mismatched_runs():
    with pytest.raises(ValueError, match=r"only in rows_a \['case_3'\]"):
        paired_comparison(ROWS, ROWS[:2], "dice")
    with pytest.raises(ValueError, match="direction"):
        paired_comparison(ROWS, ROWS, "pred_ml")
    with pytest.raises(ValueError, match="two rows"):
        paired_comparison(ROWS + ROWS[:1], ROWS, "dice")


def test_csv_round_trip_feeds_summaries_and_comparisons(tmp_path):
    write_case_csv(ROWS, tmp_path / "runs" / "cases.csv")
    rows = read_case_csv(tmp_path / "runs" / "cases.csv")
    assert [row["case"] for row in rows] == ["case_1", "case_2", "case_3"]
    assert rows[1]["hd95_mm"] == "nan"
    assert summarise(rows, ["hd95_mm"])[-1]["hd95_mm_mean"] == pytest.approx(6.0)
    assert paired_comparison(rows, ROWS, "dice")["equal"] == 3
    write_case_csv(summarise(rows, ["dice"]), tmp_path / "summary.csv")
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "fold,cases,dice_mean,dice_std,dice_median,dice_n"
    assert not [path for path in tmp_path.rglob(".tmp-*")]
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_case_csv(tmp_path / "missing.csv")
