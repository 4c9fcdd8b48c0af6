"""The MONAI-free runner: same masks and volumes as the bundle's inference.json, clear errors, atomic outputs."""

import ast
import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, inference_network, refuse_listing
from monai.bundle import ConfigParser, ckpt_export
from monai.transforms import DivisiblePad
from test_bad_inputs import NO_VOLUME, save_with_sform
from test_clinical import AFFINE as SYNTHETIC_AFFINE
from test_clinical import synthetic_case

from custom.clinical import RESEARCH_USE_ONLY, VOLUME_COLUMNS
from custom.deploy import deploy, main, normalize_within_brain, read_stacked_image, symmetric_padding
from custom.transforms import NormalizeWithinBrain

# What docs/deployment.md tells to copy for the runner: deploy.py and the project modules it imports.
RUNNER_FILES = ("custom/__init__.py", "custom/deploy.py", "custom/clinical.py", "custom/lesions.py", "custom/atomic.py",
                "custom/training_record.py", "custom/wording.py", "custom/data/__init__.py", "custom/data/datalist.py",
                "custom/data/studies.py")  # fmt: skip


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> tuple[Path, Path]:
    """(model.pt, model.ts): seeded random weights of inference.json's network_def, exported by MONAI."""
    folder = tmp_path_factory.mktemp("model")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(folder / "model.ts"),
        ckpt_file=str(folder / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE),
    )
    return folder / "model.pt", folder / "model.ts"


@pytest.fixture(scope="module")
def inputs(tiny_phantom_dataset, tmp_path_factory) -> dict[str, Path]:
    """Converted phantom images plus crops that need padding with odd remainders, one-slice volumes, and the
    synthetic case of test_clinical.py (known hypoperfusion and threshold-rule core volumes)."""
    folder = tmp_path_factory.mktemp("inputs")
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    images = {e["case"]: tiny_phantom_dataset / e["image"] for e in dataset["testing"]}
    source = nib.load(tiny_phantom_dataset / dataset["training"][0]["image"])
    data = np.asanyarray(source.dataobj)
    crops = {
        "crop_57x45x3": data[:57, 3:48, :3],  # pads 7 = 3 + 4 and 3 = 1 + 2
        "slice_64x64x1": data[:, :, 1:2],
        "slice_50x39x1": data[5:55, 10:49, 0:1],
    }
    for name, crop in crops.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(crop), source.affine), folder / f"{name}.nii.gz")
        images[name] = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_case(), SYNTHETIC_AFFINE), folder / "synthetic.nii.gz")
    images["synthetic"] = folder / "synthetic.nii.gz"
    return images


