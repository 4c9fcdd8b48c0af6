"""TorchScript export through MONAI's ckpt_export and ONNX export: metadata embedded, predictions agree with eager."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO
from monai.bundle import ConfigParser

from custom.deploy import lesion_mask, normalize_within_brain


@pytest.fixture(scope="module")
def network_and_checkpoint(tmp_path_factory):
    """inference.json's network_def with seeded random weights (eval mode) and its state dict saved as model.pt."""
    folder = tmp_path_factory.mktemp("checkpoint")
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    torch.save(network.state_dict(), folder / "model.pt")
    return network, folder / "model.pt"


@pytest.fixture(scope="module")
def torchscript_file(network_and_checkpoint, tmp_path_factory) -> Path:
    """model.ts written by the documented command line: ckpt_export with default scripting."""
    _, checkpoint = network_and_checkpoint
    out = tmp_path_factory.mktemp("torchscript") / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "--net_id", "network_def",
        "--filepath", str(out), "--ckpt_file", str(checkpoint),
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
        "--bundle_root", str(BUNDLE),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def phantom_slices(tiny_phantom_dataset) -> torch.Tensor:
    """Normalised slices (N, 5, 64, 64) of a phantom case, as the network sees them."""
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    volume = np.asanyarray(nib.load(tiny_phantom_dataset / dataset["training"][0]["image"]).dataobj)
    image = normalize_within_brain(torch.movedim(torch.from_numpy(volume.astype(np.float32)), -1, 0))
    return torch.movedim(image, -1, 0)[:3].contiguous()


def _batch(slices: torch.Tensor, size: int) -> torch.Tensor:
    """Phantom slices at ``size`` x ``size`` (nearest-neighbour upsampling keeps the intensity structure)."""
    if size == slices.shape[-1]:
        return slices
    return torch.nn.functional.interpolate(slices, size=(size, size), mode="nearest")


def test_ckpt_export_embeds_metadata_and_configs(torchscript_file):
    extra_files = {"metadata.json": "", "inference.json": ""}
    module = torch.jit.load(str(torchscript_file), _extra_files=extra_files)
    assert isinstance(module, torch.jit.ScriptModule)
    metadata = json.loads(extra_files["metadata.json"])
    shipped = json.loads((CONFIGS / "metadata.json").read_text())
    assert metadata["version"] == shipped["version"]
    assert metadata["network_data_format"] == shipped["network_data_format"]
    assert json.loads(extra_files["inference.json"]) == json.loads((CONFIGS / "inference.json").read_text())


@pytest.mark.parametrize("size", [64, 256])
def test_torchscript_agrees_with_eager(network_and_checkpoint, torchscript_file, phantom_slices, size):
    network, _ = network_and_checkpoint
    scripted = torch.jit.load(str(torchscript_file)).eval()
    batch = _batch(phantom_slices, size)
    with torch.inference_mode():
        eager, exported = torch.softmax(network(batch), 1), torch.softmax(scripted(batch), 1)
    assert exported.shape == (batch.shape[0], 2, size, size)
    assert (eager - exported).abs().max() < 1e-4


