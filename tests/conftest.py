"""Shared fixtures: a tiny phantom converted by the real converter, reused by every test of a session."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"

# Bundle overrides that make one epoch take seconds on a CPU (the recipe is otherwise unchanged).
TINY_TRAINING = {
    "epochs": 2,
    "val_interval": 1,
    "warmup_epochs": 1,
    "num_workers": 0,
    "batch_size": 2,
    "samples_per_volume": 2,
    "patch_size": [32, 32],
}


def bundle_workflow(config_files, workflow_type, **override):
    """A ``ConfigWorkflow`` of the bundle's ``config_files`` (names under ``bundle/configs``) with ``override``."""
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        **override,
    )


def inference_network(**network_changes):
    """inference.json's ``network_def`` with ``network_changes`` (e.g. ``in_channels=4``), built on its own."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_file(CONFIGS / "inference.json"))
    for key, value in network_changes.items():
        parser[f"network_def#{key}"] = value
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="session")
def tiny_phantom_dataset(tmp_path_factory) -> Path:
    """A converted dataset of 8 training (2 folds) and 2 testing phantom cases, 64 x 64 in-plane."""
    from custom.data.isles2018 import prepare_isles2018
    from custom.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("phantom")
    raw = write_phantom(root / "isles2018", cases=8, test_cases=2, seed=3, size=64)
    return Path(
        prepare_isles2018(
            Path(raw) / "TRAINING",
            root / "dataset",
            patients=Path(raw) / "patients.csv",
            testing=Path(raw) / "TESTING",
            folds=2,
        )
    )
