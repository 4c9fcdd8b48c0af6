"""``python -m custom``: folder and file names reach the commands as typed; numbers and flags stay numbers and flags;
a device is read as torch reads it, a GPU index as its CUDA device; a refusal is one line, a bug keeps its traceback."""

import functools
import importlib
import json
import importlib.util
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONFIGS, REPO

from custom.__main__ import COMMANDS, main


def _record_calls(monkeypatch, arguments: list[str]) -> list[dict]:
    """Replace the function of the command that ``arguments`` run ("check ...", "perfusion maps ...") by one of the
    same signature that records the arguments Fire calls it with."""
    target = COMMANDS[arguments[0]]
    if isinstance(target, dict):
        target = target[arguments[1]]
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)
    calls = []

    @functools.wraps(original)
    def record(*args, **kwargs):
        calls.append(dict(inspect.signature(original).bind(*args, **kwargs).arguments))

    monkeypatch.setattr(module, name, record)
    return calls


@pytest.mark.parametrize(
    "arguments, received",
    [
        (["phantom", "2018_01"], {"out": "2018_01"}),
        (["prepare", "isles2018", "1e3", "--dst=None", "--testing", "0x10"],
         {"src": "1e3", "dst": "None", "testing": "0x10"}),
        (["check", "--dataset-dir", "True"], {"dataset_dir": "True"}),
        (["figure", "2018_01", "[1]", "--case", "007"], {"dataset_dir": "2018_01", "out": "[1]", "case": "007"}),
        (["cv", "2018_01", "--out", "2024_05_01"], {"dataset_dir": "2018_01", "out": "2024_05_01"}),
        (["ablation", "--out=2024_05_01", "2018_01", "--variants", "ce,gdl"],
         {"out": "2024_05_01", "dataset_dir": "2018_01", "variants": "ce,gdl"}),
        (["score-masks", "1_0", "2018_01", "None"], {"masks": "1_0", "dataset_dir": "2018_01", "out": "None"}),
        (["ensemble-bench", "1_0", "2018_01", "--out", "2024_05_01"],
         {"cv_dir": "1_0", "dataset_dir": "2018_01", "out": "2024_05_01"}),
        (["ensemble-checkpoint", "1e3", "0x10", "--out", "2018_01"],
         {"checkpoints": ("1e3", "0x10"), "out": "2018_01"}),
        (["package", "2024_05_01"], {"out": "2024_05_01"}),
        (["monailabel-app", "2018_01", "--ckpt_path", "1e3"], {"app_dir": "2018_01", "ckpt_path": "1e3"}),
        (["perfusion", "maps", "2018_01", "None"], {"series": "2018_01", "out": "None"}),
        (["bench", "-o", "2018_01"], {"out": "2018_01"}),  # Fire's one-letter shortcut of the only option with o
    ],
)
def test_names_reach_the_command_as_typed(monkeypatch, arguments, received):
    """Fire reads every value as a Python literal: ``prepare isles2018 SRC 2018_01`` wrote the dataset to the
    folder ``201801`` (or failed deep in pathlib on an int), ``1e3`` became 1000.0, ``None`` the default."""
    calls = _record_calls(monkeypatch, arguments)
    main(arguments)
    assert len(calls) == 1
    assert {key: calls[0][key] for key in received} == received


@pytest.mark.parametrize(
    "arguments, received",
    [
        (["phantom", "x", "--cases", "8", "--overwrite", "True", "--pwi"],
         {"cases": 8, "overwrite": True, "pwi": True}),
        (["prepare", "isles2018", "a", "b", "--folds=3", "--dt", "0.5"], {"folds": 3, "dt": 0.5}),
        (["figure", "a", "b", "--slice_index", "-1"], {"slice_index": -1}),
        (["cv", "a", "b", "--folds", "2", "--epochs", "300", "--learning_rate", "3e-4", "--patch_size", "[128, 128]"],
         {"folds": 2, "overrides": {"epochs": 300, "learning_rate": 3e-4, "patch_size": [128, 128]}}),
        (["accuracy-bench", "--budget_s=720", "--quick", "--epochs", "300"],
         {"budget_s": 720, "quick": True, "bundle_overrides": {"epochs": 300}}),
        (["perfusion", "bench", "--size", "64", "--threads", "1"], {"size": 64, "threads": 1}),
    ],
)
def test_numbers_flags_and_overrides_are_read_as_values(monkeypatch, arguments, received):
    """Only names are kept as text: numeric and bool options, lists and bundle overrides (passed on to
    ``monai.bundle run`` as Python literals, ``custom.crossval.override_arguments``) are read as before."""
    calls = _record_calls(monkeypatch, arguments)
    main(arguments)
    assert len(calls) == 1
    assert {key: calls[0][key] for key in received} == received
    for key, value in received.items():
        assert type(calls[0][key]) is type(value), key


