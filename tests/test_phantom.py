"""The synthetic CTP phantom: ISLES 2018 layout, value ranges, determinism, lesion model, atomic writing, figure."""

import csv
import errno
import re
import stat
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from custom.data import phantom
from custom.data.phantom import CENTRES, CORE_SEVERITY, GREY, REFERENCE_SIZE, WHITE, write_phantom

SIZE = 64
TRAINING_CASES = 12
TESTING_CASES = 2
SERIES = re.compile(r"^SMIR\.Brain\.XX\.O\.(CT|CT_CBF|CT_CBV|CT_MTT|CT_Tmax|OT)\.(\d+)$")
IMAGE_MAPS = {"CT", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_phantom(
        tmp_path_factory.mktemp("phantom") / "isles", cases=TRAINING_CASES, test_cases=TESTING_CASES, size=SIZE
    )


def read_patients(root: Path) -> list[dict]:
    with open(root / "patients.csv", newline="") as f:
        return list(csv.DictReader(f))


def case_maps(root: Path, split: str, case: str) -> dict:
    """Map name -> loaded NIfTI image of one case folder."""
    images = {}
    for series in (root / split / case).iterdir():
        images[SERIES.match(series.name)[1]] = nib.load(series / f"{series.name}.nii")
    return images


def training_arrays(root: Path):
    """(label, CBF, Tmax, voxel mL) per training case."""
    for row in read_patients(root):
        if row["split"] == "TRAINING":
            maps = case_maps(root, "TRAINING", row["case"])
            voxel_ml = float(np.prod(maps["OT"].header.get_zooms())) / 1e3
            label = np.asanyarray(maps["OT"].dataobj) > 0
            yield label, maps["CT_CBF"].get_fdata(), maps["CT_Tmax"].get_fdata(), voxel_ml


def test_layout_and_names_follow_isles2018(cohort):
    assert sorted(p.name for p in cohort.iterdir()) == ["TESTING", "TRAINING", "patients.csv"]
    ids = []
    for split, first, count, maps in (
        ("TRAINING", 1, TRAINING_CASES, IMAGE_MAPS | {"OT"}),
        ("TESTING", TRAINING_CASES + 1, TESTING_CASES, IMAGE_MAPS),
    ):
        cases = sorted((p.name for p in (cohort / split).iterdir()), key=lambda name: int(name.split("_")[1]))
        assert cases == [f"case_{k}" for k in range(first, first + count)]
        for case in cases:
            found = set()
            for series in (cohort / split / case).iterdir():
                match = SERIES.match(series.name)
                assert match, f"{split}/{case}/{series.name} is not an ISLES 2018 series name"
                assert [p.name for p in series.iterdir()] == [f"{series.name}.nii"]
                found.add(match[1])
                ids.append(int(match[2]))
            assert found == maps, f"{split}/{case} holds {sorted(found)}"
    assert len(ids) == len(set(ids)), "series ids must be unique"


def test_patients_csv_matches_the_folders(cohort):
    rows = read_patients(cohort)
    assert list(rows[0]) == ["case", "patient", "centre", "split", "slices"]
    assert {(r["split"], r["case"]) for r in rows} == {
        (split, p.name) for split in ("TRAINING", "TESTING") for p in (cohort / split).iterdir()
    }
    slabs = defaultdict(list)
    for row in rows:
        ct = case_maps(cohort, row["split"], row["case"])["CT"]
        assert ct.shape == (SIZE, SIZE, int(row["slices"]))
        assert 2 <= int(row["slices"]) <= 16
        slabs[row["patient"]].append(row)
    assert len({r["centre"] for r in rows}) >= 3
    split_patients = [p for p, rs in slabs.items() if len(rs) == 2]
    assert split_patients, "the cohort should hold at least one patient with two slabs"
    for patient in split_patients:
        first, second = slabs[patient]
        assert int(second["case"].split("_")[1]) == int(first["case"].split("_")[1]) + 1
        assert (first["centre"], first["split"]) == (second["centre"], second["split"])
        a = case_maps(cohort, first["split"], first["case"])["CT"].affine
        b = case_maps(cohort, second["split"], second["case"])["CT"].affine
        # Slab B continues slab A on the same in-plane grid, one slice spacing after A's last slice.
        np.testing.assert_allclose(b[:2], a[:2])
        assert b[2, 3] == pytest.approx(a[2, 3] + a[2, 2] * int(first["slices"]))
    assert len(set(slabs)) == len({r["patient"] for r in rows})


def test_dtypes_affines_and_spacing(cohort):
    centres = {c.name: c for c in CENTRES}
    for row in read_patients(cohort):
        maps = case_maps(cohort, row["split"], row["case"])
        centre = centres[row["centre"]]
        pixel = centre.pixel_mm * REFERENCE_SIZE / SIZE
        for name, image in maps.items():
            expected = {"CT": np.int16, "OT": np.uint8}.get(name, np.float32)
            assert image.get_data_dtype() == expected, f"{row['case']} {name}"
            assert image.shape == maps["CT"].shape
            np.testing.assert_allclose(image.affine, maps["CT"].affine)
            assert image.header.get_zooms() == pytest.approx((pixel, pixel, centre.slice_mm))
            assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
            np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
        if "OT" in maps:
            assert set(np.unique(np.asanyarray(maps["OT"].dataobj))) <= {0, 1}


def test_noise_free_physiology_has_literature_values():
    """Healthy grey/white CBF, CBV, MTT and Tmax, near-zero CSF, and the core's relative CBF, before acquisition."""
    for index in range(4):
        patient = phantom.draw_patient(seed=0, index=index, centre=CENTRES[0])
        slab = phantom.Slab("case_1", "TRAINING", patient, 8, patient.stroke.z_mm - 17.5)
        _, x, y, z = phantom.slab_grid(slab, SIZE)
        tissue, depth, vessels = phantom.tissue_map(patient, x, y, z)
        severity = phantom.severity_map(patient, x, y, z, depth)
        cbf, cbv, tmax = phantom.physiological_maps(patient, tissue, vessels, severity, x, y, z)
        healthy = severity == 0
        for kind, cbf_range, cbv_range in ((GREY, (50, 60), (3, 4)), (WHITE, (20, 25), (1.8, 2.2))):
            voxels = healthy & (tissue == kind)
            assert cbf_range[0] - 1 < np.median(cbf[voxels]) < cbf_range[1] + 1
            assert cbv_range[0] - 0.1 < np.median(cbv[voxels]) < cbv_range[1] + 0.1
            assert 3.0 < np.median(60 * cbv[voxels] / cbf[voxels]) < 6.5  # MTT in s
            assert np.all((tmax[voxels] >= 0) & (tmax[voxels] <= 2))
        csf = (tissue == phantom.CSF) & ~vessels
        assert np.median(cbf[csf]) < 1 and np.median(cbv[csf]) < 0.1
        assert np.all(cbf[tissue < phantom.CSF] == 0)
        healthy_cbf, _, _ = phantom.physiological_maps(patient, tissue, vessels, np.zeros_like(severity), x, y, z)
        core = (severity >= CORE_SEVERITY) & np.isin(tissue, phantom.BRAIN_TISSUES)
        if patient.stroke.present and core.any():
            assert np.all(cbf[core] < 0.3 * healthy_cbf[core])
            assert np.all(tmax[core] > 6)
            lesion = phantom.lesion_mask(patient, tissue, severity, x, y, z)
            assert lesion[core].all(), "the core always becomes lesion"


def test_acquired_maps_are_zero_outside_the_intracranial_space():
    patient = phantom.draw_patient(seed=0, index=1, centre=CENTRES[3])
    slab = phantom.Slab("case_1", "TRAINING", patient, 6, patient.stroke.z_mm - 12.5)
    _, arrays = phantom.render_slab(slab, SIZE, np.random.default_rng(0))
    tissue = phantom.tissue_map(patient, *phantom.slab_grid(slab, SIZE)[1:])[0]
    for name in ("CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax"):
        assert np.all(arrays[name][tissue < phantom.CSF] == 0), name
        if name != "CT_Tmax":  # healthy Tmax is near 0 s, so noise leaves some zeros there as in real maps
            assert np.mean(arrays[name][np.isin(tissue, phantom.BRAIN_TISSUES)] > 0) > 0.95, name
    ct = arrays["CT"]
    assert np.median(ct[tissue == phantom.BONE]) > 500 and np.median(ct[tissue == phantom.AIR]) < -900
    assert 20 < np.median(ct[np.isin(tissue, phantom.BRAIN_TISSUES)]) < 45


def test_written_maps_zero_in_air_and_centres_differ(cohort):
    healthy_cbf = defaultdict(list)
    for row in read_patients(cohort):
        maps = case_maps(cohort, row["split"], row["case"])
        ct = np.asanyarray(maps["CT"].dataobj)
        perfusion = np.stack([maps[m].get_fdata() for m in ("CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax")])
        assert np.all(perfusion >= 0)
        assert np.all(perfusion[:, ct < -500] == 0), "maps must be zero in air"
        brain = perfusion[0] > 0
        healthy = brain & (perfusion[3] < 4)
        if healthy.sum() > 50:
            assert 0.0 <= np.median(perfusion[3][healthy]) <= 2.0  # Tmax in s at every centre
            assert 2.0 <= np.median(perfusion[2][healthy]) <= 8.0  # MTT in s at every centre
            healthy_cbf[row["centre"]].append(np.median(perfusion[0][healthy]))
    medians = {centre: np.median(values) for centre, values in healthy_cbf.items()}
    assert len(medians) >= 3
    assert max(medians.values()) / min(medians.values()) > 3, f"CBF scales should differ by centre: {medians}"


def test_threshold_rule_misses_the_label_that_still_follows_the_maps(cohort):
    """rCBF < 30 % within Tmax > 6 s (reference: median CBF where Tmax < 4 s) is far from the label."""
    dices, lesion_voxels, inside_voxels, volumes = [], 0, 0, []
    for label, cbf, tmax, voxel_ml in training_arrays(cohort):
        brain = cbf > 0
        reference = np.median(cbf[brain & (tmax < 4)])
        rule = brain & (cbf < 0.3 * reference) & (tmax > 6)
        if label.any():
            dices.append(2 * (rule & label).sum() / (rule.sum() + label.sum()))
        lesion_voxels += label.sum()
        inside_voxels += (label & (tmax > 6)).sum()
        volumes.append(label.sum() * voxel_ml)
    assert len(dices) >= TRAINING_CASES // 2
    assert np.mean(dices) < 0.6, dices
    assert inside_voxels / lesion_voxels > 0.6, "the lesion should lie mostly where Tmax > 6 s"
    assert 3 < np.median(volumes) < 50, volumes


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = write_phantom(tmp_path / "a", cases=2, test_cases=1, seed=3, size=48)
    second = write_phantom(tmp_path / "b", cases=2, test_cases=1, seed=3, size=48)
    other = write_phantom(tmp_path / "c", cases=2, test_cases=1, seed=4, size=48)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) == 3 * 5 + 2 + 1
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    ct = sorted(first.glob("TRAINING/case_1/SMIR.Brain.XX.O.CT.*/*.nii"))[0]
    other_ct = sorted(other.glob("TRAINING/case_1/SMIR.Brain.XX.O.CT.*/*.nii"))[0]
    assert ct.read_bytes() != other_ct.read_bytes()