def _fake_monai(folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import monai`` fail."""
    (folder / "monai").mkdir(parents=True)
    (folder / "monai" / "__init__.py").write_text("raise ImportError('monai is unavailable in this test')\n")
    return folder


def _run_without_monai(code: str, tmp_path: Path) -> None:
    guard = "try:\n    import monai\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('monai imported')\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_fake_monai(tmp_path / "fake")), str(REPO)])}
    command = [sys.executable, "-c", guard + code]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _bundle_inference(images: list[Path], ckpt: Path, output_dir: Path, *overrides: str) -> None:
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(CONFIGS / "inference.json"),
        "--bundle_root", str(BUNDLE),
        "--datalist", repr([str(p) for p in images]),
        "--ckpt_path", str(ckpt),
        "--output_dir", str(output_dir),
        "--num_workers", "0",
        *overrides,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


@pytest.mark.integration
def test_deploy_without_monai_equals_bundle_inference(inputs, exported_model, tiny_phantom_dataset, tmp_path):
    ckpt, torchscript = exported_model
    _bundle_inference(list(inputs.values()), ckpt, tmp_path / "bundle_out")
    _bundle_inference(list(inputs.values()), ckpt, tmp_path / "bundle_out_t07", "--lesion_threshold", "0.7")
    raw_testing = tiny_phantom_dataset.parent / "isles2018" / "TESTING"
    testing_cases = [name for name in inputs if name.startswith("case_")]
    folders = [raw_testing / name for name in testing_cases]
    command_line = [*map(str, folders), "--model", str(torchscript), "--out", str(tmp_path / "folders")]
    _run_without_monai(
        "from custom.deploy import deploy, main\n"
        f"deploy(*{[str(p) for p in inputs.values()]!r}, model={str(torchscript)!r}, out={str(tmp_path / 'files')!r})\n"
        f"deploy(*{[str(p) for p in inputs.values()]!r}, model={str(torchscript)!r}, out={str(tmp_path / 'all')!r}, "
        "min_lesion_ml=0)\n"
        f"deploy(*{[str(p) for p in inputs.values()]!r}, model={str(torchscript)!r}, out={str(tmp_path / 't07')!r}, "
        "lesion_threshold=0.7)\n"
        f"main({command_line!r})\n"
        "from custom.__main__ import main as project_command_line\n"
        f"project_command_line(['deploy', *{command_line!r}[:-1], {str(tmp_path / 'cli')!r}])\n",
        tmp_path,
    )
    assert _table(tmp_path / "cli" / "lesion_volumes.csv") == _table(tmp_path / "folders" / "lesion_volumes.csv")
    expected = _table(tmp_path / "bundle_out" / "lesion_volumes.csv")
    assert _table(tmp_path / "files" / "lesion_volumes.csv") == expected
    with open(tmp_path / "bundle_out" / "lesion_volumes.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == VOLUME_COLUMNS
    assert {row["intended_use"] for row in expected.values()} == {RESEARCH_USE_ONLY}
    assert (expected["synthetic"]["hypoperfusion_ml"], expected["synthetic"]["core_rule_ml"]) == ("0.168", "0.072")
    phantom = [row for name, row in expected.items() if name.startswith("case_")]
    assert all(float(row["hypoperfusion_ml"]) > 0 for row in phantom), "the phantom's lesions are hypoperfused"
    by_folder = _table(tmp_path / "folders" / "lesion_volumes.csv")
    for name, folder in zip(testing_cases, folders):
        assert by_folder[name] == {**expected[name], "image": str(folder)}
    for name, image in inputs.items():
        reference = nib.load(tmp_path / "bundle_out" / f"{name}_seg.nii.gz")
        runs = ("files", "folders") if name in testing_cases else ("files",)
        for run in runs:
            mask = nib.load(tmp_path / run / f"{name}_seg.nii.gz")
            assert mask.get_data_dtype() == np.uint8
            assert mask.shape == nib.load(image).shape[:3] == reference.shape
            np.testing.assert_array_equal(np.asanyarray(mask.dataobj), np.asanyarray(reference.dataobj))
            np.testing.assert_allclose(mask.affine, nib.load(image).affine, atol=1e-6)
    masks = [np.asanyarray(nib.load(tmp_path / "files" / f"{name}_seg.nii.gz").dataobj) for name in inputs]
    lesion = np.concatenate([mask.ravel() for mask in masks])
    assert 0 < lesion.mean() < 1, "random weights should give masks with both classes, or the comparison is vacuous"
    every_lesion = [np.asanyarray(nib.load(tmp_path / "all" / f"{name}_seg.nii.gz").dataobj) for name in inputs]
    assert all(np.array_equal(mask, kept & mask) for mask, kept in zip(masks, every_lesion))
    assert sum(kept.sum() - mask.sum() for mask, kept in zip(masks, every_lesion)) > 0, "no small lesion removed"
    assert not [p.name for p in (tmp_path / "files").iterdir() if p.name.startswith(".")], "temporary files left"
    stricter = [np.asanyarray(nib.load(tmp_path / "t07" / f"{name}_seg.nii.gz").dataobj) for name in inputs]
    for name, mask in zip(inputs, stricter):
        reference = np.asanyarray(nib.load(tmp_path / "bundle_out_t07" / f"{name}_seg.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, reference)
    assert 0 < sum(mask.sum() for mask in stricter) < lesion.sum(), "lesion_threshold 0.7 should shrink the masks"


def _third_party_imports(module: str, top_level_only: bool = False) -> set[str]:
    tree = ast.parse((REPO / "custom" / module).read_text())
    modules = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}


def test_deploy_imports_only_torch_numpy_scipy_nibabel_the_standard_library_and_seven_project_modules():
    assert _third_party_imports("deploy.py") == {
        "torch", "numpy", "nibabel", "custom", "custom.atomic", "custom.clinical", "custom.lesions",
        "custom.training_record", "custom.data.datalist", "custom.data.studies",
    }  # fmt: skip  # custom: its __version__, the runner's bundle version
    assert _third_party_imports("clinical.py") == {"numpy", "custom.atomic"}
    assert _third_party_imports("lesions.py") == {"numpy", "scipy", "custom.clinical"}
    assert _third_party_imports("atomic.py") == set()
    assert _third_party_imports("training_record.py", top_level_only=True) == {
        "custom.atomic", "custom.data.datalist", "custom.wording"
    }  # fmt: skip  # custom.data.studies imported where used (case_digests), never by the runner
    assert _third_party_imports("wording.py") == set()
    assert _third_party_imports("data/__init__.py") == set()
    assert _third_party_imports("data/datalist.py", top_level_only=True) == set()  # readers imported where used
    assert _third_party_imports("data/studies.py") == {"numpy", "nibabel", "custom.clinical"}


def test_runner_copied_without_the_project(exported_model, tiny_phantom_dataset, tmp_path):
    """docs/deployment.md: RUNNER_FILES copied next to model.ts run on their own, on a file and on an ISLES case
    folder (the project's editable-install finder, which would supply a module missing from the copy, is removed
    first)."""
    _, torchscript = exported_model
    runner = tmp_path / "runner"
    for name in RUNNER_FILES:
        (runner / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, runner / name)
    shutil.copy(torchscript, runner / "model.ts")
    shutil.copy(BUNDLE / "models" / "training_inputs.json", runner)  # as docs/deployment.md copies it, and reads it
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (20, 24, 2, 5))))
    case = shutil.copytree(sorted((tiny_phantom_dataset.parent / "isles2018" / "TESTING").iterdir())[0],
                           tmp_path / "case_9")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(_fake_monai(tmp_path / "fake"))}
    without_project = (
        "import runpy, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
        f"sys.argv = ['deploy', {str(image)!r}, {str(case)!r}, '--model', 'model.ts', '--out', 'results']\n"
        "runpy.run_module('custom.deploy', run_name='__main__', alter_sys=True)\n"
    )
    command = [sys.executable, "-c", without_project]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=runner)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert sorted(p.name for p in (runner / "results").iterdir()) == [
        "case_9_seg.nii.gz", "image_seg.nii.gz", "lesion_volumes.csv"
    ]  # fmt: skip
    assert _table(runner / "results" / "lesion_volumes.csv")["image"]["intended_use"] == RESEARCH_USE_ONLY
    assert RESEARCH_USE_ONLY in completed.stdout


def test_deploy_reports_the_clinical_volumes_of_the_raw_maps(exported_model, tmp_path):
    """The hand-computed volumes of test_clinical.py's synthetic case; the mismatch follows the predicted lesion."""
    _, torchscript = exported_model
    image = tmp_path / "synthetic.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_case(), SYNTHETIC_AFFINE), image)
    row = _table(Path(deploy(image, model=torchscript, out=tmp_path / "out")))["synthetic"]
    assert list(row) == list(VOLUME_COLUMNS)
    assert (row["hypoperfusion_ml"], row["core_rule_ml"], row["intended_use"]) == ("0.168", "0.072", RESEARCH_USE_ONLY)
    lesion_voxels = int(row["lesion_voxels"])
    assert float(row["mismatch_ml"]) == pytest.approx((14 - lesion_voxels) * 0.012, abs=1e-9)
    assert float(row["mismatch_ratio"]) == (round(14 / lesion_voxels, 4) if lesion_voxels else float("inf"))


def test_normalisation_equals_the_bundle_transform(tiny_phantom_dataset):
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    volume, _ = read_stacked_image(tiny_phantom_dataset / dataset["training"][0]["image"])
    image = torch.movedim(torch.from_numpy(volume), -1, 0)
    assert torch.equal(normalize_within_brain(image), NormalizeWithinBrain()(image))
    assert torch.equal(normalize_within_brain(torch.zeros(5, 4, 4, 2)), torch.zeros(5, 4, 4, 2))


@pytest.mark.parametrize("size", [1, 15, 16, 17, 45, 57, 63, 64, 256])
def test_padding_splits_like_monai_divisible_pad(size):
    monai_widths = DivisiblePad(k=16, method="symmetric").compute_pad_width((size,))
    assert symmetric_padding(size) == monai_widths[1]


def _with_background(volume: np.ndarray) -> np.ndarray:
    """``volume`` (H, W, D, 5) with its perfusion maps zeroed on the in-plane border: the background outside the brain
    that every study has (perfusion maps non-zero at every voxel are refused)."""
    volume = np.array(volume, dtype=np.float32)
    volume[[0, -1], :, :, 1:] = 0
    volume[:, [0, -1], :, 1:] = 0
    return volume


def _write(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([1.0, 1.0, 5.0, 1.0])), path)
    return path


