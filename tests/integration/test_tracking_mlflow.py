"""Experiment tracking: ``--tracking mlflow`` on train.json logs to a store under the run's output folder."""

import subprocess
import sys

import pytest
from conftest import BUNDLE, CONFIGS, TINY_TRAINING

from custom.crossval import override_arguments

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


@pytest.mark.integration
def test_mlflow_tracking_logs_params_losses_and_validation_metrics(tiny_phantom_dataset, tmp_path):
    output_dir = tmp_path / "logs"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "train.json"),
        "--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_phantom_dataset),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(output_dir), "--tracking", "mlflow",
        "--save_execute_config", str(output_dir / "config.json"), *override_arguments(TINY_TRAINING),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    assert not (tmp_path / "mlruns").exists(), "tracking must go under output_dir, not ./mlruns"
    store = output_dir / "mlruns.db"
    assert store.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("monai_experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["max_epochs"] == str(TINY_TRAINING["epochs"])
    assert {"train_loss", "val_mean_dice", "val_hd95_mm"} <= set(run.data.metrics)
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) >= TINY_TRAINING["epochs"]
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in dice)
    # docs/scaling.md: the executed config is an artifact (without --save_execute_config, a command-line
    # --output_dir left MONAI's artifact path '<output_dir> + '/config_<time>.json'', which is no file)
    assert [artifact.path for artifact in client.list_artifacts(run.info.run_id)] == ["config.json"]

    # TensorBoard still receives its scalars and images next to the MLflow store.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir)).Reload()
    assert {"train_loss", "val_mean_dice"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"]