def test_the_same_seed_gives_the_same_bytes_on_every_cpu_numpy_dispatches_to(tmp_path):
    """numpy picks its SIMD loops (exp, sin, ...) by CPU; float32 noise fields made them round differently, so the
    shipped weights' training record (voxel digests of the seed-2026 phantom) held on one CPU and not on another.
    The phantom is written again here with numpy's optional CPU features disabled, and must be byte-identical."""
    import os
    import subprocess
    import sys

    from numpy._core import _multiarray_umath as umath  # what numpy.show_runtime reads

    found = [feature for feature in umath.__cpu_dispatch__ if umath.__cpu_features__.get(feature)]
    if not found:
        pytest.skip("this CPU has no optional SIMD features for numpy to dispatch to: one code path only")
    script = "import sys; from custom.data.phantom import write_phantom; write_phantom(sys.argv[1], cases=2, " \
             "test_cases=0, seed=2026, size=64)"
    environment = {**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(found),
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                  os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "baseline")], env=environment, check=True,
                   capture_output=True)  # fmt: skip
    dispatched = write_phantom(tmp_path / "dispatched", cases=2, test_cases=0, seed=2026, size=64)
    files = sorted(p.relative_to(dispatched) for p in dispatched.rglob("*.nii"))
    assert len(files) == 2 * 6
    differing = [str(name) for name in files
                 if (dispatched / name).read_bytes() != (tmp_path / "baseline" / name).read_bytes()]
    assert not differing, f"{found} disabled changed {differing}"


