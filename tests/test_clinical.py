"""The clinical columns of lesion_volumes.csv, hand-computed on a synthetic case with known voxel counts."""

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.clinical import (
    RESEARCH_USE_ONLY,
    VOLUME_COLUMNS,
    case_volumes,
    describe,
    voxel_volume_ml,
    write_volume_table,
)
from custom.handlers import LesionVolumeWriter

SHAPE = (20, 24, 3)
AFFINE = np.diag([2.0, 1.5, 4.0, 1.0])  # 12 mm^3 = 0.012 mL per voxel
VOXEL_ML = 0.012
CORE_VOXELS = 6  # CBF 10 < 0.3 x 50, Tmax 10 s
PENUMBRA_VOXELS = 8  # CBF 30 (not below 15), Tmax 8 s
HYPOPERFUSION_VOXELS = CORE_VOXELS + PENUMBRA_VOXELS


def synthetic_case() -> np.ndarray:
    """(20, 24, 3, 5) maps CT, CBF, CBV, MTT, Tmax. CT is 40 everywhere (also outside the brain, so a brain taken
    from CT would be wrong); the perfusion maps are zero outside a 16 x 20 x 3 brain. Inside it: healthy tissue
    (CBF 50, Tmax 2 s: the reference), a 3 x 2 x 1 core block (CBF 10, Tmax 10 s), a 2 x 2 x 2 penumbra block
    (CBF 30, Tmax 8 s), one low-flow voxel that is not delayed (CBF 5, Tmax 5 s) and one voxel at exactly
    Tmax 6 s with CBF 5 (not above the threshold: neither hypoperfused nor core). Hypoperfused: 6 + 8 voxels,
    0.168 mL; core: 6 voxels, 0.072 mL; the reference CBF is 50 (every other brain voxel)."""
    volume = np.zeros((*SHAPE, 5), dtype=np.float32)
    volume[..., 0] = 40.0
    volume[2:18, 2:22, :, 1:] = [50.0, 4.0, 5.0, 2.0]
    volume[4:7, 4:6, 1, 1], volume[4:7, 4:6, 1, 4] = 10.0, 10.0  # core: 6 voxels
    volume[10:12, 10:12, 0:2, 1], volume[10:12, 10:12, 0:2, 4] = 30.0, 8.0  # penumbra: 8 voxels
    volume[15, 15, 2, 1], volume[15, 15, 2, 4] = 5.0, 5.0  # low flow, not delayed
    volume[15, 17, 2, 1], volume[15, 17, 2, 4] = 5.0, 6.0  # exactly 6 s: not > 6
    return volume


