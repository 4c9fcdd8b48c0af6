"""The threshold baseline on a tiny dataset written per the data contract, with a known hypoperfused block."""

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from custom.baseline import RUN_RECORD, run_baseline, threshold_core
from custom.metrics import METRIC_NAMES

SHAPE = (32, 32, 4)
AFFINE = np.diag([0.9, 0.9, 5.0, 1.0])
MODALITY = {"0": "CT", "1": "CBF", "2": "CBV", "3": "MTT", "4": "Tmax"}


def ctp_volume():
    """(H, W, D, 5) maps, zero outside a square brain: healthy CBF 50 / Tmax 2 s, a core block (CBF 10 < 0.3 x 50,
    Tmax 10 s), and a penumbra block (CBF 30, Tmax 8 s) that is delayed but not hypoperfused enough."""
    volume = np.zeros((*SHAPE, 5), dtype=np.float32)
    brain = (slice(2, 30), slice(2, 30), slice(None))
    volume[brain] = [40.0, 50.0, 4.0, 5.0, 2.0]
    volume[8:16, 8:16, 1:3, 1], volume[8:16, 8:16, 1:3, 4] = 10.0, 10.0
    volume[20:26, 20:26, 1:3, 1], volume[20:26, 20:26, 1:3, 4] = 30.0, 8.0
    return volume


def core_block():
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[8:16, 8:16, 1:3] = 1
    return mask


def write_dataset(root, labels):
    """A converted dataset folder with one training case per label, alternating folds 0 and 1."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for number, label in enumerate(labels, start=1):
        case = f"case_{number}"
        nib.save(nib.Nifti1Image(ctp_volume(), AFFINE), root / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"{case}.nii.gz")
        training.append(
            {
                "image": f"imagesTr/{case}.nii.gz",
                "label": f"labelsTr/{case}.nii.gz",
                "fold": (number - 1) % 2,
                "patient": f"P{number:03d}",
                "case": case,
            }
        )
    dataset = {
        "name": "tiny",
        "description": "test",
        "modality": MODALITY,
        "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(training),
        "numTest": 0,
        "num_folds": 2,
        "training": training,
        "testing": [],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


@pytest.fixture
def dataset(tmp_path):
    shifted = np.roll(core_block(), 4, axis=0)  # half of the block: Dice 0.5
    return write_dataset(tmp_path / "dataset", [core_block(), shifted, core_block()])


def test_threshold_core_finds_the_hypoperfused_block():
    volume = ctp_volume()
    brain = (volume[..., 1:] != 0).any(axis=-1)
    core, reference, used_fallback = threshold_core(volume[..., 1], volume[..., 4], brain)
    assert reference == 50.0 and not used_fallback
    np.testing.assert_array_equal(core, core_block().astype(bool))


def test_threshold_core_falls_back_to_the_whole_brain_median():
    volume = ctp_volume()
    volume[..., 4][volume[..., 4] != 0] = 5.0  # no voxel below 4 s
    brain = (volume[..., 1:] != 0).any(axis=-1)
    core, reference, used_fallback = threshold_core(volume[..., 1], volume[..., 4], brain, tmax_threshold=4.5)
    assert used_fallback and reference == float(np.median(volume[..., 1][brain]))
    np.testing.assert_array_equal(core, core_block().astype(bool))


def test_run_baseline_scores_every_case_and_keeps_folds(dataset, tmp_path):
    out = tmp_path / "baseline"
    summary = run_baseline(str(dataset), str(out), save_masks=True)

    with open(out / "cases.csv") as file:
        cases = list(csv.DictReader(file))
    assert [(row["case"], row["fold"], row["patient"]) for row in cases] == [
        ("case_1", "0", "P001"),
        ("case_2", "1", "P002"),
        ("case_3", "0", "P003"),
    ]
    assert [float(row["dice"]) for row in cases] == pytest.approx([1.0, 0.5, 1.0])
    for row in cases:
        assert 0 <= float(row["dice"]) <= 1 and 0 <= float(row["lesion_f1"]) <= 1
        assert float(row["hd95_mm"]) >= 0 and float(row["pred_ml"]) == pytest.approx(128 * 4.05e-3)
        assert row["reference_region"] == "tmax_below" and float(row["reference_cbf"]) == 50.0

    assert [row["fold"] for row in summary] == [0, 1, "all"]
    assert summary[0]["cases"] == 2 and summary[0]["dice_mean"] == pytest.approx(1.0)
    assert summary[1]["dice_mean"] == pytest.approx(0.5)
    assert summary[2]["dice_mean"] == pytest.approx(2.5 / 3)
    with open(out / "summary.csv") as file:
        assert [row["fold"] for row in csv.DictReader(file)] == ["0", "1", "all"]
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# Threshold baseline: core = CBF < 0.3 x reference and Tmax > 6 s")
    assert "| fold | cases | " + " | ".join(METRIC_NAMES) + " |" in markdown

    mask = nib.load(out / "masks" / "case_2.nii.gz")
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, AFFINE)
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), core_block())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["baseline", "dataset"]  # staging removed


def test_thresholds_are_parameters(dataset, tmp_path):
    # With Tmax > 7 s and rCBF < 70 % the penumbra block (CBF 30 = 60 %, Tmax 8 s) joins the core.
    run_baseline(str(dataset), str(tmp_path / "out"), rcbf_threshold=0.7, tmax_threshold=7.0)
    with open(tmp_path / "out" / "cases.csv") as file:
        first = next(csv.DictReader(file))
    assert float(first["pred_ml"]) == pytest.approx((128 + 72) * 4.05e-3)
    assert not (tmp_path / "out" / "masks").exists()


def test_missing_dataset_folder_or_json_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        run_baseline(str(missing), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        run_baseline(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_failing_case_leaves_nothing_written(dataset, tmp_path):
    (dataset / "labelsTr" / "case_3.nii.gz").unlink()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"labelsTr/case_3.nii.gz: missing"):
        run_baseline(str(dataset), str(out), save_masks=True)
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]


def test_bad_label_values_are_named(tmp_path):
    dataset = write_dataset(tmp_path / "dataset", [core_block() * 2])
    with pytest.raises(ValueError, match="case_1.nii.gz: label values"):
        run_baseline(str(dataset), str(tmp_path / "out"))


def _flip_label(dataset):
    """case_2's label stored mirrored left-right with its affine adjusted: the same lesion, on another grid."""
    path = dataset / "labelsTr" / "case_2.nii.gz"
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SHAPE[0] - 1
    nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj)[::-1].copy(), AFFINE @ flip), path)
    return "labelsTr/case_2.nii.gz: affine differs from imagesTr/case_2.nii.gz"