def test_bad_inputs_are_named_and_leave_nothing_behind(exported_model, tiny_phantom_dataset, tmp_path):
    _, torchscript = exported_model
    volume = np.ones((16, 16, 2, 5), dtype=np.float32)
    out = tmp_path / "out"
    four_channels = _write(tmp_path / "four.nii.gz", volume[..., :4])
    with pytest.raises(ValueError, match=r"four\.nii\.gz': expected a 4D image with 5 channels"):
        deploy(four_channels, model=torchscript, out=out)
    with pytest.raises(ValueError, match=r"three_d\.nii\.gz"):
        deploy(_write(tmp_path / "three_d.nii.gz", volume[..., 0]), model=torchscript, out=out)
    with_nan = volume.copy()
    with_nan[3, 3, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"nan\.nii\.gz': 1 NaN or Inf"):
        deploy(_write(tmp_path / "nan.nii.gz", with_nan), model=torchscript, out=out)
    assert not out.exists() or not any(out.iterdir())

    raw_case = sorted((tiny_phantom_dataset.parent / "isles2018" / "TESTING").iterdir())[0]
    case = shutil.copytree(raw_case, tmp_path / raw_case.name)
    shutil.rmtree(next(case.glob("*CT_MTT*")))
    with pytest.raises(ValueError, match=rf"{raw_case.name}': missing MTT"):
        deploy(case, model=torchscript, out=out)
    folder_of_images = tmp_path / "new_cases"  # was refused as an ISLES case folder missing every map
    folder_of_images.mkdir()
    _write(folder_of_images / "case_a.nii.gz", volume)
    with pytest.raises(ValueError, match=re.escape(
        f"input '{folder_of_images}' is a folder of 1 NIfTI file(s), not an ISLES 2018 case folder: pass the files "
        f"themselves, e.g. '{folder_of_images / 'case_a.nii.gz'}'"
    )):
        deploy(folder_of_images, model=torchscript, out=out)
    good = _write(tmp_path / "good.nii.gz", volume)
    with pytest.raises(ValueError, match="no input given"):
        deploy(model=torchscript, out=out)
    with pytest.raises(FileNotFoundError, match="missing.ts"):
        deploy(good, model=tmp_path / "missing.ts", out=out)
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        deploy(good, tmp_path / "absent.nii.gz", model=torchscript, out=out)
    (tmp_path / "other").mkdir()
    twin = _write(tmp_path / "other" / "good.nii.gz", volume)
    with pytest.raises(ValueError, match="would both write 'good_seg.nii.gz'"):
        deploy(good, twin, model=torchscript, out=out)
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        deploy(good, model=torchscript, out=out, device="gpu")
    if not torch.cuda.is_available():  # was reported as a model file that is not TorchScript
        with pytest.raises(ValueError, match=r"device 'cuda:0': this machine's PyTorch sees 0 CUDA device\(s\)"):
            deploy(good, model=torchscript, out=out, device="cuda:0")
    assert not out.exists() or not any(out.iterdir())


