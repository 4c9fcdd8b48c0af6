"""A real MONAI Label 0.8.5 server serving and fine-tuning the bundle, driven by MONAI Label's own client.

Builds or reuses the MONAI Label environment (``.ci/monailabel_env``, minutes the first time, about
8 GB), prepares the app and studies with ``python -m custom monailabel-app`` from the tiny phantom,
starts ``monailabel start_server`` on a free loopback port and runs ``monailabel_client.py`` in that
environment. Run it with ``python -m pytest tests/integration/test_monailabel.py -m slow``.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, inference_network
from monai.transforms import LoadImage

from custom.monailabel_app import monailabel_environment, prepare_monailabel_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENT = Path(__file__).with_name("monailabel_client.py")
MODEL = "ctp_stroke"
FINE_TUNE_EPOCHS = 3
LABELLED = 5  # studies given a "final" label before training (MONAI Label's val_split 0.2 keeps one for validation)
SERVER_START_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url, process, log):
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"no answer from {url}/info/ after {SERVER_START_S} s")


def _bundle_inference(study, ckpt, out_dir, input_settings) -> Path:
    """The mask ``configs/inference.json`` writes for ``study`` with the weights ``ckpt`` and ``input_settings``."""
    overrides = [str(part) for key, value in input_settings.items() for part in (f"--{key}", value)]
    completed = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
         "--bundle_root", str(BUNDLE), "--datalist", str([str(study)]), "--ckpt_path", str(ckpt),
         "--output_dir", str(out_dir), "--num_workers", "0", *overrides],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return Path(out_dir) / f"{study.name.split('.nii')[0]}_seg.nii.gz"


def _assert_same_mask(served, reference):
    """Voxel-identical and on the same grid, whatever the file format (read both through ITK)."""
    load = LoadImage(image_only=True, reader="ITKReader")
    served_image, reference_image = load(str(served)), load(str(reference))
    assert served_image.shape == reference_image.shape
    assert np.array_equal(served_image.numpy(), reference_image.numpy())
    assert np.allclose(served_image.affine.numpy(), reference_image.affine.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def monailabel_venv() -> Path:
    built = subprocess.run([str(REPO / ".ci" / "monailabel_env")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return Path(built.stdout.strip().splitlines()[-1])


# The shipped weights as packaged, and other weights trained with slice context and the hemisphere differences
# (30 input channels: seeded random weights stand in for a training run) served with --ckpt_path,
# --adjacent_slices 1 and --contralateral_channels difference.
EXTRA_CHANNELS = {"contralateral_channels": "difference", "adjacent_slices": 1}


@pytest.mark.parametrize("input_settings", [{}, EXTRA_CHANNELS], ids=["shipped", "extra_channels"])
def test_server_infers_saves_labels_and_fine_tunes(monailabel_venv, tiny_phantom_dataset, tmp_path, input_settings):
    app, studies, answers = tmp_path / "app", tmp_path / "studies", tmp_path / "answers"
    port = _free_port()
    ckpt_path = None
    if input_settings:
        ckpt_path = tmp_path / "trained_elsewhere.pt"
        torch.manual_seed(0)
        torch.save({"model": inference_network(in_channels=30).state_dict()}, ckpt_path)
    command = prepare_monailabel_app(app, studies=studies, dataset_dir=tiny_phantom_dataset, venv=monailabel_venv,
                                     port=port, ckpt_path=ckpt_path, **input_settings)  # fmt: skip
    served_weights = app / "model" / MODEL / "models" / "model.pt"
    if ckpt_path:
        assert served_weights.read_bytes() == ckpt_path.read_bytes()
    initial_weights = tmp_path / "initial_model.pt"
    initial_weights.write_bytes(served_weights.read_bytes())

    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    study = studies / Path(dataset["testing"][0]["image"]).name
    study_id = study.name.split(".nii")[0]
    refused = studies / "case_nan.nii.gz"  # a study the bundle refuses: a NaN voxel
    image = nib.load(study)
    volume = np.asarray(image.dataobj, dtype=np.float32)
    volume[0, 0, 0, 2] = np.nan
    nib.save(nib.Nifti1Image(volume, image.affine), refused)
    broken = studies / "case_broken.nii.gz"  # a study cut in half (a broken copy): nibabel reads its header only
    broken.write_bytes(study.read_bytes()[: study.stat().st_size // 2])
    labels = {Path(e["image"]).name.split(".nii")[0]: str(tiny_phantom_dataset / e["label"])
              for e in dataset["training"][:LABELLED]}  # fmt: skip
    (tmp_path / "labels.json").write_text(json.dumps(labels))

    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            shlex.split(command), stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
            env=monailabel_environment(), start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_server(url, server, log)
        client = subprocess.run(
            [str(monailabel_venv / "bin" / "python"), str(CLIENT), url, MODEL, study_id, refused.name.split(".nii")[0],
             broken.name.split(".nii")[0], str(tmp_path / "labels.json"), str(FINE_TUNE_EPOCHS), str(answers)],
            capture_output=True, text=True, env=monailabel_environment(),
        )  # fmt: skip
        assert client.returncode == 0, client.stdout[-3000:] + client.stderr[-5000:]

        info = json.loads((answers / "info.json").read_text())
        assert info["models"][MODEL]["labels"] == {"lesion": 1}
        assert info["models"][MODEL]["dimension"] == 2

        reference = _bundle_inference(study, initial_weights, tmp_path / "reference_before", input_settings)
        assert nib.load(answers / "before.nii.gz").shape == nib.load(study).shape[:3]
        _assert_same_mask(answers / "before.nii.gz", reference)  # float32 0/1 unless result_dtype is asked
        _assert_same_mask(answers / "before.nrrd", reference)
        assert LoadImage(image_only=True, dtype=None)(str(answers / "before.nrrd")).dtype == torch.uint8
        refusal = (answers / "refused.txt").read_text()
        assert refusal == f'Status: 422; Response: {{"detail":"{refused}: 1 NaN or Inf values in the CBV channel"}}'
        failure = (answers / "broken.txt").read_text()
        assert failure == f'Status: 500; Response: {{"detail":"the inference of {broken} failed: EOFError: ' \
                          'Compressed file ended before the end-of-stream marker was reached (the traceback is in ' \
                          'the server\'s log)"}', failure
        app_log = (app / "logs" / "app.log").read_text()
        assert f"the inference of {broken} failed" in app_log and "Traceback (most recent call last)" in app_log

        datastore = json.loads((answers / "datastore.json").read_text())
        for image_id in labels:
            assert "final" in datastore["objects"][image_id]["labels"]

        refused_status = json.loads((answers / "refused_train_status.json").read_text())
        assert refused_status["status"] == "ERROR", refused_status
        assert refused_status["details"][-1] == "ValueError: MONAI Label gave the fine-tune no labelled study to " \
                                                "train on: submit labels (tag 'final')", refused_status["details"]
        in_the_server = json.loads((answers / "refused_sync_train.json").read_text())
        assert in_the_server["single"] == {"status": 422, "response": {"detail": "MONAI Label gave the fine-tune no "
                                           "labelled study to train on: submit labels (tag 'final')"}}, in_the_server
        multi_gpu_refusal = "the fine-tune of ctp_stroke failed: RuntimeError: the multi-GPU fine-tune failed: " \
                            "ValueError: MONAI Label gave the fine-tune no labelled study to train on: submit labels " \
                            "(tag 'final') (torchrun exited with status 1); each rank's output is above in the log " \
                            "(the traceback is in the server's log)"  # the refusal, from the rank's output
        assert in_the_server["multi_gpu"] == {"status": 500, "response": {"detail": multi_gpu_refusal}}, in_the_server
        status = json.loads((answers / "train_status.json").read_text())
        assert status["status"] == "DONE", status
        assert not (app / "model" / MODEL / "models" / "model.ts").exists()  # an export of the weights replaced
        before_info = json.loads((answers / "model_before.json").read_text())
        after_info = json.loads((answers / "model_after.json").read_text())
        assert after_info["checksum"] != before_info["checksum"]
        assert served_weights.read_bytes() != initial_weights.read_bytes()

        multi_gpu = json.loads((answers / "multi_gpu_train.json").read_text())
        after_multi_gpu = json.loads((answers / "model_after_multi_gpu.json").read_text())
        assert multi_gpu == {"status": 200, "response": {}}, multi_gpu
        assert after_multi_gpu["checksum"] != after_info["checksum"]

        reference_after = _bundle_inference(study, served_weights, tmp_path / "reference_after", input_settings)
        _assert_same_mask(answers / "after.nii.gz", reference_after)  # the weights of the multi-GPU fine-tune
        print(f"GET /info/ labels: {info['labels']}; model {MODEL}: {info['models'][MODEL]['labels']}, "
              f"dimension {info['models'][MODEL]['dimension']}")  # fmt: skip
        print(f"POST /infer/{MODEL}?image={study_id}: NIfTI and NRRD masks voxel-identical to inference.json")
        print(f"POST /infer/{MODEL}?image=case_nan: the client's MONAILabelClientException says {refusal}")
        print(f"POST /infer/{MODEL}?image=case_broken: the client's MONAILabelClientException says {failure}")
        print(f"PUT /datastore/label (tag final): {sorted(labels)}")
        print(f"POST /train/{MODEL} {json.loads((answers / 'train_request.json').read_text())}")
        print(f"GET /train/ of a fine-tune without labels: status ERROR, last line {refused_status['details'][-1]}")
        print(f"POST /train/{MODEL}?run_sync=true without labels: {in_the_server}")
        print(f"GET /train/: status {status['status']} (started {status['start_ts']}, ended {status.get('end_ts')})")
        checksums = f"{before_info['checksum'][:12]}... -> {after_info['checksum'][:12]}..."
        print(f"GET /model/info/{MODEL}: checksum {checksums}")
        print(f"POST /train/{MODEL}?run_sync=true, torchrun with one CPU process: {multi_gpu}, checksum "
              f"{after_info['checksum'][:12]}... -> {after_multi_gpu['checksum'][:12]}...")
        print(f"POST /infer/{MODEL}?image={study_id} after training: voxel-identical to inference.json, new model.pt")
    except BaseException:
        print(f"---- MONAI Label server log ({log}) ----\n{log.read_text()[-20000:]}", file=sys.stderr)
        raise
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
