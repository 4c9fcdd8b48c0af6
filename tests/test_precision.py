"""Mixed precision: train.json and inference.json turn AMP on for CUDA and off on CPU."""

import math

import pytest
import torch
from conftest import BUNDLE, CONFIGS, TINY_TRAINING
from monai.bundle import ConfigParser, ConfigWorkflow


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_amp_is_on_exactly_when_the_device_is_cuda(config):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    assert parser.get_parsed_content("amp") is (parser.get_parsed_content("device").type == "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_validation_run_with_amp_on_cuda(tiny_phantom_dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type="train", bundle_root=str(BUNDLE), dataset_dir=str(tiny_phantom_dataset),
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "logs"), **{**TINY_TRAINING, "epochs": 1},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert trainer.amp and evaluator.amp
    workflow.run()
    assert math.isfinite(trainer.state.metrics["train_loss"])
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