def test_outputs_of_an_earlier_run_are_replaced_only_when_asked(exported_model, tmp_path):
    """A mask in the output folder may have been corrected by hand: refused without overwrite (before anything is
    computed), replaced completely with it."""
    _, torchscript = exported_model
    rng = np.random.default_rng(0)
    volume = _with_background(rng.normal(size=(20, 24, 3, 5)))
    image = _write(tmp_path / "noise.nii.gz", volume)
    out = tmp_path / "out"
    (out / "noise_seg.nii.gz").parent.mkdir()
    (out / "noise_seg.nii.gz").write_bytes(b"corrected")
    with pytest.raises(SystemExit, match=f"error: output folder '{out}' holds 1 file\\(s\\) of an earlier run .*"
                                         r"\(noise_seg.nii.gz\): replace them with --overwrite"):
        main([str(image), "--model", str(torchscript), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["noise_seg.nii.gz"]
    assert (out / "noise_seg.nii.gz").read_bytes() == b"corrected"
    main([str(image), "--model", str(torchscript), "--out", str(out), "--batch_size", "2", "--overwrite"])
    table = out / "lesion_volumes.csv"
    mask = nib.load(out / "noise_seg.nii.gz")
    assert mask.shape == (20, 24, 3)
    assert int(_table(table)["noise"]["lesion_voxels"]) == int(np.count_nonzero(np.asanyarray(mask.dataobj)))
    assert sorted(p.name for p in out.iterdir()) == ["lesion_volumes.csv", "noise_seg.nii.gz"]


def test_an_output_named_as_an_input_is_refused_even_with_overwrite(exported_model, tmp_path):
    """Written into the inputs' folder, the mask of ``a.nii.gz`` is ``a_seg.nii.gz``: an input of that name was replaced
    by the mask with ``--overwrite``, then set aside as a 3D image. The runner and the bundle (``check_output_dir``)
    refuse it before anything is written, naming the file, and leave the inputs as they were."""
    from custom.config_check import check_output_dir

    _, torchscript = exported_model
    rng = np.random.default_rng(0)
    first = _write(tmp_path / "a.nii.gz", _with_background(rng.normal(size=(20, 24, 3, 5))))
    second = _write(tmp_path / "a_seg.nii.gz", _with_background(rng.normal(size=(20, 24, 3, 5))))
    before = {path.name: path.read_bytes() for path in (first, second)}
    for flag in ([], ["--overwrite"]):
        with pytest.raises(SystemExit, match=f"error: output folder '{tmp_path}': a_seg.nii.gz is an input of this run "
                                             "and the name of an output it writes"):
            main([str(first), str(second), "--model", str(torchscript), "--out", str(tmp_path), *flag])
    with pytest.raises(FileExistsError, match="a_seg.nii.gz is an input of this run"):
        check_output_dir(str(tmp_path), [str(first), str(second)], overwrite=True)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_an_input_given_twice_or_missing_on_a_relative_path_is_named_as_such(exported_model, tmp_path, monkeypatch):
    """One file given twice was told to rename one of the two; a relative path that does not exist was named without
    the folder it is read from (the current one, not that of a datalist file listing it). The runner and the bundle's
    screening (``screen_inference_images``) share both rules."""
    from custom.data.datalist import screen_inference_images

    _, torchscript = exported_model
    monkeypatch.chdir(tmp_path)
    image = _write(tmp_path / "a.nii.gz", _with_background(np.random.default_rng(0).normal(size=(20, 24, 3, 5))))
    twice = rf"'{image}' is given twice"
    with pytest.raises(ValueError, match=rf"^inputs: {twice} \(also as 'a.nii.gz'\); list each image once$"):
        deploy("a.nii.gz", image, model=torchscript, out=tmp_path / "out")
    with pytest.raises(ValueError, match=rf"^datalist: {twice}; list each image once$"):
        screen_inference_images([str(image), str(image)])
    note = rf" \(a relative path is read from the current folder, '{tmp_path}'\)"
    with pytest.raises(FileNotFoundError, match=rf"^input 'b.nii.gz' does not exist{note}$"):
        deploy(image, "b.nii.gz", model=torchscript, out=tmp_path / "out")
    assert screen_inference_images([str(image), "b.nii.gz"]).rejected == {
        "b.nii.gz": f"b.nii.gz: missing (a relative path is read from the current folder, '{tmp_path}')"
    }
    assert not (tmp_path / "out").exists()


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_one_bad_case_never_stops_the_others(exported_model, tiny_phantom_dataset, tmp_path):
    _, torchscript = exported_model
    rng = np.random.default_rng(1)
    good = [_write(tmp_path / f"good_{i}.nii.gz", _with_background(rng.uniform(1, 2, (20, 24, 2, 5)))) for i in (0, 1)]
    good_volume = nib.load(good[0]).get_fdata(dtype=np.float32)
    with_inf = _with_background(rng.uniform(1, 2, (20, 24, 2, 5)))
    with_inf[1, 1, 1, 4] = np.inf
    raw_case = sorted((tiny_phantom_dataset.parent / "isles2018" / "TESTING").iterdir())[0]
    folder = shutil.copytree(raw_case, tmp_path / raw_case.name)
    mtt = next(next(folder.glob("*CT_MTT*")).glob("*.nii*"))
    bad = {
        "inf": _write(tmp_path / "inf.nii.gz", with_inf),
        "corrupt": _truncated(_write(tmp_path / "corrupt.nii.gz", rng.uniform(1, 2, (20, 24, 2, 5)))),
        "six": _write(tmp_path / "six.nii.gz", rng.uniform(1, 2, (20, 24, 2, 6))),
        "zero": _write(tmp_path / "zero.nii.gz", np.zeros((20, 24, 2, 5))),
        "small": _write(tmp_path / "small.nii.gz", _with_background(rng.uniform(1, 2, (16, 40, 2, 5)))),
        "no volume": save_with_sform(tmp_path / "no_volume.nii.gz", good_volume.copy(), NO_VOLUME),
        "folder": folder,
    }
    nib.save(nib.Nifti1Image(np.zeros(nib.load(mtt).shape, np.float32), nib.load(mtt).affine), mtt)
    inputs = [good[0], *bad.values(), good[1]]
    out = tmp_path / "out"
    with pytest.raises(ValueError) as raised:
        deploy(*inputs, model=torchscript, out=out)
    message = str(raised.value)
    assert message.startswith(f"7 of 9 input(s) not segmented (the others were written to {out})")
    assert f"'{bad['inf']}': 1 NaN or Inf values" in message
    assert f"'{bad['corrupt']}': cannot read the voxels" in message
    assert f"'{bad['six']}': expected a 4D image with 5 channels" in message
    assert f"'{bad['zero']}': the CBF channel is all zero" in message
    assert f"'{bad['folder']}': the MTT channel is all zero" in message
    assert f"'{bad['small']}': in-plane size 16 x 40 is below the network's minimum 17 x 17" in message
    assert f"'{bad['no volume']}': its affine gives the voxels no volume" in message  # crashed the run up to 0.3.14
    assert sorted(p.name for p in out.iterdir()) == ["good_0_seg.nii.gz", "good_1_seg.nii.gz", "lesion_volumes.csv"]
    assert list(_table(out / "lesion_volumes.csv")) == ["good_0", "good_1"]

    command = [sys.executable, "-m", "custom", "deploy", *map(str, inputs), "--model", str(torchscript)]
    completed = subprocess.run(command + ["--out", str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO)
    assert completed.returncode != 0
    assert "7 of 9 input(s) not segmented" in completed.stderr and str(bad["corrupt"]) in completed.stderr
    assert (tmp_path / "cli" / "good_1_seg.nii.gz").is_file()


def _scripted_unet(tmp_path: Path, name: str, **changes) -> Path:
    network = inference_network(**changes)
    torch.jit.save(torch.jit.script(network.eval()), tmp_path / name)
    return tmp_path / name


def test_model_of_another_network_is_named(tmp_path):
    image = _write(tmp_path / "image.nii.gz", np.ones((16, 16, 2, 5)))
    four_in = _scripted_unet(tmp_path, "four_in.ts", in_channels=4)
    with pytest.raises(ValueError, match=rf"model '{four_in}' does not take a \(1, 5, 32, 32\) input"):
        deploy(image, model=four_in, out=tmp_path / "out")
    three_out = _scripted_unet(tmp_path, "three_out.ts", out_channels=3)
    with pytest.raises(ValueError, match=rf"model '{three_out}' gives output shape \(1, 3, 32, 32\), expected"):
        deploy(image, model=three_out, out=tmp_path / "out")
    state_dict = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1)}, state_dict)
    with pytest.raises(ValueError, match=rf"model '{state_dict}' is not a TorchScript file"):
        deploy(image, model=state_dict, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_leaves_no_mask_and_names_it(exported_model, tmp_path, monkeypatch, error):
    _, torchscript = exported_model
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (24, 24, 2, 5))))

    def failing_save(nifti, filename):
        Path(filename).write_bytes(b"half a mask")
        raise OSError(error, "simulated")

    monkeypatch.setattr(nib, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(OSError) as raised:
        deploy(image, model=torchscript, out=out)
    assert f"while writing '{out / 'image_seg.nii.gz'}'" in " ".join(raised.value.__notes__)
    assert list(out.iterdir()) == []


def test_an_out_that_is_a_file_or_under_one_is_refused_naming_it(exported_model, tmp_path):
    """``--out`` naming a file (or a folder under one) failed in pathlib with a ``NotADirectoryError`` traceback,
    after the model was loaded; now a one-line refusal naming the folder, the file left as it was."""
    _, torchscript = exported_model
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (24, 24, 2, 5))))
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for out in (file, file / "masks"):
        with pytest.raises(SystemExit) as exited:  # the one line refusals_exit prints
            main([str(image), "--model", str(torchscript), "--out", str(out)], prog="deploy")
        assert exited.value.code == f"deploy: error: output folder '{out}' is not writable: '{file}' is not a folder"
    assert file.read_text() == "mine"