def test_a_folder_named_like_a_number_is_written_under_its_name(tmp_path, monkeypatch):
    """A real run: ``phantom 2018_01`` failed deep in pathlib (``expected str ... not int``) before."""
    monkeypatch.chdir(tmp_path)
    main(["phantom", "2018_01", "--cases", "1", "--test_cases", "0", "--size", "32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2018_01"]
    assert (tmp_path / "2018_01" / "TRAINING" / "case_1").is_dir()


@pytest.mark.parametrize(
    "value", ["2018_01", "1e3", "None", "runs/fold0", "$@network_def", 300, 3e-4, [128, 128], True]
)
def test_bundle_overrides_reach_monai_bundle_run_as_they_are(value):
    """cv and accuracy-bench pass the bundle's settings on to ``monai.bundle run``, whose Fire reads each value as a
    literal: a text was passed on as it was, so ``cv --dataset_dir 2018_01`` trained on the number 201801."""
    from fire.parser import DefaultParseValue

    from custom.crossval import override_arguments

    key, argument = override_arguments({"dataset_dir": value})
    assert key == "--dataset_dir" and DefaultParseValue(argument) == value
    assert type(DefaultParseValue(argument)) is type(value)


@pytest.mark.parametrize(
    "arguments, refusal",
    [
        (["score-masks", "{tmp}/masks", "{tmp}/dataset", "{tmp}/out"], "dataset_dir '{tmp}/dataset' does not exist"),
        (["prepare", "isles2018", "{tmp}/missing", "{tmp}/dataset"], "'{tmp}/missing' is not a folder"),
        (["compare-cv", "{tmp}/a", "{tmp}/b"], "per-case metrics file not found: {tmp}/a/cases.csv"),
        (["deploy", "{tmp}/missing.nii.gz"], "input '{tmp}/missing.nii.gz' does not exist"),
        pytest.param(
            ["onnx", "--ckpt", "{tmp}/model.pt", "--out", "{tmp}/model.onnx", "--config", f"{CONFIGS}/inference.json",
             "--meta", f"{CONFIGS}/metadata.json"], "the folder of --out '{tmp}' holds 1 file(s) of an earlier run",
            marks=pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx extra is missing"),
        ),
        # refusals raised as KeyError and RuntimeError up to 0.3.13, so printed after a traceback
        (["score-masks", "{tmp}/masks", "{tmp}", "{tmp}/out"], "'{tmp}/dataset.json' has no 'training' key"),
        pytest.param(
            ["onnx", "--ckpt", "{tmp}/model.pt", "--out", "{tmp}/new.onnx", "--config", f"{CONFIGS}/inference.json",
             "--meta", f"{CONFIGS}/metadata.json"], "checkpoint '{tmp}/model.pt' is refused by safe loading",
            marks=pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx extra is missing"),
        ),
    ],
    ids=["score-masks", "prepare isles2018", "compare-cv", "deploy", "onnx", "dataset.json key", "checkpoint"],
)
def test_a_refusal_exits_with_one_line_naming_the_command(tmp_path, arguments, refusal):
    """A refusal (a missing input, an existing output) came after a full traceback, its message only the last line:
    it is now ``python -m custom <command>: error: <message>`` and exit status 1 (``sys.exit`` of the message)."""
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")
    (tmp_path / "dataset.json").write_text("{}")
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    with pytest.raises(SystemExit) as refused:
        main(arguments)
    words = arguments[:2] if arguments[0] == "prepare" else arguments[:1]
    message = refused.value.code
    assert isinstance(message, str) and message.startswith(f"python -m custom {' '.join(words)}: error: "), message
    assert refusal.replace("{tmp}", str(tmp_path)) in message
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"


def test_a_refusal_prints_no_traceback_unless_asked(tmp_path):
    """The process: one line on stderr and exit status 1; ``CTP_TRACEBACK=1`` shows the traceback."""
    command = [sys.executable, "-m", "custom", "score-masks", *(str(tmp_path / name) for name in ("m", "d", "o"))]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"python -m custom score-masks: error: dataset_dir '{tmp_path / 'd'}' does not exist "
        "(convert data with `python -m custom prepare`)"
    ]
    with_traceback = {**os.environ, "CTP_TRACEBACK": "1"}
    traced = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=with_traceback)
    assert traced.returncode == 1
    assert "Traceback (most recent call last)" in traced.stderr
    assert f"FileNotFoundError: dataset_dir '{tmp_path / 'd'}' does not exist" in traced.stderr


