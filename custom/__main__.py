"""Command line of the project: ``python -m custom <command> --help`` lists each command's options."""

import fire

from custom.baseline import run_baseline
from custom.crossval import run_cross_validation
from custom.data.check import check_dataset_command
from custom.data.figure import phantom_figure
from custom.data.isles2018 import prepare_isles2018
from custom.data.phantom import write_phantom
from custom.deploy import deploy
from custom.package import package_bundle

COMMANDS = {
    "phantom": write_phantom,
    "prepare": {"isles2018": prepare_isles2018},
    "check": check_dataset_command,
    "figure": phantom_figure,
    "cv": run_cross_validation,
    "baseline": run_baseline,
    "deploy": deploy,
    "package": package_bundle,
}


def main():
    fire.Fire(COMMANDS, name="python -m custom")


if __name__ == "__main__":
    main()
