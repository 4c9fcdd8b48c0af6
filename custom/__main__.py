"""Command line of the project: ``python -m custom <command> --help`` lists each command's options.

Only the module of the command being run is imported, so ``python -m custom deploy`` works where MONAI
is not installed (it needs torch, numpy, scipy and nibabel only).
"""

import importlib
import inspect
import sys

import fire

COMMANDS = {
    "phantom": "custom.data.phantom:write_phantom",
    "prepare": {"isles2018": "custom.data.isles2018:prepare_isles2018"},
    "check": "custom.data.check:check_dataset_command",
    "figure": "custom.data.figure:phantom_figure",
    "phantom-ceiling": "custom.data.ceiling:phantom_ceiling",
    "cv": "custom.crossval:run_cross_validation",
    "ablation": "custom.ablation:run_ablation",
    "compare-cv": "custom.ablation:compare_cross_validations",
    "curves": "custom.result_figures:plot_curves",
    "montage": "custom.result_figures:plot_montage",
    "baseline": "custom.baseline:run_baseline",
    "accuracy-bench": "custom.accuracy_bench:run_accuracy_bench",
    "score-masks": "custom.accuracy_bench:score_masks_command",
    "ensemble-bench": "custom.ensemble_bench:run_ensemble_bench",
    "ensemble-checkpoint": "custom.ensemble:write_ensemble_checkpoint",
    "deploy": "custom.deploy:deploy",
    "onnx": "custom.onnx_export:export_onnx",
    "package": "custom.package:package_bundle",
    "perfusion": {
        "maps": "custom.perfusion.commands:maps",
        "bench": "custom.perfusion.commands:benchmark",
        "accuracy": "custom.perfusion.commands:accuracy",
        "compare-segmentation": "custom.perfusion.compare:compare_segmentation",
    },
    "monailabel-app": "custom.monailabel_app:prepare_monailabel_app",
    "bench": "custom.bench:bench",
}


def _resolve(target):
    if isinstance(target, dict):
        return {name: _resolve(sub) for name, sub in target.items()}
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def refuse_unknown_options(function, arguments: list[str]) -> None:
    """Fire calls a command before it complains about an option the command does not take (``prepare ...
    --foldz 3`` converts with the default folds, then fails): refuse such options before anything runs."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # the command takes any option (bundle overrides); it checks them itself
    names = set(parameters) | {name.replace("_", "-") for name in parameters}
    own_options = arguments[: arguments.index("--")] if "--" in arguments else arguments  # after "--": Fire's flags
    for argument in own_options:
        name = argument[2:].split("=")[0]
        if argument.startswith("--") and name != "help" and name not in names and name.removeprefix("no") not in names:
            options = [f"--{p.name}" for p in parameters.values() if p.kind is not p.VAR_POSITIONAL]
            raise SystemExit(f"python -m custom: unknown option '--{name}'; options: {', '.join(options)}")


def help_to_fire(arguments: list[str]) -> list[str]:
    """A command taking ``**overrides`` would receive ``--help`` as an override and run (``accuracy-bench --help``
    started a benchmark): when ``--help``/``-h`` is asked for, keep only the command's name and hand Fire its own
    ``-- --help``."""
    own_options = arguments[: arguments.index("--")] if "--" in arguments else arguments
    if not {"--help", "-h"} & set(own_options):
        return arguments
    command = arguments[:1]
    group = COMMANDS.get(arguments[0]) if arguments else None
    if isinstance(group, dict) and len(arguments) > 1 and arguments[1] in group:
        command = arguments[:2]
    return [*command, "--", "--help"]


def printed_result(result):
    """What Fire prints after a command: the rows a command returns for Python callers (a list) are not
    printed again, line by line as JSON, after the table the command printed itself; a path or a number is."""
    return None if isinstance(result, list) else result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["deploy"]:  # the runner's own command line: argparse keeps paths as typed, Fire does not
        from custom.deploy import main as deploy_command_line

        return deploy_command_line(argv[1:], prog="python -m custom deploy")
    argv = help_to_fire(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    if isinstance(command, dict) and len(argv) > 1 and argv[1] in command:
        refuse_unknown_options(_resolve(command[argv[1]]), argv[2:])
    elif isinstance(command, str):
        refuse_unknown_options(_resolve(command), argv[1:])
    selected = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
    fire.Fire(_resolve(selected), command=argv, name="python -m custom", serialize=printed_result)


if __name__ == "__main__":
    main()