def _library_error(dataset_dir: str):
    np.quantile([1.0], 2.0)  # numpy raises a ValueError: a bug of the caller, not a refusal of the project


def _failing(error: BaseException):
    def command(dataset_dir: str):
        raise error

    return command


@pytest.mark.parametrize(
    "command, error",
    [(_failing(TypeError("a bug")), TypeError), (_failing(KeyError("a bug")), KeyError),
     (_failing(ValueError("raised outside the project")), ValueError), (_library_error, ValueError)],
    ids=["TypeError", "KeyError", "ValueError of other code", "ValueError of a library"],
)
def test_an_unexpected_error_keeps_its_traceback(monkeypatch, command, error):
    """Only the project's own refusals become one line: a programming error propagates with its traceback."""
    monkeypatch.setattr(importlib.import_module("custom.data.check"), "check_dataset_command", command)
    with pytest.raises(error):
        main(["check", "somewhere"])


def _machine_with_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(
    "arguments, device",
    [
        (["ensemble-bench", "a", "b", "c", "--device", "1"], "cuda:1"),
        (["perfusion", "bench", "--device=0"], "cuda:0"),
        (["perfusion", "maps", "s", "o", "--device", "cuda:1"], "cuda:1"),
        (["perfusion", "maps", "s", "o", "--device", "cuda"], "cuda"),
        (["perfusion", "maps", "s", "o", "--device", "cpu"], "cpu"),
        (["deploy", "x.nii.gz", "--device", "1"], "cuda:1"),
    ],
    ids=["ensemble-bench 1", "perfusion bench =0", "perfusion maps cuda:1", "perfusion maps cuda", "perfusion maps cpu",
         "deploy 1"],
)
def test_a_gpu_index_reaches_the_command_as_its_cuda_device(monkeypatch, arguments, device):
    """Fire read ``--device 0`` as the number 0 (torch: ``cuda:0``); kept as typed, the text ``"0"`` reached the
    commands, and ``torch.device("0")`` refuses it (``Invalid device string: '0'``). Two GPUs simulated."""
    _machine_with_gpus(monkeypatch, 2)
    calls = _record_calls(monkeypatch, arguments)
    main(arguments)
    assert len(calls) == 1 and str(calls[0]["device"]) == device


@pytest.mark.parametrize("command", [["ensemble-bench", "a", "b", "c"], ["perfusion", "bench"], ["deploy", "x.nii.gz"]],
                         ids=["ensemble-bench", "perfusion bench", "deploy"])
@pytest.mark.parametrize(
    "device, refusal",
    [("0", "--device '0': this machine's PyTorch sees 0 CUDA device(s) (use cpu)"),
     ("cuda", "--device 'cuda': this machine's PyTorch sees 0 CUDA device(s) (use cpu)"),
     ("gpu", "--device 'gpu' is not a torch device (use cpu): ")],
    ids=["0", "cuda", "gpu"],
)
def test_a_device_this_machine_lacks_is_refused_naming_the_option(monkeypatch, command, device, refusal):
    """Refused before the command runs, naming ``--device`` and the devices to use (no GPU simulated)."""
    _machine_with_gpus(monkeypatch, 0)
    calls = _record_calls(monkeypatch, command)
    with pytest.raises(SystemExit) as refused:
        main([*command, "--device", device])
    assert refusal in refused.value.code
    assert calls == []


