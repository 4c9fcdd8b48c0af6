"""Shared fixtures: a tiny phantom converted by the real converter, reused by every test of a session."""

import errno
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
NOT_THE_CHECKOUT = {".git", ".venv", "__pycache__", ".pytest_cache"}  # tools' folders, not the project's files

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


def refuse_listing(monkeypatch, locked: Path) -> None:
    """Make listing the folder ``locked`` fail as for another user's folder (mode 700): the tests run as root, whom
    permission bits do not stop."""
    iterdir = Path.iterdir

    def iterdir_refusing_locked(folder):
        if folder == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return iterdir(folder)

    monkeypatch.setattr(Path, "iterdir", iterdir_refusing_locked)


def error_chain(error: BaseException) -> str:
    """The messages of an exception and of its causes (MONAI wraps errors raised while parsing a config)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return "\n".join(messages)


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


def _checkout_files() -> dict[str, tuple[int, int]]:
    files = {}
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO)
        tool_folder = NOT_THE_CHECKOUT & set(relative.parts) or relative.parts[0].endswith(".egg-info")
        if path.is_file() and not tool_folder:
            status = path.stat()
            files[str(relative)] = (status.st_size, status.st_mtime_ns)
    return files


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_it_was():
    """Tests write under their tmp_path only: no file of the checkout is added or changed by a test session.

    A test that built train.json's trainer with the default folders once wrote TensorBoard files into
    bundle/runs/fold0/logs, and the next session's run of it was refused for them."""
    before = _checkout_files()
    yield
    after = _checkout_files()
    touched = sorted(name for name in after if before.get(name) != after[name])
    assert not touched, f"the test session added or changed files of the checkout: {touched}"
