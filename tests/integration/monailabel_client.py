"""Drive a running MONAI Label server with MONAI Label's own client, as the 3D Slicer plugin does.

Runs in the MONAI Label environment (the project's does not have ``monailabel``), called by ``test_monailabel.py``:
``python monailabel_client.py SERVER_URL MODEL STUDY REFUSED_STUDY BROKEN_STUDY LABELS_JSON EPOCHS OUT_DIR``
(``REFUSED_STUDY``: a study the bundle refuses; ``BROKEN_STUDY``: a corrupt study file the bundle does not screen).
Every server answer is written to ``OUT_DIR`` for the test to check.
"""

import json
import shutil
import sys
import time
from pathlib import Path

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

_SAVE_RESULT = MONAILabelUtils.save_result
TRAIN_TIMEOUT_S = 1200  # a fine-tune of a few epochs on the tiny phantom takes about a minute on 2 cores
# MONAI Label's multi-GPU path (torchrun) with one process, which runs without a GPU (the bundle's multi_gpu_train.json
# falls back to the CPU and gloo); run_sync keeps "gpus" as sent (a background fine-tune gets "all", none here)
MULTI_GPU = {"force_multi_gpu": True, "gpus": "0"}


def model_info(server_url, model):
    status, response, _, _ = MONAILabelUtils.http_method("GET", server_url, f"/model/info/{model}")
    if status != 200:
        raise RuntimeError(f"GET /model/info/{model}: status {status}: {response}")
    return json.loads(response)


def train_in_the_server(server_url, model, payload):
    """``POST /train/<model>?run_sync=true`` (not in the client's ``train_start``): the fine-tune runs in the server,
    which answers when it ends; the status and the answer."""
    status, response, _, _ = MONAILabelUtils.http_method("POST", server_url, f"/train/{model}?run_sync=true", payload)
    try:
        return {"status": status, "response": json.loads(response)}
    except json.JSONDecodeError:  # MONAI Label's bare "Internal Server Error", for the test to show
        return {"status": status, "response": response.decode()}


def slicer_train_payload(info, model, max_epochs):
    """What the Slicer plugin posts: every trainer option at its default, lists at their first entry."""
    defaults = info["trainers"][model]["config"]
    payload = {k: v[0] if isinstance(v, list) else v for k, v in defaults.items()}
    payload["max_epochs"] = max_epochs
    return payload


def save_result_under_its_base_name(files, tmpdir):
    """MONAI Label 0.8.5's client saves a mask under the file name the server sends, which is the server's own
    absolute temporary path; with server and client on one machine the server deletes that file after it has
    answered, at times after the client wrote it there (seen in CI). Saved in the client's folder instead."""
    return _SAVE_RESULT({Path(name).name: data for name, data in files.items()}, tmpdir)


def main(server_url, model, study, refused_study, broken_study, labels_json, max_epochs, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    MONAILabelUtils.save_result = staticmethod(save_result_under_its_base_name)
    client = MONAILabelClient(server_url, tmpdir=str(out / "downloads"))
    info = client.info()
    (out / "info.json").write_text(json.dumps(info, indent=2))

    slicer_infer = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what the Slicer plugin asks for
    for name, params in (("before.nii.gz", {}), ("before.nrrd", slicer_infer)):
        mask, _ = client.infer(model, study, params)
        shutil.move(mask, out / name)
    for name, image_id in (("refused.txt", refused_study), ("broken.txt", broken_study)):
        try:
            client.infer(model, image_id, {})
            (out / name).write_text("answered with a mask")
        except MONAILabelClientException as err:  # what the Slicer plugin shows: "Message: {err.msg}"
            (out / name).write_text(err.msg)

    payload = slicer_train_payload(info, model, int(max_epochs))
    (out / "train_request.json").write_text(json.dumps(payload, indent=2))
    # before any label is saved: the bundle refuses the fine-tune (no labelled study)
    (out / "refused_train_status.json").write_text(json.dumps(fine_tune(client, model, payload), indent=2))
    answers = {"single": train_in_the_server(server_url, model, payload),  # torchrun, one CPU process:
               "multi_gpu": train_in_the_server(server_url, model, {**payload, **MULTI_GPU})}  # fmt: skip
    (out / "refused_sync_train.json").write_text(json.dumps(answers, indent=2))

    for image_id, label in json.loads(Path(labels_json).read_text()).items():
        client.save_label(image_id, label, tag="final")
    (out / "datastore.json").write_text(json.dumps(client.datastore(), indent=2))

    (out / "model_before.json").write_text(json.dumps(model_info(server_url, model)))
    (out / "train_status.json").write_text(json.dumps(fine_tune(client, model, payload), indent=2))
    (out / "model_after.json").write_text(json.dumps(model_info(server_url, model)))

    multi_gpu = train_in_the_server(server_url, model, {**payload, **MULTI_GPU})
    (out / "multi_gpu_train.json").write_text(json.dumps(multi_gpu))
    (out / "model_after_multi_gpu.json").write_text(json.dumps(model_info(server_url, model)))

    mask, _ = client.infer(model, study, {})  # with the weights of the last fine-tune
    shutil.move(mask, out / "after.nii.gz")


def fine_tune(client, model, payload):
    """Start a fine-tune and wait for it to end; its final status."""
    client.train_start(model, payload)
    # Poll the task's own status: ``check_if_running`` answers "not running" until the server has started the
    # training process, so right after the request it can end the wait before training has begun.
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    while (status := client.train_status())["status"] in ("SUBMITTED", "RUNNING"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"training still {status['status']} after {TRAIN_TIMEOUT_S} s")
        time.sleep(2)
    return status


if __name__ == "__main__":
    main(*sys.argv[1:])