def test_a_summary_is_printed_once_as_strict_json(tmp_path, capsys):
    """``perfusion accuracy`` printed its summary as JSON, then Fire printed the returned dict again key by key;
    ``perfusion bench`` printed only Fire's dump. A summary is printed once, as one JSON line, and the written file
    holds no ``NaN`` (one case has no volume correlation), which strict JSON readers refuse."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    out = tmp_path / "accuracy.json"
    main(["perfusion", "accuracy", "--cases", "1", "--size", "64", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    summary = json.loads(out.read_text(), parse_constant=refuse)
    assert summary["tmax6"]["volume_r"] is None
    assert json.loads(printed[-1], parse_constant=refuse) == {k: v for k, v in summary.items() if k != "maps"}
    assert not any(line.startswith(("cases:", "tmax6:")) for line in printed)

    threads = torch.get_num_threads()
    main(["perfusion", "bench", "--size", "48", "--slices", "2", "--frames", "40", "--repeats", "1", "--threads",
          str(threads + 1)])  # fmt: skip
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and json.loads(printed[0])["shape"] == [48, 48, 2, 40]
    assert json.loads(printed[0])["torch_threads"] == threads + 1
    # the caller's threads are restored: the tests after this one ran with 1 thread, the subprocess of
    # test_kill_9_then_resume_continues_with_the_same_state with all, and their Dice differed in the 5th digit
    assert torch.get_num_threads() == threads


def test_a_written_path_is_printed_once_as_the_last_line(tmp_path, capsys):
    """``prepare`` and ``ensemble-checkpoint`` printed the path they wrote in a line of their own, then Fire printed
    the returned path again. Each command prints it once, as its last line (where a script takes it from), after a
    summary whose counts are worded in the right number ("1 testing case")."""
    from monai.networks.nets import UNet

    from custom.deploy import RUNNER_INPUT_SETTINGS

    raw, dataset, ensemble = tmp_path / "raw", tmp_path / "dataset", tmp_path / "ensemble.pt"
    network = {"_target_": "UNet", "spatial_dims": 2, "in_channels": 5, "out_channels": 2, "channels": [4, 8],
               "strides": [2], "num_res_units": 1, "norm": "instance"}  # fmt: skip
    (tmp_path / "tiny.json").write_text(json.dumps({"network_def": network, **RUNNER_INPUT_SETTINGS}))  # 5 channels
    members = [str(tmp_path / f"fold{k}.pt") for k in (0, 1)]
    for member in members:
        torch.save(UNet(**{k: v for k, v in network.items() if k != "_target_"}).state_dict(), member)
    for arguments, written, summary in (
        (["phantom", str(raw), "--cases", "4", "--test_cases", "1", "--size", "32"], raw, "[5/5] case_5"),
        (["prepare", "isles2018", str(raw / "TRAINING"), str(dataset), "--patients", str(raw / "patients.csv"),
          "--folds", "2", "--testing", str(raw / "TESTING")], dataset,
         "converted 4 training cases in 2 folds and 1 testing case"),
        (["ensemble-checkpoint", *members, "--out", str(ensemble), "--config_file", str(tmp_path / "tiny.json")],
         ensemble, "ensemble checkpoint of 2 members"),
    ):  # fmt: skip
        main(arguments)
        printed = capsys.readouterr().out
        lines = printed.splitlines()
        assert printed.count(str(written)) == 1, printed
        assert lines[-1] == str(written) and lines[-2].startswith(summary)


@pytest.mark.parametrize(
    "count, noun, plural, worded",
    [(1, "testing case", None, "1 testing case"), (2, "testing case", None, "2 testing cases"),
     (0, "fold", None, "0 folds"), (1, "study", "studies", "1 study"), (2, "study", "studies", "2 studies")],
)
def test_counts_are_worded_in_the_right_number(count, noun, plural, worded):
    """Messages printed "1 testing cases" and "fine-tuned in MONAI Label on 1 studies"."""
    from custom.wording import counted

    assert counted(count, noun, plural) == worded