@pytest.mark.slow
def test_normalisation_of_a_volume_above_2_24_brain_voxels_equals_the_bundle_transform(monkeypatch):
    """512 x 512 x 72 brain voxels are 18.9 M, above the 2**24 that torch.quantile refused."""
    from test_bad_inputs import cap_torch_quantile

    cap_torch_quantile(monkeypatch)
    torch.manual_seed(0)
    image = torch.rand(5, 512, 512, 72)
    assert torch.equal(normalize_within_brain(image), NormalizeWithinBrain()(image))


def test_an_earlier_uncertainty_map_of_a_case_is_refused_and_removed_when_asked(exported_model, tmp_path):
    """A case's outputs are its mask and its uncertainty map (inference.json with write_uncertainty): the runner
    writes no map, so an earlier one of its case is refused without overwrite and removed with it, rather than
    left beside the new mask as if they were one run's."""
    _, torchscript = exported_model
    image = _write(tmp_path / "noise.nii.gz", _with_background(np.random.default_rng(0).normal(size=(20, 24, 3, 5))))
    out = tmp_path / "out"
    out.mkdir()
    (out / "noise_uncertainty.nii.gz").write_bytes(b"earlier run")
    with pytest.raises(SystemExit, match=f"error: output folder '{out}' holds 1 file\\(s\\) of an earlier run .*"
                                         r"\(noise_uncertainty.nii.gz\): replace them with --overwrite"):
        main([str(image), "--model", str(torchscript), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["noise_uncertainty.nii.gz"]
    main([str(image), "--model", str(torchscript), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["lesion_volumes.csv", "noise_seg.nii.gz"]


def test_an_int16_file_whose_scaling_moves_zero_is_refused_naming_it(tmp_path):
    """nibabel stores float maps as int16 with a slope and an intercept that do not keep 0 at 0 (here -0.005): every
    voxel became brain, and a phantom case's mask (30 % larger) and a core of 0 mL came out without a word."""
    volume = synthetic_case()
    volume[..., 0][~volume[..., 1:].any(axis=-1)] = -1000.0  # air around the brain
    image = nib.Nifti1Image(volume, SYNTHETIC_AFFINE)
    image.set_data_dtype(np.int16)
    nib.save(image, tmp_path / "int16.nii.gz")
    assert np.all(np.asarray(nib.load(tmp_path / "int16.nii.gz").dataobj)[..., 1:].any(axis=-1))
    with pytest.raises(ValueError, match=r"int16\.nii\.gz': no voxel is zero in every perfusion map"):
        read_stacked_image(tmp_path / "int16.nii.gz")


def test_project_command_line_keeps_input_and_output_names_as_typed(exported_model, tiny_phantom_dataset, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """``python -m custom deploy`` ran through Fire, which reads every value as a Python literal: a case folder named
    ``20240105_1`` (date and series, as exports name studies) reached the runner as 202401051 ("input '202401051' does
    not exist"), and ``--out 2024_05_01`` would have written into ``20240501``. It now runs ``custom.deploy.main``,
    whose values stay as typed."""
    from custom.__main__ import main as project_command_line

    _, torchscript = exported_model
    raw_case = sorted((tiny_phantom_dataset.parent / "isles2018" / "TESTING").iterdir())[0]
    shutil.copytree(raw_case, tmp_path / "20240105_1")
    monkeypatch.chdir(tmp_path)
    project_command_line(["deploy", "20240105_1", "--model", str(torchscript), "--out", "2024_05_01"])
    out = tmp_path / "2024_05_01"
    assert sorted(p.name for p in out.iterdir()) == ["20240105_1_seg.nii.gz", "lesion_volumes.csv"]
    assert list(_table(out / "lesion_volumes.csv")) == ["20240105_1"]


def test_a_case_folder_that_cannot_be_listed_is_named_and_stops_no_other_case(exported_model, tiny_phantom_dataset,
                                                                              tmp_path, monkeypatch):  # fmt: skip
    """A case folder the user may not list (another user's, mode 700) raised PermissionError out of the runner: the
    inputs after it were never segmented and no lesion_volumes.csv was written. It is now that input's problem,
    named with the others. Simulated: the tests run as root, whom permission bits do not stop."""
    _, torchscript = exported_model
    raw_cases = sorted((tiny_phantom_dataset.parent / "isles2018" / "TESTING").iterdir())
    locked, good = (shutil.copytree(case, tmp_path / case.name) for case in raw_cases[:2])
    refuse_listing(monkeypatch, locked)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"1 of 2 input\(s\) not segmented .*\n  - '{locked}': cannot list"):
        deploy(locked, good, model=torchscript, out=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["lesion_volumes.csv", f"{good.name}_seg.nii.gz"])
    assert list(_table(out / "lesion_volumes.csv")) == [good.name]


def test_a_replacing_run_stopped_half_way_leaves_no_earlier_table_beside_its_masks(exported_model, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """``--overwrite`` replaced ``lesion_volumes.csv`` only at the end of the run: a rerun stopped after its first
    mask (a full disk here; killed, in the repro) left the earlier run's table beside that mask, listing volumes the
    mask no longer had. The earlier table is now removed once the run's settings and model are checked; a run refused
    for its model leaves it."""
    _, torchscript = exported_model
    rng = np.random.default_rng(0)
    images = [_write(tmp_path / f"noise_{i}.nii.gz", _with_background(rng.normal(size=(20, 24, 3, 5)))) for i in (0, 1)]
    out = tmp_path / "out"
    deploy(*images, model=torchscript, out=out)
    earlier = (out / "lesion_volumes.csv").read_bytes()
    with pytest.raises(FileNotFoundError, match="missing.ts"):
        deploy(*images, model=tmp_path / "missing.ts", out=out, overwrite=True)
    assert (out / "lesion_volumes.csv").read_bytes() == earlier
    save = nib.save

    def disk_full_at_the_second_mask(image, filename):
        if "noise_1" in Path(filename).name:
            raise OSError(errno.ENOSPC, "simulated")
        save(image, filename)

    monkeypatch.setattr(nib, "save", disk_full_at_the_second_mask)
    with pytest.raises(OSError):
        deploy(*images, model=torchscript, out=out, overwrite=True, lesion_threshold=0.9)
    assert sorted(p.name for p in out.iterdir()) == ["noise_0_seg.nii.gz", "noise_1_seg.nii.gz"]


def _exported(folder: Path, name: str, config: dict, meta: dict, *override_files: dict) -> Path:
    """``name``.ts of the ``network_def`` of ``config`` (inference.json with changes; seeded random weights), exported
    by ``ckpt_export`` with ``meta`` and the config files ``config`` (as inference.json) and ``override_files``."""
    folder.mkdir(parents=True, exist_ok=True)
    config_files = [folder / "inference.json", *(folder / f"override{i}.json" for i in range(len(override_files)))]
    for path, content in zip(config_files, (config, *override_files)):
        path.write_text(json.dumps(content))
    (folder / "metadata.json").write_text(json.dumps(meta))
    parser = ConfigParser()
    parser.read_config([str(path) for path in config_files])
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    ckpt_export(
        net_id="network_def", filepath=str(folder / name), ckpt_file=str(folder / "model.pt"),
        meta_file=str(folder / "metadata.json"), config_file=[str(path) for path in config_files],
        bundle_root=str(BUNDLE),
    )  # fmt: skip
    return folder / name


def test_the_runner_feeds_the_input_settings_of_inference_json_defaults():
    from custom.deploy import RUNNER_INPUT_SETTINGS
    from custom.training_record import INPUT_SETTINGS

    defaults = json.loads((CONFIGS / "inference.json").read_text())
    assert RUNNER_INPUT_SETTINGS == {key: defaults[key] for key in INPUT_SETTINGS}


@pytest.mark.parametrize("override, setting, runners", [
    ({"contralateral_channels": "mirror"}, "contralateral_channels 'mirror'", "None"),
    ({"adjacent_slices": 1}, "adjacent_slices 1", "0"),
    ({"spacing_mm": 0.9}, "spacing_mm 0.9", "None"),  # 5 channels: the probe passed it, and it ran unresampled
])  # fmt: skip
def test_a_model_exported_with_other_input_settings_is_refused_naming_them(tmp_path, override, setting, runners):
    """The settings are in the config file the export embeds (docs/deployment.md: an override file such as
    inputs.json); the runner refused the model by its channel count only, as 'another architecture or channel
    count', naming neither the setting nor its value."""
    config = json.loads((CONFIGS / "inference.json").read_text())
    model = _exported(tmp_path / "export", "model.ts", config, json.loads((CONFIGS / "metadata.json").read_text()),
                      override)  # fmt: skip
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (20, 24, 2, 5))))
    key, value = next(iter(override.items()))
    refusal = (rf"model '{model}' was exported with other input settings than this runner's, {setting} \(its "
               rf"embedded override0.json; this runner's: {runners}\)(.*)--{key} {value}$")
    with pytest.raises(ValueError, match=refusal):
        deploy(image, model=model, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (model.parent / "training_inputs.json").write_text(json.dumps(override))  # its record says so too: named once
    with pytest.raises(ValueError, match=rf"\(its training record '{model.parent / 'training_inputs.json'}'; (.*)"
                                         rf"through inference.json with --{key} {value}$"):
        deploy(image, model=model, out=tmp_path / "out")


def test_a_model_whose_training_record_names_other_input_settings_is_refused_naming_them(exported_model, tmp_path):
    """``ckpt_export`` embeds the config files, not its command line's overrides: a model exported with
    ``--adjacent_slices 1`` (or any setting that keeps the 5 channels the probe checks) ran on the runner's input
    without a word. The training record that the export leaves it beside (``--filepath runs/fold0/model.ts``) names
    them: refused before any output, naming the model, the record, the setting with both values and the override;
    a record of the runner's settings, or one without them (earlier versions), is accepted."""
    from custom.deploy import RUNNER_INPUT_SETTINGS

    model = tmp_path / "fold0" / "model.ts"
    model.parent.mkdir()
    shutil.copy(exported_model[1], model)
    record = model.parent / "training_inputs.json"
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (20, 24, 2, 5))))
    record.write_text(json.dumps({**RUNNER_INPUT_SETTINGS, "adjacent_slices": 1, "fold": 0}))
    refusal = (rf"model '{model}' was exported with other input settings than this runner's, adjacent_slices 1 \(its "
               rf"training record '{record}'; this runner's: 0\)(.*)through inference.json with --adjacent_slices 1$")
    with pytest.raises(ValueError, match=refusal):
        deploy(image, model=model, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    record.write_text("{")
    with pytest.raises(ValueError, match=rf"training record '{record}' of checkpoint '{model}' cannot be read"):
        deploy(image, model=model, out=tmp_path / "refused")
    for accepted in ({**RUNNER_INPUT_SETTINGS, "fold": 0}, {"fold": 0}):
        record.write_text(json.dumps(accepted))
        deploy(image, model=model, out=tmp_path / str(len(accepted)))
        assert (tmp_path / str(len(accepted)) / "image_seg.nii.gz").is_file()


def test_a_model_of_another_bundle_version_runs_with_a_warning_naming_both(exported_model, tmp_path, capsys):
    """Same input contract (settings and channels), another version's export: it ran without a word."""
    config = json.loads((CONFIGS / "inference.json").read_text())
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    older = _exported(tmp_path / "export", "older.ts", config, {**meta, "version": "0.3.9"})
    image = _write(tmp_path / "image.nii.gz", _with_background(np.random.default_rng(0).uniform(1, 2, (20, 24, 2, 5))))
    deploy(image, model=older, out=tmp_path / "older")
    warning = capsys.readouterr().err
    assert f"warning: model '{older}' was exported by bundle version 0.3.9, this runner is version {meta['version']}" \
        in warning
    assert (tmp_path / "older" / "image_seg.nii.gz").is_file()
    deploy(image, model=exported_model[1], out=tmp_path / "same")
    assert "warning" not in capsys.readouterr().err
