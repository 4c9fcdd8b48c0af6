"""Distributed evaluation (torchrun, 2 gloo processes on CPU) gives the single-process evaluation's metrics."""

import csv
import os
import subprocess
import sys

import pytest
from conftest import BUNDLE, CONFIGS, REPO

SHIPPED_MODEL = BUNDLE / "models" / "model.pt"


def _evaluate(dataset_dir, output_dir, processes: int) -> None:
    configs = ["train.json", "evaluate.json"] + (["multi_gpu_evaluate.json"] if processes > 1 else [])
    launcher = [sys.executable, "-m", "monai.bundle", "run"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "monai.bundle", "run"]
    command = launcher + [
        "--config_file", str([str(CONFIGS / c) for c in configs]), "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(dataset_dir), "--ckpt_path", str(SHIPPED_MODEL), "--output_dir", str(output_dir),
        "--num_workers", "0",
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


def _summary(output_dir) -> dict[str, float]:
    """``metrics.csv`` of MetricsSaver: one ``name,value`` line per metric."""
    with open(output_dir / "metrics.csv") as f:
        return {row[0]: float(row[1]) for row in csv.reader(f)}


def _per_case(output_dir, metric: str) -> dict[str, float]:
    with open(output_dir / f"{metric}_raw.csv") as f:
        return {row["filename"]: float(row["mean"]) for row in csv.DictReader(f)}


@pytest.mark.integration
def test_distributed_evaluation_matches_single_process(tiny_phantom_dataset, tmp_path):
    _evaluate(tiny_phantom_dataset, tmp_path / "single", processes=1)
    _evaluate(tiny_phantom_dataset, tmp_path / "distributed", processes=2)

    single, distributed = _summary(tmp_path / "single"), _summary(tmp_path / "distributed")
    assert set(single) == set(distributed) and "val_mean_dice" in single
    assert distributed == pytest.approx(single, rel=1e-6, nan_ok=True)
    per_case = _per_case(tmp_path / "single", "val_mean_dice")
    assert _per_case(tmp_path / "distributed", "val_mean_dice") == pytest.approx(per_case, rel=1e-6)
    # Validation cases of fold 0 are split over the two ranks: each rank sees only part of them.
    assert len(per_case) >= 2 and len(set(per_case.values())) > 1, "the check needs cases with different Dice"


# Run in a child process: a process group and Ignite's distributed state must not leak into the other tests.
PROCESS_GROUP_REFERENCES = """
import gc, json, sys
import torch.distributed as dist
from monai.bundle import ConfigWorkflow

configs, meta_file, bundle_root, overrides = json.loads(sys.argv[1])
workflow = ConfigWorkflow(config_file=configs, meta_file=meta_file, logging_file=False, workflow_type="infer",
                          bundle_root=bundle_root, **overrides)
workflow.initialize()
group = dist.group.WORLD
workflow.run()
workflow.finalize()
gc.collect()
assert not dist.is_initialized()
print("references", sys.getrefcount(group) - 2)  # less getrefcount's argument and the name `group`
"""


@pytest.mark.integration
def test_distributed_evaluation_leaves_no_process_group_alive(tiny_phantom_dataset, tmp_path):
    """After ``finalize`` nothing holds the gloo process group, so it is torn down while Python is alive.

    A process group that outlives ``destroy_process_group`` (a ``DistributedDataParallel`` wrapper keeps a
    reference) is freed during interpreter shutdown, where gloo's threads can abort the process
    ("terminate called without an active exception", exit -6) after a successful evaluation."""
    import json
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                   "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    configs = [str(CONFIGS / c) for c in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    overrides = {"dataset_dir": str(tiny_phantom_dataset), "ckpt_path": str(SHIPPED_MODEL),
                 "output_dir": str(tmp_path / "eval"), "num_workers": 0}
    arguments = json.dumps([configs, str(CONFIGS / "metadata.json"), str(BUNDLE), overrides])
    completed = subprocess.run([sys.executable, "-c", PROCESS_GROUP_REFERENCES, arguments],
                               capture_output=True, text=True, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert (tmp_path / "eval" / "metrics.csv").is_file()
    assert "references 0" in completed.stdout.splitlines()


# Two ranks checking one output folder; rank 1 reaches the check late, rank 0 then writes its first case's mask.
RANKS_CHECK_ONE_FOLDER = """
import sys, time
from pathlib import Path
import torch.distributed as dist
from custom.config_check import check_evaluation_dir

output_dir, image = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    time.sleep(2)  # a rank that starts late (slower start-up, slower reads of the dataset)
check_evaluation_dir(output_dir, [image], ["val_mean_dice"], save_masks=True)
if dist.get_rank() == 0:  # evaluation begins: SaveImaged writes this run's mask of the first case
    (output_dir / "masks").mkdir(parents=True, exist_ok=True)
    (output_dir / "masks" / "case_1_seg.nii.gz").write_bytes(b"this run's mask")
dist.barrier()
dist.destroy_process_group()
"""


def test_every_rank_checks_the_evaluation_folder_before_any_rank_writes(tmp_path):
    """multi_gpu_evaluate.json: every rank checks the output folder; a rank that got there after another had
    written its first mask refused the run for that mask, as an earlier run's, leaving a half-written folder."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_CHECK_ONE_FOLDER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path / "eval"), str(tmp_path / "case_1.nii.gz")]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's custom package
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