def lesion_mask(voxels: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask.reshape(-1)[:voxels] = 1  # anywhere: the volumes do not depend on where the lesion is
    return mask


# (lesion voxels, expected lesion_ml, mismatch_ml, mismatch_ratio)
CASES = [
    (4, 4 * VOXEL_ML, 10 * VOXEL_ML, 3.5),
    (20, 20 * VOXEL_ML, -6 * VOXEL_ML, 0.7),  # the predicted lesion is larger than the hypoperfusion
    (0, 0.0, HYPOPERFUSION_VOXELS * VOXEL_ML, math.inf),  # zero core: infinite ratio
]


@pytest.mark.parametrize("lesion_voxels, lesion_ml, mismatch_ml, mismatch_ratio", CASES)
def test_volumes_match_hand_computed_values(lesion_voxels, lesion_ml, mismatch_ml, mismatch_ratio):
    row = case_volumes(synthetic_case(), lesion_mask(lesion_voxels), AFFINE)
    assert row == {
        "lesion_voxels": lesion_voxels,
        "lesion_ml": pytest.approx(lesion_ml, abs=1e-12),
        "hypoperfusion_ml": pytest.approx(0.168, abs=1e-12),
        "core_rule_ml": pytest.approx(0.072, abs=1e-12),
        "mismatch_ml": pytest.approx(mismatch_ml, abs=1e-12),
        "mismatch_ratio": mismatch_ratio,
        "intended_use": "research use only, not for diagnosis or treatment decisions",
    }


def test_no_hypoperfusion_and_no_lesion_leave_the_ratio_undefined():
    volume = synthetic_case()
    volume[..., 4][volume[..., 4] > 4] = 3.0  # nothing delayed
    row = case_volumes(volume, lesion_mask(0), AFFINE)
    assert (row["hypoperfusion_ml"], row["core_rule_ml"], row["mismatch_ml"]) == (0.0, 0.0, 0.0)
    assert row["mismatch_ratio"] is None
    assert "ratio undefined" in describe({"case": "a", **row})


@pytest.mark.parametrize("ratio", [133.3333, 1.0, 3.5, math.inf])
def test_the_log_line_gives_the_ratio_of_the_table(tmp_path, ratio):
    """The log line printed the ratio with 6 significant digits: 133.333 where the table says 133.3333 (80 mL with
    Tmax > 6 s over a 0.6 mL predicted lesion), 1 where it says 1.0."""
    row = {"case": "a", "lesion_voxels": 6, "lesion_ml": 0.6, "hypoperfusion_ml": 80.0, "core_rule_ml": 0.1,
           "mismatch_ml": 79.4, "mismatch_ratio": ratio, "intended_use": RESEARCH_USE_ONLY}  # fmt: skip
    write_volume_table([row], tmp_path / "table.csv")
    with open(tmp_path / "table.csv", newline="") as f:
        cell = next(csv.DictReader(f))["mismatch_ratio"]
    assert f"ratio {cell} (" in describe(row)


def test_mask_on_another_grid_is_refused():
    with pytest.raises(ValueError, match=r"lesion mask shape \(20, 24, 2\) differs"):
        case_volumes(synthetic_case(), np.zeros((20, 24, 2)), AFFINE)


def test_table_keeps_the_old_columns_first_and_writes_inf_and_empty_cells(tmp_path):
    rows = [
        {"case": "a", "image": "a.nii.gz", **case_volumes(synthetic_case(), lesion_mask(0), AFFINE)},
        {"case": "b", "image": "b.nii.gz", **case_volumes(synthetic_case(), lesion_mask(4), AFFINE)},
    ]
    rows.append({**rows[0], "case": "c", "mismatch_ratio": None})
    write_volume_table(rows, tmp_path / "lesion_volumes.csv")
    with open(tmp_path / "lesion_volumes.csv", newline="") as f:
        header, *table = list(csv.reader(f))
    assert header[:4] == ["case", "image", "lesion_voxels", "lesion_ml"] and tuple(header) == VOLUME_COLUMNS
    assert header[4:] == ["hypoperfusion_ml", "core_rule_ml", "mismatch_ml", "mismatch_ratio", "intended_use"]
    ratios = [row[header.index("mismatch_ratio")] for row in table]
    assert ratios == ["inf", "3.5", ""] and float(ratios[0]) == math.inf
    assert {row[-1] for row in table} == {RESEARCH_USE_ONLY}


class _Engine:
    """The parts of an Ignite engine the writer reads."""

    def __init__(self, output):
        self.state = type("State", (), {"output": output})()
        self.logger = logging.getLogger("test_clinical.engine")


def test_bundle_handler_reads_the_raw_maps_of_the_image_file(tmp_path, caplog):
    image = tmp_path / "synthetic.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_case(), AFFINE), image)
    pred = MetaTensor(torch.from_numpy(lesion_mask(4)[None].astype(np.float32)), affine=torch.from_numpy(AFFINE))
    pred.meta["filename_or_obj"] = str(image)
    writer = LesionVolumeWriter(str(tmp_path / "out" / "lesion_volumes.csv"))
    engine = _Engine([{"pred": pred}])
    writer._reset(engine)
    with caplog.at_level(logging.INFO, logger="test_clinical.engine"):
        writer._collect(engine)
    writer._write(engine)
    with open(tmp_path / "out" / "lesion_volumes.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row == {
        "case": "synthetic",
        "image": str(image),
        "lesion_voxels": "4",
        "lesion_ml": "0.048",
        "hypoperfusion_ml": "0.168",
        "core_rule_ml": "0.072",
        "mismatch_ml": "0.12",
        "mismatch_ratio": "3.5",
        "intended_use": RESEARCH_USE_ONLY,
    }
    assert RESEARCH_USE_ONLY in caplog.text and "synthetic: 4 lesion voxels, 0.048 mL" in caplog.text


def test_bundle_handler_needs_the_image_file():
    pred = MetaTensor(torch.zeros((1, *SHAPE)), affine=torch.from_numpy(AFFINE))
    with pytest.raises(ValueError, match="filename_or_obj"):
        LesionVolumeWriter("unused.csv")._collect(_Engine([{"pred": pred}]))


def test_table_is_utf8_whatever_the_locale(tmp_path):
    """A case name outside ASCII is written as UTF-8 even under an ASCII locale (before: UnicodeEncodeError after
    every mask was written, and no table)."""
    table = tmp_path / "lesion_volumes.csv"
    script = (
        "import sys; from custom.clinical import VOLUME_COLUMNS, write_volume_table; "
        "write_volume_table([dict.fromkeys(VOLUME_COLUMNS, 'M\\u00fcller \\u75c5\\u4f8b')], sys.argv[1])"
    )  # escaped: the command line itself is decoded as ASCII there
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script, str(table)], check=True, env=env, cwd=root)
    with open(table, newline="", encoding="utf-8") as f:
        (row,) = list(csv.DictReader(f))
    assert row["case"] == row["image"] == "Müller 病例"


