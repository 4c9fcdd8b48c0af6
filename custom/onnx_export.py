"""ONNX export of the bundle's network with dynamic batch, height and width, and an onnxruntime runner.

MONAI's ``monai.bundle onnx_export`` does the conversion but, called bare, traces a fixed input shape,
uses PyTorch's default (dynamo) exporter, which needs ``onnxscript``, and stores neither the metadata
nor the configs in the file. :func:`export_onnx` calls it with the arguments this bundle needs, checks
the result with onnxruntime, embeds ``metadata.json`` and ``inference.json`` as ONNX metadata and
writes the file atomically. :class:`OnnxNetwork` runs the export like the TorchScript model, so the
MONAI-free runner ``custom.deploy.segment_volume`` accepts either.

Command line: ``python -m custom onnx --ckpt bundle/models/model.pt --out bundle/models/model.onnx`` (an existing
``--out`` is refused unless ``--overwrite``).
"""

import importlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from custom.atomic import write_atomically
from custom.data.datalist import refuse_earlier_file
from custom.deploy import METADATA_FILE, check_model

INPUT_NAME = "image"
OUTPUT_NAME = "pred"
# Batch (slices), height and width vary per study; channels (5 in, 2 out) are fixed.
DYNAMIC_AXES = {name: {0: "batch", 2: "height", 3: "width"} for name in (INPUT_NAME, OUTPUT_NAME)}
OPSET_VERSION = 17  # pinned so exports do not change with the PyTorch default
# onnxruntime vs PyTorch logits on the export check (float32 arithmetic in a different order).
VERIFY_RTOL = 1e-3
VERIFY_ATOL = 1e-4


def export_onnx(
    ckpt: str = "bundle/models/model.pt",
    out: str = "bundle/models/model.onnx",
    config: str = "bundle/configs/inference.json",
    meta: str = "bundle/configs/metadata.json",
    bundle_root: str = "bundle",
    net_id: str = "network_def",
    overwrite: bool = False,
):
    """Export the checkpoint ``ckpt`` of ``net_id`` in ``config`` to ONNX at ``out``; returns ``out``.

    An existing ``out`` is refused, naming it and ``--overwrite`` (it was replaced without a word); with ``overwrite``
    it is removed once the input files are found (``custom.data.datalist.refuse_earlier_file``, as every command
    writing one file).

    The model is traced with the legacy TorchScript-based exporter on an input shaped from
    ``network_data_format`` in ``meta``, with dynamic batch/height/width axes, and verified against
    PyTorch with onnxruntime before the file is moved into place. ``ckpt`` is loaded as evaluate and inference
    load it (``custom.handlers.load_network_checkpoint``): a bare state dict, or a training checkpoint holding
    ``{"model": state_dict, "optimizer": ...}`` (``latest_checkpoint_epoch=N.pt``); a failure names the file.
    """
    # Imported here, not at module level: OnnxNetwork runs where MONAI is not installed, and the project's
    # command line can list this function where the onnx extra is not installed.
    from monai.bundle import onnx_export

    onnx = _import_onnx_extra("onnx")

    for path, what in ((ckpt, "checkpoint"), (config, "config"), (meta, "metadata")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} file '{path}' does not exist")
    refuse_earlier_file(out, overwrite)
    out = Path(out)

    def write(temporary):
        with tempfile.TemporaryDirectory() as folder:
            onnx_export(
                net_id=net_id,
                filepath=str(temporary),
                ckpt_file=str(_network_weights(ckpt, config, meta, bundle_root, net_id, Path(folder))),
                meta_file=str(meta),
                config_file=str(config),
                use_trace=True,
                converter_kwargs={
                    "input_names": [INPUT_NAME],
                    "output_names": [OUTPUT_NAME],
                    "dynamic_axes": DYNAMIC_AXES,
                    "opset_version": OPSET_VERSION,
                    "dynamo": False,
                    "verify": True,
                    "use_ort": True,
                    "rtol": VERIFY_RTOL,
                    "atol": VERIFY_ATOL,
                },
                bundle_root=str(bundle_root),
            )
        model = onnx.load(temporary)
        for path in (meta, config):
            entry = model.metadata_props.add()
            entry.key, entry.value = Path(path).name, Path(path).read_text()
        onnx.save(model, temporary)

    write_atomically(out, write)
    return str(out)


def _network_weights(ckpt, config, meta, bundle_root, net_id: str, folder: Path) -> Path:
    """The network's weights from ``ckpt``, loaded through the project's loader (errors name the file), saved as a
    bare state dict in ``folder`` for MONAI's ``onnx_export``, which expects one."""
    from monai.bundle import ConfigParser

    from custom.handlers import load_network_checkpoint

    parser = ConfigParser()
    parser.read_config(str(config))
    parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle_root)
    network = parser.get_parsed_content(net_id)
    load_network_checkpoint(ckpt, network, name=f"'{net_id}' of '{config}'")
    weights = folder / "model.pt"
    torch.save(network.state_dict(), weights)
    return weights


def _import_onnx_extra(name: str):
    """Import ``onnx`` or ``onnxruntime``, with an error that says which extra installs them."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(f"'{name}' is missing: install the onnx extra (pip install -e '.[onnx]')") from err


class OnnxNetwork:
    """An ONNX export run by onnxruntime with the network's call signature.

    Why it exists: lets the MONAI-free runner (``custom.deploy.segment_volume``) and the tests use the
    ONNX file exactly like the TorchScript model: a (B, 5, H, W) float32 tensor in, (B, 2, H, W)
    float32 logits out. ``metadata`` holds the bundle's ``metadata.json`` embedded by :func:`export_onnx`. The file is
    checked as the runner checks a TorchScript model (``custom.deploy.check_model``): a model of other input settings
    or channel count is refused naming the file (it was taken, and failed at the first slice of a study with
    onnxruntime's InvalidArgument naming no file), one of another bundle version is run with a warning.
    """

    def __init__(self, onnx_file, providers=("CPUExecutionProvider",)):
        if not Path(onnx_file).is_file():
            raise FileNotFoundError(f"ONNX model '{onnx_file}' does not exist")
        onnxruntime = _import_onnx_extra("onnxruntime")
        self.session = onnxruntime.InferenceSession(str(onnx_file), providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        embedded = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = json.loads(embedded[METADATA_FILE]) if embedded.get(METADATA_FILE) else {}
        check_model(self, onnx_file, embedded)  # the checks of the TorchScript model: input settings, channels, version

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        try:
            return torch.from_numpy(self.session.run(None, {self.input_name: images})[0])
        except Exception as err:  # onnxruntime's own types (InvalidArgument, Fail), its message over three lines
            # one line, as torch's error of a scripted model ends with one: check_model's refusal quotes its last line
            raise RuntimeError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from err
