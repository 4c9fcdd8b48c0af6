"""The checks the MONAI model zoo runs on a submitted bundle (run here without network access), and the
self-contained bundle archive that MONAI Label or a zoo checkout runs without this project installed."""

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import monai.bundle.scripts
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO
from monai.bundle import ConfigParser, verify_metadata

from custom.package import package_bundle
from custom.training_record import TRAINING_RECORD

LOCAL_SCHEMA = Path(__file__).with_name("meta_schema_20240725.json")
METADATA = CONFIGS / "metadata.json"


def _monai_bundle(*arguments) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *arguments], capture_output=True, text=True, cwd=REPO
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout + completed.stderr


@pytest.fixture
def offline_schema(monkeypatch) -> Path:
    """The local schema, with MONAI's download step allowed only to find the file already there."""
    real_download = monai.bundle.scripts.download_url

    def no_download(url, filepath, **kwargs):
        assert Path(filepath).is_file(), f"verify_metadata would download {url}"
        return real_download(url=url, filepath=filepath, **kwargs)

    monkeypatch.setattr(monai.bundle.scripts, "download_url", no_download)
    return LOCAL_SCHEMA


def test_license_and_metadata_are_in_the_bundle():
    assert (BUNDLE / "LICENSE").is_file() and (BUNDLE / "LICENSE").stat().st_size > 0
    assert METADATA.is_file()


def test_model_weights_are_shipped_and_load_into_the_network():
    checkpoint = BUNDLE / "models" / "model.pt"
    assert checkpoint.is_file(), f"{checkpoint} is missing"
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))


def test_version_is_a_key_of_the_changelog():
    metadata = json.loads(METADATA.read_text())
    assert metadata["version"] in metadata["changelog"]


def test_metadata_satisfies_the_20240725_schema(offline_schema):
    assert "meta_schema_20240725.json" in json.loads(METADATA.read_text())["schema"]
    verify_metadata(meta_file=str(METADATA), filepath=str(offline_schema))


@pytest.mark.parametrize(
    "remove", [("required_packages_version",), ("network_data_format", "outputs", "pred", "channel_def")]
)
def test_the_local_schema_rejects_metadata_without_a_required_field(offline_schema, tmp_path, remove):
    metadata = json.loads(METADATA.read_text())
    parent = metadata
    for key in remove[:-1]:
        parent = parent[key]
    del parent[remove[-1]]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=remove[-1]):
        verify_metadata(meta_file=str(broken), filepath=str(offline_schema))


def test_network_input_and_output_match_the_metadata():
    output = _monai_bundle(
        "verify_net_in_out", "network_def",
        "--meta_file", str(METADATA), "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE),
    )  # fmt: skip
    assert "verified with no error" in output


def test_shipped_checkpoint_exports_to_torchscript(tmp_path):
    out = tmp_path / "model.ts"
    _monai_bundle(
        "ckpt_export", "--net_id", "network_def", "--filepath", str(out),
        "--ckpt_file", str(BUNDLE / "models" / "model.pt"),
        "--meta_file", str(METADATA), "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE),
    )  # fmt: skip
    extra_files = {"metadata.json": ""}
    torch.jit.load(str(out), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["version"] == json.loads(METADATA.read_text())["version"]


def _table(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """A copy of bundle/ with seeded random weights (without the shipped weights' training record: they were not
    trained), plus run outputs and caches an archive must leave out."""
    root = tmp_path_factory.mktemp("bundle_copy") / "bundle"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("model.*", TRAINING_RECORD, "__pycache__"))
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    (root / "eval").mkdir(exist_ok=True)
    (root / "eval" / "metrics.csv").write_text("run output\n")
    (root / "models" / "checkpoint_epoch=3.pt").write_bytes(b"training checkpoint")
    (root / "configs" / "__pycache__").mkdir()
    (root / "configs" / "__pycache__" / "x.pyc").write_bytes(b"cache")
    return root


def test_package_holds_the_bundle_and_the_code_and_nothing_else(bundle_copy, tmp_path):
    archive = Path(package_bundle(tmp_path / "ctp_stroke.zip", bundle_root=bundle_copy))
    names = zipfile.ZipFile(archive).namelist()
    assert all(name.startswith("ctp_stroke/") for name in names)
    for expected in ("LICENSE", "configs/metadata.json", "configs/inference.json", "models/model.pt",
                     "custom/__init__.py", "custom/deploy.py", "custom/transforms.py", "custom/data/datalist.py"):
        assert f"ctp_stroke/{expected}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/eval/" in n or "checkpoint" in n]
    light = zipfile.ZipFile(package_bundle(tmp_path / "light.zip", bundle_root=bundle_copy, include_models=False))
    assert not [n for n in light.namelist() if "/models/" in n] and "light/custom/deploy.py" in light.namelist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctp_stroke.zip", "light.zip"]