@pytest.fixture(scope="module")
def onnx_file(network_and_checkpoint, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    from custom.onnx_export import export_onnx

    _, checkpoint = network_and_checkpoint
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_onnx(checkpoint, out, CONFIGS / "inference.json", CONFIGS / "metadata.json", BUNDLE) == str(out)
    return out


@pytest.mark.parametrize("size", [64, 256])
def test_onnx_agrees_with_eager_at_any_size(network_and_checkpoint, onnx_file, phantom_slices, size):
    from custom.onnx_export import OnnxNetwork

    network, _ = network_and_checkpoint
    runtime = OnnxNetwork(onnx_file)
    batch = _batch(phantom_slices, size)
    with torch.inference_mode():
        eager = torch.softmax(network(batch), 1)
    exported = torch.softmax(runtime(batch), 1)
    assert exported.shape == eager.shape
    assert (eager - exported).abs().max() < 1e-3
    assert runtime.metadata["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert not [p.name for p in onnx_file.parent.iterdir() if p.name.startswith(".")], "temporary files left"


def test_onnx_export_names_a_missing_checkpoint(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    from custom.onnx_export import export_onnx

    with pytest.raises(FileNotFoundError, match="absent.pt"):
        export_onnx(tmp_path / "absent.pt", tmp_path / "model.onnx", CONFIGS / "inference.json")
    assert not list(tmp_path.iterdir())


def test_onnx_export_takes_a_training_checkpoint_and_names_one_that_does_not_fit(
    network_and_checkpoint, phantom_slices, tmp_path
):
    """A periodic training checkpoint ({"model": ..., "optimizer": ...}), which evaluate and inference accept, is
    exported with its model weights; a checkpoint of another network is refused naming the file."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    from custom.onnx_export import OnnxNetwork, export_onnx

    network, _ = network_and_checkpoint
    training = tmp_path / "latest_checkpoint_epoch=2.pt"
    optimizer = torch.optim.Adam(network.parameters())
    torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2}, training)
    out = tmp_path / "model.onnx"
    export_onnx(training, out, CONFIGS / "inference.json", CONFIGS / "metadata.json", BUNDLE)
    with torch.inference_mode():
        eager = torch.softmax(network(phantom_slices), 1)
    assert (torch.softmax(OnnxNetwork(out)(phantom_slices), 1) - eager).abs().max() < 1e-3

    foreign = tmp_path / "other_network.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, foreign)
    with pytest.raises(ValueError, match="checkpoint '.*other_network.pt' does not fit 'network_def'"):
        export_onnx(foreign, tmp_path / "other.onnx", CONFIGS / "inference.json", CONFIGS / "metadata.json", BUNDLE)
    assert not (tmp_path / "other.onnx").exists()


def test_onnx_runs_in_the_monai_free_runner(onnx_file, torchscript_file, tiny_phantom_dataset, tmp_path):
    """custom.deploy.lesion_mask with OnnxNetwork (the documented ONNX pipeline), where MONAI cannot be imported;
    masks match TorchScript's except where the two runtimes' last-bit differences flip a near-tie voxel."""
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    image = tiny_phantom_dataset / dataset["testing"][0]["image"]
    (tmp_path / "fake" / "monai").mkdir(parents=True)
    (tmp_path / "fake" / "monai" / "__init__.py").write_text("raise ImportError('monai is unavailable in this test')\n")
    code = (
        "import numpy as np, torch\n"
        "from custom.deploy import lesion_mask, read_stacked_image\n"
        "from custom.onnx_export import OnnxNetwork\n"
        f"volume, affine = read_stacked_image({str(image)!r})\n"
        f"np.save({str(tmp_path / 'onnx.npy')!r}, lesion_mask(OnnxNetwork({str(onnx_file)!r}), volume, affine))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(REPO)])}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    from custom.deploy import read_stacked_image

    volume, affine = read_stacked_image(image)
    reference = lesion_mask(torch.jit.load(str(torchscript_file)).eval(), volume, affine)
    onnx_mask = np.load(tmp_path / "onnx.npy")
    assert onnx_mask.shape == reference.shape == volume.shape[:3]
    assert np.mean(onnx_mask != reference) < 1e-3


@pytest.mark.parametrize("changes, refusal", [
    ({"network_def#in_channels": 4}, r"' does not take a \(1, 5, 32, 32\) input .*Got: 5 Expected: 4"),
    ({"contralateral_channels": "mirror"},
     r"' was exported with other input settings than this runner's, contralateral_channels 'mirror' \(its embedded "
     r"inference.json; this runner's: None\)"),
], ids=["4 input channels", "contralateral mirror"])  # fmt: skip
def test_an_onnx_model_the_runner_cannot_feed_is_refused_when_loaded(tmp_path, changes, refusal):
    """OnnxNetwork took an export of another input channel count without a word, and onnxruntime failed at the first
    slice of a study with an InvalidArgument naming no file; it is checked as the runner checks a TorchScript model
    (``custom.deploy.check_model``: the input settings of its embedded config, then the (1, 5, 32, 32) probe)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    from custom.onnx_export import OnnxNetwork, export_onnx

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    for key, value in changes.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    (tmp_path / "inference.json").write_text(json.dumps(parser.get()))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["num_channels"] = network.in_channels  # the traced input's
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "model.onnx"
    export_onnx(tmp_path / "model.pt", out, tmp_path / "inference.json", tmp_path / "metadata.json", BUNDLE)
    with pytest.raises(ValueError, match=rf"^model '{out}{refusal}"):
        OnnxNetwork(out)
