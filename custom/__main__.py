"""Command line of the project: ``python -m custom <command> --help`` lists each command's options.

Only the module of the command being run is imported, with ``custom.deploy`` (its refusal and device rules are every
command's), so ``python -m custom deploy`` works where MONAI is not installed (it needs torch, numpy, scipy and
nibabel only).

A refusal of a command (``custom.deploy.is_refusal``: a ValueError or OSError raised by a ``raise`` statement of the
project, such as a missing input folder or an existing output) exits with status 1 and prints one line,
``python -m custom <command>: error: <message>``; any other exception keeps its traceback, and ``CTP_TRACEBACK=1``
shows the traceback of refusals too.
"""

import importlib
import inspect
import os
import re
import sys
import types
import typing

import fire

from custom.deploy import refusals_exit, usable_device
from custom.deploy import main as deploy_command_line

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


def own_arguments(arguments: list[str]) -> list[str]:
    """A command's own arguments: those before ``--`` (after it come Fire's flags, such as ``--help``)."""
    return arguments[: arguments.index("--")] if "--" in arguments else arguments


def is_name(annotation) -> bool:
    """Whether a parameter so annotated takes a name: ``str`` or a path type, optionally ``| None``, or
    ``str | list[str]`` (comma-separated on the command line)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [kind for kind in (typing.get_args(annotation) if union else (annotation,)) if kind is not type(None)]
    return bool(kinds) and all(
        kind is str or kind == list[str] or (isinstance(kind, type) and issubclass(kind, os.PathLike)) for kind in kinds
    )


def _is_flag(argument: str) -> bool:
    """As Fire tells an option from a value (``fire.core._IsFlag``): ``-5`` is a value, ``-o`` an option."""
    return argument.startswith("--") or re.match("-[a-zA-Z]", argument) is not None


def names_as_typed(function, arguments: list[str]) -> list[str]:
    """Fire reads every value as a Python literal (``fire.parser.DefaultParseValue``): a folder typed as ``2018_01``
    reached the command as the number 201801, ``1e3`` as 1000.0, ``None`` as None. Hand Fire the values of the
    parameters annotated as names (``is_name``) as quoted literals, which it reads back as the text typed:
    positional, ``--name value``, ``--name=value``, ``--na-me``, ``-n`` spellings matched to parameters as Fire matches
    them; a ``device`` is read as the runner reads it (``_as_typed``). The other values (numbers, flags,
    ``**overrides``) are left to Fire."""
    parameters = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    names = {name for name in parameters if is_name(hints.get(name))}
    options = [p.name for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any_option = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    quoted, given, positional = list(arguments), set(), []
    own, index = len(own_arguments(arguments)), 0
    while index < own:
        argument = arguments[index]
        if not _is_flag(argument):
            positional.append(index)
        else:
            key, equals, value = argument.lstrip("-").partition("=")
            key = key.replace("-", "_")
            shortcut = [name for name in options if name.startswith(key)]
            if len(key) == 1 and key not in options and not takes_any_option and len(shortcut) == 1:
                key = shortcut[0]  # Fire's one-letter shortcut of the only parameter starting with it
            given.add(key)
            if equals and key in names:
                quoted[index] = f"{argument.partition('=')[0]}={_as_typed(key, value)}"
            elif not equals and index + 1 < own and not _is_flag(arguments[index + 1]):
                index += 1  # the option's value
                if key in names:
                    quoted[index] = _as_typed(key, arguments[index])
        index += 1
    # Fire fills the parameters not given as options in order with the positional values, the rest go to *args
    slots = [p for p in parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in given]
    slots += [p for p in parameters.values() if p.kind is p.VAR_POSITIONAL] * len(positional)
    for parameter, index in zip(slots, positional):
        if parameter.name in names:
            quoted[index] = _as_typed(parameter.name, arguments[index])
    return quoted


def _as_typed(name: str, value: str) -> str:
    """The literal Fire reads back as the text ``value`` of the parameter ``name``. A ``device`` is first read by
    ``custom.deploy.usable_device`` as the runner reads ``--device`` (a bare GPU index N is ``cuda:N``, as Fire's
    number 0 was to torch; a device this machine lacks is refused naming the option), so a command receives a text
    ``torch.device`` takes (``"cuda:0"``, not ``"0"``, which it refuses)."""
    if name == "device":
        value = str(usable_device(value, "--device", gpu_index=True))
    return repr(value)


def refuse_unknown_options(function, arguments: list[str]) -> None:
    """Fire calls a command before it complains about an option the command does not take (``prepare ...
    --foldz 3`` converts with the default folds, then fails): refuse such options before anything runs (a ValueError,
    which ``main`` prints as a refusal)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # the command takes any option (bundle overrides); it checks them itself
    names = set(parameters) | {name.replace("_", "-") for name in parameters}
    for argument in own_arguments(arguments):
        name = argument[2:].split("=")[0]
        if argument.startswith("--") and name != "help" and name not in names and name.removeprefix("no") not in names:
            options = [f"--{p.name}" for p in parameters.values() if p.kind is not p.VAR_POSITIONAL]
            raise ValueError(f"unknown option '--{name}'; options: {', '.join(options)}")


def help_to_fire(arguments: list[str]) -> list[str]:
    """A command taking ``**overrides`` would receive ``--help`` as an override and run (``accuracy-bench --help``
    started a benchmark): when ``--help``/``-h`` is asked for, keep only the command's name and hand Fire its own
    ``-- --help``."""
    if not {"--help", "-h"} & set(own_arguments(arguments)):
        return arguments
    command = arguments[:1]
    group = COMMANDS.get(arguments[0]) if arguments else None
    if isinstance(group, dict) and len(arguments) > 1 and arguments[1] in group:
        command = arguments[:2]
    return [*command, "--", "--help"]


def printed_result(result):
    """What Fire prints after a command: the rows or the summary a command returns for Python callers (a list, a
    dict) are not printed again, line by line, after the table or JSON line the command printed itself (``perfusion
    accuracy`` printed its summary twice); a path or a number is."""
    return None if isinstance(result, (list, dict)) else result


def main(argv=None):
    """Run the command ``argv`` (default: ``sys.argv[1:]``); a refusal exits with its one-line message (module
    docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["deploy"]:  # the runner's own command line: argparse keeps paths as typed, Fire does not
        return deploy_command_line(argv[1:], prog="python -m custom deploy")
    argv = help_to_fire(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    path = 2 if isinstance(command, dict) else 1  # the words naming the command: "check", "prepare isles2018"
    target = command.get(argv[1]) if path == 2 and len(argv) > 1 else command
    with refusals_exit(" ".join(["python -m custom", *argv[:path]])):
        if isinstance(target, str):
            function = _resolve(target)
            refuse_unknown_options(function, argv[path:])
            argv = argv[:path] + names_as_typed(function, argv[path:])
        selected = {argv[0]: COMMANDS[argv[0]]} if argv and argv[0] in COMMANDS else COMMANDS
        fire.Fire(_resolve(selected), command=argv, name="python -m custom", serialize=printed_result)


if __name__ == "__main__":
    main()
