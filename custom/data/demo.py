"""The built-in demo dataset: the synthetic CTP phantom, converted by the real ISLES 2018 converter."""

import logging
from pathlib import Path

from custom.data.isles2018 import prepare_isles2018
from custom.data.phantom import write_phantom
from custom.wording import counted

logger = logging.getLogger(__name__)


def ensure_demo_dataset(demo_dir, cases: int = 24, test_cases: int = 4, size: int = 256, seed: int = 0) -> str:
    """Return ``demo_dir/dataset``, generating the phantom and converting it on first use.

    Why it exists: ``configs/demo.json`` must run on a fresh clone without any download. The phantom is
    written in the ISLES 2018 layout to ``demo_dir/isles2018`` and converted with
    ``prepare_isles2018``, so every demo run also exercises the converter. Both steps write atomically,
    so an interrupted first run is simply redone.
    """
    demo_dir = Path(demo_dir)
    dataset_dir = demo_dir / "dataset"
    if (dataset_dir / "dataset.json").is_file():
        return str(dataset_dir)
    raw_dir = demo_dir / "isles2018"
    if not (raw_dir / "patients.csv").is_file():
        testing = counted(test_cases, "testing case")
        logger.info(f"generating the demo phantom ({cases} training, {testing}) in {raw_dir}")
        write_phantom(raw_dir, cases=cases, test_cases=test_cases, seed=seed, size=size, overwrite=True)
    logger.info(f"converting the demo phantom into {dataset_dir}")
    prepare_isles2018(
        raw_dir / "TRAINING",
        dataset_dir,
        patients=raw_dir / "patients.csv",
        testing=raw_dir / "TESTING",
        overwrite=True,
    )
    return str(dataset_dir)
