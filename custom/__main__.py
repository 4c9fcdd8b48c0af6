"""Command line of the project: ``python -m custom <command> --help`` lists each command's options.

Only the module of the command being run is imported, so ``python -m custom deploy`` works where MONAI
is not installed (it needs torch, numpy and nibabel only).
"""

import importlib
import sys

import fire

COMMANDS = {
    "phantom": "custom.data.phantom:write_phantom",
    "prepare": {"isles2018": "custom.data.isles2018:prepare_isles2018"},
    "check": "custom.data.check:check_dataset_command",
    "figure": "custom.data.figure:phantom_figure",
    "cv": "custom.crossval:run_cross_validation",
    "ablation": "custom.ablation:run_ablation",
    "curves": "custom.result_figures:plot_curves",
    "montage": "custom.result_figures:plot_montage",
    "baseline": "custom.baseline:run_baseline",
    "deploy": "custom.deploy:deploy",
    "onnx": "custom.onnx_export:export_onnx",
    "package": "custom.package:package_bundle",
    "bench": "custom.bench:bench",
}


def _resolve(target):
    if isinstance(target, dict):
        return {name: _resolve(sub) for name, sub in target.items()}
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
    fire.Fire(_resolve(selected), command=argv, name="python -m custom")


if __name__ == "__main__":
    main()