def _rotation(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


@pytest.mark.parametrize(
    "linear",
    [
        _rotation(35) @ AFFINE[:3, :3],  # oblique
        np.diag([-2.0, 1.5, 4.0]),  # negative determinant (radiological order)
        AFFINE[:3, :3] + [[0, 0, 0], [0, 0, 4.0 * np.tan(np.deg2rad(25))], [0, 0, 0]],  # gantry tilt of 25 degrees
    ],
    ids=["rotated", "flipped", "sheared"],
)
def test_volumes_on_rotated_flipped_and_sheared_grids_are_the_voxel_volume(linear):
    """Every grid here has 12 mm^3 voxels (|det|); the sheared one's columns multiply to 13.2 mm^3, which the table
    reported (10 % too much) before."""
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = linear, [10.0, -20.0, 30.0]
    row = case_volumes(synthetic_case(), lesion_mask(4), affine)
    assert (row["lesion_ml"], row["hypoperfusion_ml"], row["core_rule_ml"]) == pytest.approx((0.048, 0.168, 0.072))


@pytest.mark.parametrize("diagonal", [(0.9, 0.9, 5.0), (-0.98, -0.98, 6.0), (0.8, 0.8, 3.0)])
def test_voxel_volume_of_an_axis_aligned_grid_is_the_product_of_the_voxel_sizes_to_the_last_digit(diagonal):
    """Evaluation reported volumes with the product of the voxel sizes; np.linalg.det gave 4.05 for 0.9 x 0.9 x 5,
    where the product is 4.050000000000001, so moving evaluation to this helper would have moved its volumes."""
    assert voxel_volume_ml(np.diag([*diagonal, 1.0])) == math.prod(abs(s) for s in diagonal) / 1000.0


def test_tmax_in_milliseconds_leaves_its_columns_empty_with_a_warning(tmp_path, caplog):
    """Tmax x 1000 gave 'Tmax > 6 s' = about the whole brain without a word."""
    volume = synthetic_case()
    volume[..., 4] *= 1000.0
    with caplog.at_level(logging.WARNING, logger="custom.clinical"):
        row = case_volumes(volume, lesion_mask(4), AFFINE, "ms")
    assert "ms: the brain's median Tmax is 2000, so Tmax is not in seconds" in caplog.text
    assert "rCBF reference" not in caplog.text  # the rule is not applied: no warning about its reference
    assert row["lesion_voxels"] == 4 and row["lesion_ml"] == pytest.approx(0.048)
    assert [row[k] for k in ("hypoperfusion_ml", "core_rule_ml", "mismatch_ml", "mismatch_ratio")] == [None] * 4
    assert "Tmax > 6 s undefined; rCBF < 30 % core undefined; mismatch undefined, ratio undefined" in describe(
        {"case": "ms", **row}
    )
    write_volume_table([{"case": "ms", "image": "ms.nii.gz", **row}], tmp_path / "t.csv")
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        (cells,) = list(csv.DictReader(f))
    assert cells["hypoperfusion_ml"] == cells["core_rule_ml"] == cells["mismatch_ml"] == cells["mismatch_ratio"] == ""
    assert case_volumes(synthetic_case(), lesion_mask(4), AFFINE)["hypoperfusion_ml"] == pytest.approx(0.168)