def test_package_refuses_an_incomplete_bundle_and_writes_nothing(bundle_copy, tmp_path):
    incomplete = shutil.copytree(bundle_copy, tmp_path / "incomplete", ignore=shutil.ignore_patterns("model.pt"))
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        package_bundle(tmp_path / "out" / "b.zip", bundle_root=incomplete)
    with pytest.raises(ValueError, match=r"b\.tar"):
        package_bundle(tmp_path / "out" / "b.tar", bundle_root=bundle_copy)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_package_refuses_exports_that_are_not_of_model_pt(bundle_copy, tmp_path):
    """Training into bundle/models replaced model.pt and left model.ts and model.onnx of the earlier weights: the
    archive segmented one case as 1007.5 mL through inference.json and 36.5 mL through the runner on its model.ts."""
    onnx = pytest.importorskip("onnx")
    root = shutil.copytree(bundle_copy, tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    torch.jit.script(network).save(str(root / "models" / "model.ts"))
    initializers = [onnx.numpy_helper.from_array(t.numpy(), name) for name, t in network.state_dict().items()]
    exported = onnx.helper.make_model(onnx.helper.make_graph([], "weights only", [], [], initializers))
    onnx.save(exported, root / "models" / "model.onnx")
    names = zipfile.ZipFile(package_bundle(tmp_path / "fresh.zip", bundle_root=root)).namelist()
    assert {"fresh/models/model.ts", "fresh/models/model.onnx"} <= set(names)

    torch.manual_seed(1)  # model.pt retrained, the exports left as they were
    torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), root / "models" / "model.pt")
    with pytest.raises(ValueError, match=r"models/model\.ts, models/model\.onnx not exported from .*models/model\.pt"):
        package_bundle(tmp_path / "out" / "stale.zip", bundle_root=root)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert zipfile.ZipFile(package_bundle(tmp_path / "light.zip", bundle_root=root, include_models=False))


def _isolated_environment(tmp_path: Path, strip_repo: bool) -> dict:
    """Environment whose Python cannot see the repository: PYTHONPATH without it and, with ``strip_repo``,
    a sitecustomize that removes the editable install's finder of ``custom`` from sys.meta_path."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if strip_repo:
        (site / "sitecustomize.py").write_text(
            "import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '').lower()]\n"
        )
    return {**os.environ, "PYTHONPATH": str(site)}


def _run_unzipped_bundle(root: Path, cwd: Path, env: dict, *arguments) -> str:
    """``python -m monai.bundle run`` on an unzipped bundle; prints where ``custom`` was imported from."""
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root), "--num_workers", "0",
        "--run", repr(["$@evaluator.run()", "$print('CUSTOM_FROM', __import__('custom').__file__)"]),
        *arguments,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return next(line.split()[1] for line in completed.stdout.splitlines() if line.startswith("CUSTOM_FROM"))


@pytest.mark.integration
def test_unzipped_archive_runs_without_the_repository(bundle_copy, tiny_phantom_dataset, tmp_path):
    archive = package_bundle(tmp_path / "ctp_stroke.zip", bundle_root=bundle_copy)
    (tmp_path / "unzipped").mkdir()
    zipfile.ZipFile(archive).extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / "ctp_stroke"
    work = tmp_path / "work"
    work.mkdir()
    env = _isolated_environment(tmp_path, strip_repo=True)
    probe = subprocess.run([sys.executable, "-c", "import custom"], capture_output=True, text=True, cwd=work, env=env)
    assert probe.returncode != 0 and "No module named 'custom'" in probe.stderr
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    images = [str(tiny_phantom_dataset / entry["image"]) for entry in dataset["testing"]]
    arguments = ("--datalist", repr(images), "--output_dir", str(tmp_path / "out"))
    custom_file = _run_unzipped_bundle(root, work, env, *arguments)
    assert Path(custom_file).is_relative_to(root)
    rows = _table(tmp_path / "out" / "lesion_volumes.csv")
    assert [row["image"] for row in rows.values()] == images
    assert all((tmp_path / "out" / f"{case}_seg.nii.gz").is_file() for case in rows)


@pytest.mark.integration
def test_unzipped_archive_uses_its_own_code_even_where_the_repository_is_installed(
    bundle_copy, tiny_phantom_dataset, tmp_path
):
    archive = package_bundle(tmp_path / "ctp_stroke.zip", bundle_root=bundle_copy)
    zipfile.ZipFile(archive).extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped" / "ctp_stroke"
    work = tmp_path / "work"
    work.mkdir()
    env = _isolated_environment(tmp_path, strip_repo=False)
    arguments = ("--dataset_dir", str(tiny_phantom_dataset), "--output_dir", str(tmp_path / "out"))
    assert Path(_run_unzipped_bundle(root, work, env, *arguments)).is_relative_to(root)
    assert len(_table(tmp_path / "out" / "lesion_volumes.csv")) == 2


def test_package_version_is_the_bundle_version():
    import custom

    assert custom.__version__ == json.loads(METADATA.read_text())["version"]