def test_refuses_non_empty_out_and_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        write_phantom(out, cases=1, test_cases=0, size=32)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    write_phantom(out, cases=1, test_cases=0, size=32, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["TRAINING", "patients.csv"]

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom, "write_case", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom(tmp_path / "new", cases=1, test_cases=0, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a failed run must leave no folder behind"


def test_out_is_made_like_any_folder_and_survives_a_failed_replacement(tmp_path, monkeypatch):
    """OUT gets the mode mkdir gives (the umask's, as prepare's dataset folder; tempfile.mkdtemp gave 0700), and
    an OUT being overwritten is put back when the new cohort cannot be renamed into place."""
    reference = tmp_path / "reference"
    reference.mkdir()
    out = write_phantom(tmp_path / "out", cases=1, test_cases=0, size=32)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out and self.name.endswith(".tmp"):  # the new cohort's temporary folder
            raise OSError(errno.EXDEV, "simulated rename failure")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated rename failure"):
        write_phantom(out, cases=1, test_cases=0, size=32, seed=1, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]


def test_out_that_is_the_working_folder_is_refused_before_any_case(tmp_path, monkeypatch):
    """`python -m custom phantom .` in an empty folder drew every case into '..<id>.tmp' inside it, then failed
    renaming '.' ("Device or resource busy"). Refused before any case is drawn."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(phantom, "write_case", lambda *args, **kwargs: pytest.fail("a case was drawn"))
    with pytest.raises(ValueError, match=rf"'\.' is or holds the working folder '{tmp_path}'"):
        write_phantom(".", cases=1, test_cases=0, size=32)
    assert list(tmp_path.iterdir()) == []


def test_figure_writes_a_png(cohort, tmp_path):
    pytest.importorskip("matplotlib")
    from custom.data.figure import phantom_figure
    from custom.data.isles2018 import prepare_isles2018

    dataset = prepare_isles2018(
        cohort / "TRAINING", tmp_path / "dataset", patients=cohort / "patients.csv", testing=cohort / "TESTING"
    )
    out = phantom_figure(dataset, tmp_path / "figures" / "case.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
    with pytest.raises(ValueError, match="case_99"):
        phantom_figure(dataset, tmp_path / "other.png", case="case_99")
    assert not (tmp_path / "other.png").exists()


def test_pwi_option_writes_a_4d_series_and_leaves_the_maps_unchanged(tmp_path):
    with_pwi = write_phantom(tmp_path / "pwi", cases=2, test_cases=0, seed=5, size=48, pwi=True)
    without = write_phantom(tmp_path / "plain", cases=2, test_cases=0, seed=5, size=48)
    centres = {c.name: c for c in CENTRES}
    for row in read_patients(with_pwi):
        case = with_pwi / "TRAINING" / row["case"]
        (series_path,) = case.glob("SMIR.Brain.XX.O.CT_4DPWI.*/*.nii.gz")
        image = nib.load(series_path)
        ct = nib.load(next(case.glob("SMIR.Brain.XX.O.CT.*/*.nii")))
        centre = centres[row["centre"]]
        assert image.get_data_dtype() == np.int16
        assert image.shape == (*ct.shape, centre.frames)
        assert image.header.get_zooms()[3] == pytest.approx(centre.frame_s)
        assert image.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_allclose(image.affine, ct.affine)
        for name in IMAGE_MAPS | {"OT"}:
            (a,) = case.glob(f"SMIR.Brain.XX.O.{name}.*/*.nii")
            (b,) = (without / "TRAINING" / row["case"]).glob(f"SMIR.Brain.XX.O.{name}.*/*.nii")
            np.testing.assert_array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))


def test_pwi_curves_follow_the_indicator_dilution_model():
    """Area(tissue curve) / area(AIF) gives the truth's CBV; arteries carry the AIF, the sinus peaks later."""
    from custom.perfusion.units import VOLUME_FACTOR

    slab = next(s for s in phantom.iter_cohort(1, 4, 0) if s.slices >= 4)
    series = phantom.render_pwi(slab, SIZE, phantom.pwi_generator(1, slab))
    times = np.arange(series.series.shape[-1]) * series.frame_s
    aif = series.bolus.arterial(times)
    hu = series.series.astype(float)
    enhancement = hu - hu[..., :2].mean(axis=-1, keepdims=True)
    healthy_grey = (series.tissue == GREY) & (series.arteries == 0) & (series.sinus == 0) & (series.truth["Tmax"] < 2)
    cbv = VOLUME_FACTOR * enhancement[healthy_grey].sum(axis=-1) / aif.sum()
    assert np.median(cbv) == pytest.approx(np.median(series.truth["CBV"][healthy_grey]), rel=0.1)
    artery = series.arteries > 0.5
    assert artery.any() and (series.sinus > 0.5).any()
    assert abs(times[enhancement[artery].mean(axis=0).argmax()] - times[aif.argmax()]) <= series.frame_s
    assert enhancement[series.sinus > 0.5].mean(axis=0).argmax() > enhancement[artery].mean(axis=0).argmax()
    mtt = series.truth["MTT"][healthy_grey]
    np.testing.assert_allclose(mtt, 60 * series.truth["CBV"][healthy_grey] / series.truth["CBF"][healthy_grey])


class _ZeroField:
    """A noise field that is zero everywhere: removes the label's irregular-boundary term."""

    def sample(self, x, y, z):
        return np.zeros(np.shape(x))


def test_observable_lesion_is_the_label_without_what_no_map_shows():
    """``observable_lesion_mask`` (the phantom's Dice ceiling) is ``lesion_mask`` with the patient's growth at its
    expected value, no boundary noise and no lacunes; with them, the label differs from it."""
    from dataclasses import replace

    for index in range(4):
        patient = phantom.draw_patient(seed=0, index=index, centre=CENTRES[1])
        if not patient.stroke.present:
            continue
        slab = phantom.Slab("case_1", "TRAINING", patient, 8, patient.stroke.z_mm - 17.5)
        _, x, y, z = phantom.slab_grid(slab, SIZE)
        tissue, depth, _ = phantom.tissue_map(patient, x, y, z)
        severity = phantom.severity_map(patient, x, y, z, depth)
        observable = phantom.observable_lesion_mask(patient, tissue, severity)
        assert observable.any()
        assert not np.array_equal(phantom.lesion_mask(patient, tissue, severity, x, y, z), observable)
        expected = CORE_SEVERITY - phantom.expected_growth(patient.stroke.collaterals)
        visible_only = replace(
            patient,
            stroke=replace(patient.stroke, growth_threshold=expected, lacunes=np.zeros((0, 4))),
            fields={**patient.fields, "lesion": _ZeroField()},
        )
        assert np.array_equal(phantom.lesion_mask(visible_only, tissue, severity, x, y, z), observable)


def test_ceiling_scores_the_labels_that_write_phantom_writes(cohort, tmp_path):
    """``python -m custom phantom-ceiling`` draws the cohort again from its seed: its labels are the OT files."""
    from custom.data.ceiling import phantom_ceiling

    rows = phantom_ceiling(str(tmp_path / "ceiling"), cases=TRAINING_CASES, seed=0, size=SIZE)
    assert [row["case"] for row in rows] == [f"case_{k}" for k in range(1, TRAINING_CASES + 1)]
    for row in rows:
        ot = case_maps(cohort, "TRAINING", row["case"])["OT"]
        label_ml = np.count_nonzero(np.asanyarray(ot.dataobj)) * np.prod(ot.header.get_zooms()) / 1000.0
        assert row["label_ml"] == pytest.approx(label_ml)
        assert 0.0 <= row["dice"] <= 1.0
    assert any(row["label_ml"] > 0 and row["dice"] < 1.0 for row in rows)
    assert (tmp_path / "ceiling" / "cases.csv").is_file()
    assert "| all | 12 |" in (tmp_path / "ceiling" / "ceiling.md").read_text()


def test_ceiling_refuses_an_earlier_runs_tables_unless_asked(tmp_path):
    """A second ``phantom-ceiling`` into the same --out (a scan of shifts) replaced the first one's tables without a
    word; it is refused before any work, naming the folder and the file, and ``overwrite`` replaces them."""
    from custom.data.ceiling import phantom_ceiling

    out = tmp_path / "ceiling"
    phantom_ceiling(str(out), cases=1, seed=0, size=SIZE)
    first = (out / "cases.csv").read_text()
    with pytest.raises(FileExistsError, match="cases.csv.*--overwrite"):
        phantom_ceiling(str(out), cases=2, seed=0, size=SIZE)
    assert (out / "cases.csv").read_text() == first
    phantom_ceiling(str(out), cases=2, seed=0, size=SIZE, overwrite=True)
    assert len((out / "cases.csv").read_text().splitlines()) == 3


def test_observable_lesion_grows_as_its_threshold_is_shifted_down():
    patient = next(p for i in range(10) if (p := phantom.draw_patient(0, i, CENTRES[2])).stroke.present)
    slab = phantom.Slab("case_1", "TRAINING", patient, 8, patient.stroke.z_mm - 17.5)
    _, x, y, z = phantom.slab_grid(slab, SIZE)
    tissue, depth, _ = phantom.tissue_map(patient, x, y, z)
    severity = phantom.severity_map(patient, x, y, z, depth)
    masks = [phantom.observable_lesion_mask(patient, tissue, severity, shift) for shift in (0.05, 0.0, -0.05)]
    assert np.all(masks[0] <= masks[1]) and np.all(masks[1] <= masks[2])
    assert masks[0].sum() < masks[1].sum() < masks[2].sum()


def test_each_case_is_reported_as_it_is_written(tmp_path, capsys):
    """A cohort takes half a minute at 256 x 256 (minutes with pwi), and the command printed nothing until it ended."""
    write_phantom(tmp_path / "out", cases=2, test_cases=1, seed=3, size=32)
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(r"x\d+,", "xD,", line) for line in lines] == [
        "[1/3] case_1: 32x32xD, TRAINING", "[2/3] case_2: 32x32xD, TRAINING", "[3/3] case_3: 32x32xD, TESTING"
    ]