def _nan_in_image(dataset):
    volume = ctp_volume()
    volume[10, 10, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(volume, AFFINE), dataset / "imagesTr" / "case_2.nii.gz")
    return "imagesTr/case_2.nii.gz: 1 NaN or Inf values in the CBF channel"


def _truncated_image(dataset):
    path = dataset / "imagesTr" / "case_2.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "case_2.nii.gz.*cannot read the voxels"


@pytest.mark.parametrize(
    "spoil", [_flip_label, _nan_in_image, _truncated_image], ids=["flipped label", "nan", "truncated"]
)
def test_a_study_the_bundle_would_refuse_is_refused_naming_its_file(dataset, tmp_path, spoil):
    """The rule scored a label on another grid than its image (Dice against the mirrored lesion) and an image holding
    NaN without a word, and died in nibabel's gzip reader (EOFError) on a truncated file; now each is refused with the
    checks of ``python -m custom check``, naming the file, and nothing is written."""
    expected = spoil(dataset)
    with pytest.raises(ValueError, match=f"training cases of the baseline cannot be used:\n  - .*{expected}"):
        run_baseline(str(dataset), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_tmax_map_in_milliseconds_is_refused_naming_the_image(dataset, tmp_path):
    """Its 6 s and 4 s thresholds on milliseconds took every brain voxel as delayed: a meaningless rule scored
    without a word."""
    image_path = dataset / "imagesTr" / "case_2.nii.gz"
    volume = ctp_volume()
    volume[..., 4] *= 1000.0
    nib.save(nib.Nifti1Image(volume, AFFINE), image_path)
    with pytest.raises(ValueError, match=r"case_2.nii.gz: the brain's median Tmax is 2000, so Tmax is not in seconds"):
        run_baseline(str(dataset), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_earlier_run_of_other_settings_is_refused_and_kept(dataset, tmp_path):
    """A second run into the same --out with other thresholds (or adding masks) is refused naming the folder and
    a file of the earlier run, which stays as it was; the same run again rewrites the same results."""
    out = tmp_path / "out"
    run_baseline(str(dataset), str(out))
    before = (out / "cases.csv").read_text()
    for settings in ({"rcbf_threshold": 0.5, "save_masks": True}, {"save_masks": True}):
        with pytest.raises(FileExistsError, match=f"'{out}' holds the outputs of an earlier baseline run .*cases.csv"):
            run_baseline(str(dataset), str(out), **settings)
    assert (out / "cases.csv").read_text() == before and not (out / "masks").exists()
    run_baseline(str(dataset), str(out))
    assert (out / "cases.csv").read_text() == before
    (out / "baseline_run.json").unlink()  # outputs of unknown settings
    with pytest.raises(FileExistsError, match="other or unrecorded settings"):
        run_baseline(str(dataset), str(out))


def test_a_rerun_after_a_change_outside_the_scored_cases_is_not_refused(dataset, tmp_path):
    """baseline scores the training cases only, yet a dataset.json whose description or testing list alone changed
    refused a rerun into the same --out (its whole SHA-256 was compared); the scored part is compared, as cv does.
    A record written before it held that part is compared by the whole file still."""
    out, path = tmp_path / "out", dataset / "dataset.json"
    original = path.read_bytes()
    run_baseline(str(dataset), str(out))
    before = (out / "cases.csv").read_text()
    contents = json.loads(original)
    described = json.dumps({**contents, "description": "testing list to come"})
    path.write_text(described)
    run_baseline(str(dataset), str(out))
    assert (out / "cases.csv").read_text() == before
    recorded = json.loads((out / RUN_RECORD).read_text())["dataset_json_sha256"]
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()  # the dataset.json of now
    training = [{**entry, "fold": 1 - entry["fold"]} if entry["case"] in ("case_1", "case_2") else entry
                for entry in contents["training"]]  # the folds of the summary swapped
    path.write_text(json.dumps({**contents, "training": training}))
    with pytest.raises(FileExistsError, match="other or unrecorded settings"):
        run_baseline(str(dataset), str(out))
    assert (out / "cases.csv").read_text() == before

    path.write_bytes(original)  # a record of an earlier version, without the scored part's hash
    run_baseline(str(dataset), str(out))
    earlier = json.loads((out / RUN_RECORD).read_text())
    earlier.pop("scored_dataset_sha256")
    (out / RUN_RECORD).write_text(json.dumps(earlier))
    run_baseline(str(dataset), str(out))  # the same dataset.json
    (out / RUN_RECORD).write_text(json.dumps(earlier))
    path.write_text(described)
    with pytest.raises(FileExistsError, match="other or unrecorded settings"):
        run_baseline(str(dataset), str(out))


@pytest.mark.parametrize(
    "option, value, error",
    [
        ("healthy_tmax", "abc", "--healthy_tmax must be a number, got 'abc'"),
        ("rcbf_threshold", 30, "--rcbf_threshold is a fraction .* between 0 and 1 .*got 30"),
        ("rcbf_threshold", 0, "--rcbf_threshold is a fraction"),
        ("tmax_threshold", -5, "--tmax_threshold is a Tmax in seconds, greater than 0, got -5"),
        ("tmax_threshold", float("nan"), "--tmax_threshold must be a number"),
        ("healthy_tmax", 8, "--healthy_tmax \\(8 s\\) must not exceed --tmax_threshold \\(6 s\\)"),
    ],
)
def test_thresholds_out_of_range_are_refused_naming_the_option(dataset, tmp_path, option, value, error):
    with pytest.raises(ValueError, match=error):
        run_baseline(str(dataset), str(tmp_path / "out"), **{option: value})
    assert not (tmp_path / "out").exists()


def test_the_command_prints_its_summary_table(dataset, tmp_path, capsys):
    # `python -m custom` prints no returned rows, so the table is the command's only output (it printed nothing)
    from custom.__main__ import main

    out = tmp_path / "out"
    main(["baseline", "--dataset_dir", str(dataset), "--out", str(out)])
    printed = capsys.readouterr().out
    assert (out / "summary.md").read_text().strip() in printed
