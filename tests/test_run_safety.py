"""Run safety: settings checked by name, same seed same losses, no code run from checkpoints, no network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE, CONFIGS, REPO, TINY_TRAINING, bundle_workflow, error_chain
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from monai.handlers import from_engine
from monai.networks.nets import UNet

from custom.crossval import override_arguments
from custom.ensemble import ProbabilityEnsemble
from custom.handlers import NamedCheckpointLoader, RefuseNonFiniteLoss, load_network_checkpoint


def _bundle_run(*arguments, env=None):
    command = [sys.executable, "-m", "monai.bundle", "run", *arguments]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)


@pytest.mark.parametrize(
    "config_files, workflow_type, override, message",
    [
        (["train.json"], "train", {"epochs": "abc"}, "config id 'epochs' must be a whole number >= 1, got 'abc'"),
        (["train.json"], "train", {"patch_size": [30, 30]}, "config id 'patch_size' must be two whole numbers"),
        (["train.json"], "train", {"fold": 4}, "config id 'fold' must be a whole number from 0 to num_folds - 1"),
        (["train.json"], "train", {"fold": -2}, "config id 'fold' must be a whole number from 0 to num_folds - 1, or"),
        (["train.json"], "train", {"learning_rate": "0.1"}, "config id 'learning_rate' must be a number > 0"),
        (["train.json"], "train", {"epochz": 5}, "config id 'epochz' is used by nothing in the configuration"),
        (["train.json"], "train", {"resume_ckpt": "runs/none.pt"}, "'resume_ckpt' must be null or an existing"),
        (["train.json"], "train", {"overwrite": "yes"}, "config id 'overwrite' must be True or False (a bool"),
        # fire passes `--amp false` as the string 'false', which is truthy: mixed precision stayed on
        (["train.json"], "train", {"amp": "false"},
         "config id 'amp' must be True or False (a bool: --amp True on the command line), got 'false'"),
        # refused when the trainer was built: after caching the datasets and creating TensorBoard files in output_dir
        (["train.json"], "train", {"time_budget_s": 20.5}, "config id 'time_budget_s' must be null (off) or a whole"),
        (["train.json"], "train", {"time_budget_s": 0}, "config id 'time_budget_s' must be null (off) or a whole"),
        # fire passes `--save_masks false` as the string 'false', which is truthy: it switched the option on
        (["train.json", "evaluate.json"], "train", {"save_masks": "false"},
         "config id 'save_masks' must be True or False (a bool: --save_masks True on the command line), got 'false'"),
        (["inference.json"], "infer", {"write_uncertainty": "false"},
         "config id 'write_uncertainty' must be True or False (a bool: --write_uncertainty True on the command line)"),
        (["train.json", "evaluate.json"], "train", {"ckpt_pth": "m.pt"}, "config id 'ckpt_pth' is used by nothing"),
        (["inference.json"], "infer", {"num_workers": -1}, "config id 'num_workers' must be a whole number >= 0"),
        (["inference.json"], "infer", {"ckpt_pth": "m.pt"}, "config id 'ckpt_pth' is used by nothing"),
        (["train.json"], "train", {"adjacent_slices": -1}, "config id 'adjacent_slices' must be a whole number >= 0"),
        (["inference.json"], "infer", {"adjacent_slices": 0.5}, "config id 'adjacent_slices' must be a whole number"),
        (["inference.json"], "infer", {"contralateral_channels": "foo"}, "'contralateral_channels' must be null (off)"),
        (["train.json"], "train", {"contralateral_channels": "mirrored"}, "'contralateral_channels' must be null"),
        # a non-positive spacing was taken by Spacingd as "keep this axis's spacing": the run went on unresampled
        (["inference.json"], "infer", {"spacing_mm": 0}, "config id 'spacing_mm' must be null (off: each image's own "
         "grid) or a number of mm from 0.05 to 30.0 (the in-plane voxel size to resample to), got 0"),
        (["train.json"], "train", {"spacing_mm": -0.9}, "config id 'spacing_mm' must be null (off"),
        (["train.json", "evaluate.json"], "train", {"spacing_mm": 31}, "config id 'spacing_mm' must be null (off"),
        (["inference.json"], "infer", {"spacing_mm": "0.9"}, "config id 'spacing_mm' must be null (off"),
        (["inference.json"], "infer", {"min_lesion_ml": -1}, "config id 'min_lesion_ml' must be a number >= 0"),
        (["train.json", "evaluate.json"], "train", {"min_lesion_ml": "0.5"}, "config id 'min_lesion_ml' must be a"),
        (["inference.json"], "infer", {"lesion_threshold": 1}, "config id 'lesion_threshold' must be a number between"),
        (["train.json", "evaluate.json"], "train", {"lesion_threshold": 0}, "config id 'lesion_threshold' must be a"),
        (["inference.json"], "infer", {"amp": "false"}, "config id 'amp' must be True or False (a bool"),
        # PyTorch's own errors named no config id
        (["train.json"], "train", {"device": "cpux"}, "config id 'device' must be a device of this machine"),
        (["inference.json"], "infer", {"device": "cuda:99"}, "config id 'device' must be a device of this machine"),
        # fire reads `--ckpt_dir 2018_01` as 201801: training wrote training_inputs.json and TensorBoard files to the
        # folders 201801 and 20240501, then failed deep in pathlib (expected str, bytes or os.PathLike object, not int)
        (["train.json"], "train", {"ckpt_dir": 201801}, "config id 'ckpt_dir' must be a folder path (the command line"),
        (["train.json"], "train", {"output_dir": 20240501}, "config id 'output_dir' must be a folder path"),
        (["train.json"], "train", {"dataset_dir": 1000.0}, "config id 'dataset_dir' must be a folder path"),
        (["train.json", "evaluate.json"], "train", {"output_dir": 201801}, "config id 'output_dir' must be a folder"),
        (["inference.json"], "infer", {"output_dir": 201801}, "config id 'output_dir' must be a folder path"),
        (["inference.json"], "infer", {"dataset_dir": 201801}, "config id 'dataset_dir' must be a folder path"),
    ],
)
def test_bad_override_is_refused_naming_the_id(tmp_path, config_files, workflow_type, override, message):
    workflow = bundle_workflow(config_files, workflow_type, **{"dataset_dir": str(tmp_path), **override})
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()  # the check is run's first step, before anything is built
    assert message in error_chain(raised.value)


def test_documented_overrides_pass_the_check(tiny_phantom_dataset, tmp_path):
    for config_files, workflow_type in ((["train.json"], "train"), (["train.json", "demo.json"], "train"),
                                        (["train.json", "evaluate.json"], "train"), (["inference.json"], "infer")):
        for fold in (1, -1):  # -1: every training case (bundle card: evaluate a checkpoint on them)
            overrides = {**TINY_TRAINING, "fold": fold, "resume_ckpt": None} if workflow_type == "train" else {}
            workflow = bundle_workflow(config_files, workflow_type, dataset_dir=str(tiny_phantom_dataset), **overrides)
            workflow.initialize()
            workflow.parser.get_parsed_content("check_settings")


def test_bundle_command_line_names_every_bad_override(tmp_path):
    completed = _bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(tmp_path), "--epochs", "abc", "--epochz", "5",
    )
    assert completed.returncode != 0
    assert "config id 'epochs' must be a whole number >= 1, got 'abc'" in completed.stderr
    assert "config id 'epochz' is used by nothing in the configuration" in completed.stderr


def test_command_line_overwrite_is_spelt_as_documented(tmp_path):
    """Without --overwrite a run into a used ckpt_dir is refused naming the folder; `--overwrite true`, which fire
    passes as a string, is refused naming the spelling; the documented `--overwrite True` passes both checks and
    goes on to read the (missing) dataset. The earlier run's file is untouched."""
    ckpt_dir = tmp_path / "models"
    ckpt_dir.mkdir()
    (ckpt_dir / "model.pt").write_bytes(b"earlier run")
    common = ["--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(BUNDLE),
              "--dataset_dir", str(tmp_path / "no_dataset"), "--ckpt_dir", str(ckpt_dir)]  # fmt: skip
    refused = _bundle_run(*common)
    assert f"config id 'ckpt_dir': '{ckpt_dir}' holds checkpoints of an earlier run (model.pt)" in refused.stderr
    misspelt = _bundle_run(*common, "--overwrite", "true")
    assert "config id 'overwrite' must be True or False (a bool: --overwrite True on the command line), got 'true'" in (
        misspelt.stderr
    )
    allowed = _bundle_run(*common, "--overwrite", "True")
    assert allowed.returncode != 0 and "holds checkpoints" not in allowed.stderr
    assert "config id 'overwrite'" not in allowed.stderr and "no_dataset' does not exist" in allowed.stderr
    assert (ckpt_dir / "model.pt").read_bytes() == b"earlier run"


class _RunsCodeWhenUnpickled:
    """Pickles as a call of ``Path.touch(marker)``: loading it with plain pickle creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture
def code_running_checkpoint(tmp_path):
    """A ``.pt`` whose unpickling runs code (creates ``marker``); checked to do so when loaded unsafely."""
    marker, checkpoint = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"model": _RunsCodeWhenUnpickled(marker)}, checkpoint)
    torch.load(checkpoint, weights_only=False)
    assert marker.is_file(), "the test checkpoint should run code when unpickled without weights_only"
    marker.unlink()
    return checkpoint, marker


@pytest.mark.parametrize(
    "config_files, overrides",
    [
        (["train.json"], {**TINY_TRAINING, "epochs": 1, "resume_ckpt": "{checkpoint}"}),
        (["train.json", "evaluate.json"], {"num_workers": 0, "ckpt_path": "{checkpoint}"}),
        (["inference.json"], {"num_workers": 0, "ckpt_path": "{checkpoint}"}),
    ],
    ids=["training resume", "evaluation", "inference"],
)
def test_checkpoint_that_runs_code_is_refused_by_the_bundle(
    tiny_phantom_dataset, tmp_path, code_running_checkpoint, config_files, overrides
):
    checkpoint, marker = code_running_checkpoint
    overrides = {k: str(checkpoint) if v == "{checkpoint}" else v for k, v in overrides.items()}
    workflow = bundle_workflow(
        config_files, None, dataset_dir=str(tiny_phantom_dataset), ckpt_dir=str(checkpoint.parent),
        output_dir=str(tmp_path / "out"), **overrides,
    )
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert "Weights only load failed" in error_chain(raised.value)
    assert f"checkpoint '{checkpoint}' is refused by safe loading" in error_chain(raised.value)
    assert not marker.exists()


def test_checkpoint_that_runs_code_is_refused_by_deploy(tiny_phantom_dataset, tmp_path, code_running_checkpoint):
    checkpoint, marker = code_running_checkpoint
    image = tiny_phantom_dataset / "imagesTs" / "case_9.nii.gz"
    completed = subprocess.run(
        [sys.executable, "-m", "custom", "deploy", str(image), "--model", str(checkpoint),
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert completed.returncode != 0
    assert f"model '{checkpoint}' is not a TorchScript file" in completed.stderr
    assert not marker.exists() and not (tmp_path / "o" / "case_9_seg.nii.gz").exists()


NETWORK_BLOCKER = '''
"""Loaded at interpreter start (sitecustomize): every internet socket connection or name lookup is logged
to $NETWORK_ATTEMPTS_LOG and refused; local (AF_UNIX) sockets, used by DataLoader workers, still work."""
import os
import socket

_INTERNET = (socket.AF_INET, socket.AF_INET6)


def _refuse(*args):
    with open(os.environ["NETWORK_ATTEMPTS_LOG"], "a") as log:
        log.write(repr(args) + "\\n")
    raise OSError("network access blocked by the test")


def _guard(method):
    def guarded(self, *args):
        if self.family in _INTERNET:
            _refuse(method.__name__, *args)
        return method(self, *args)
    return guarded


for _name in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, _name, _guard(getattr(socket.socket, _name)))
socket.getaddrinfo = lambda *args, **kwargs: _refuse("getaddrinfo", *args)
socket.gethostbyname = lambda *args: _refuse("gethostbyname", *args)
'''


@pytest.mark.integration
def test_training_and_inference_open_no_network_connection(tiny_phantom_dataset, tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NETWORK_BLOCKER)
    attempts = tmp_path / "network_attempts.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "NETWORK_ATTEMPTS_LOG": str(attempts),
    }
    probe = subprocess.run(
        [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"],
        capture_output=True, text=True, env=env,
    )
    assert "network access blocked by the test" in probe.stderr and attempts.is_file()
    attempts.unlink()

    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_phantom_dataset)]
    training = _bundle_run(
        "training", "--config_file", str(CONFIGS / "train.json"), *common, "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "logs"), *override_arguments({**TINY_TRAINING, "epochs": 1}), env=env,
    )
    assert training.returncode == 0, training.stderr[-3000:]
    inference = _bundle_run(
        "--config_file", str(CONFIGS / "inference.json"), *common, "--num_workers", "0",
        "--ckpt_path", str(tmp_path / "models" / "model.pt"), "--output_dir", str(tmp_path / "infer"), env=env,
    )
    assert inference.returncode == 0, inference.stderr[-3000:]
    assert (tmp_path / "infer" / "lesion_volumes.csv").is_file()
    assert not attempts.exists(), attempts.read_text()


def _first_losses(dataset_dir, ckpt_dir, iterations=3, **overrides):
    """The training losses of the first ``iterations`` iterations of a fresh train.json run in this process."""
    workflow = bundle_workflow(
        ["train.json"], "train", dataset_dir=str(dataset_dir), ckpt_dir=str(ckpt_dir),
        output_dir=str(ckpt_dir / "logs"), **{**TINY_TRAINING, "val_interval": 100, **overrides},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses = []
    loss_of = from_engine(["loss"], first=True)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(loss_of(engine.state.output)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iterations), lambda engine: engine.terminate())
    workflow.run()
    return [float(loss) for loss in losses]


@pytest.mark.integration
def test_same_seed_gives_the_same_losses_on_cpu(tiny_phantom_dataset, tmp_path):
    """train.json's initialize seeds everything (``set_determinism``) and MONAI's DataLoader seeds each
    worker from it, so random crops and augmentations repeat even with worker processes."""
    first = _first_losses(tiny_phantom_dataset, tmp_path / "a", num_workers=2)
    second = _first_losses(tiny_phantom_dataset, tmp_path / "b", num_workers=2)
    other_seed = _first_losses(tiny_phantom_dataset, tmp_path / "c", num_workers=2, seed=7)
    assert len(first) == 3 and first == second
    assert other_seed != first


@pytest.mark.parametrize(
    "arguments, refusal",
    [
        (["prepare", "isles2018", "{tmp}/missing", "{tmp}/dataset", "--foldz", "3"], "unknown option '--foldz'"),
        (["check", "{tmp}/dataset", "--verbose"], "unknown option '--verbose'"),
        # deploy has its own (argparse) command line, custom.deploy.main
        (["deploy", "{tmp}/image.nii.gz", "--modle", "{tmp}/model.ts"], "unrecognized arguments: --modle"),
    ],
)
def test_unknown_command_line_option_is_refused_before_the_command_runs(tmp_path, capsys, arguments, refusal):
    """Without the check Fire would first run the command (here: fail on the missing input) and only then
    complain about the option it could not use."""
    from custom.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main([a.replace("{tmp}", str(tmp_path)) for a in arguments])
    assert refusal in str(refused.value) + capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments", [["accuracy-bench", "--help"], ["accuracy-bench", "--out", "x", "-h"]])
def test_help_of_a_command_taking_overrides_prints_help_and_runs_nothing(monkeypatch, capsys, arguments):
    """``accuracy-bench`` takes ``**bundle_overrides``, so Fire handed ``--help`` to it as an override and the
    benchmark started (writing phantoms) instead of printing the help."""
    import custom.accuracy_bench
    from custom.__main__ import main

    calls = []
    monkeypatch.setattr(custom.accuracy_bench, "phantom_dataset", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 0
    assert calls == []
    assert "--budget_s" in capsys.readouterr().err  # Fire prints its help on stderr


def test_command_line_prints_tables_not_the_returned_rows(tmp_path, capsys):
    """compare-cv prints its table and returns its rows for Python callers; Fire printed those rows again, one
    JSON line each, after the table."""
    from custom.__main__ import main
    from custom.reporting import write_case_csv

    for name, dice in (("a", 0.5), ("b", 0.7)):
        (tmp_path / name).mkdir()
        rows = [{"case": f"case_{i}", "dice": dice, "hd95_mm": 2.0, "avd_ml": 1.0, "lesion_f1": 1.0} for i in range(3)]
        write_case_csv(rows, str(tmp_path / name / "cases.csv"))
    main(["compare-cv", str(tmp_path / "a"), str(tmp_path / "b")])
    printed = capsys.readouterr().out
    assert "| other: " in printed and "+0.200" in printed
    assert not [line for line in printed.splitlines() if line.startswith("{")], printed


def _ensemble_checkpoint(tmp_path: Path, out: Path, **options) -> None:
    from conftest import inference_network

    from custom.ensemble import write_ensemble_checkpoint

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(tmp_path / f"fold{seed}.pt")
        torch.save(inference_network().state_dict(), members[-1])
    write_ensemble_checkpoint(*map(str, members), out=str(out), **options)


def _package(tmp_path: Path, out: Path, **options) -> None:
    from custom.package import package_bundle

    package_bundle(str(out), bundle_root=str(BUNDLE), **options)


def _compare_cv(tmp_path: Path, out: Path, **options) -> None:
    from custom.ablation import compare_cross_validations
    from custom.reporting import write_case_csv

    for run in ("reference", "other"):
        if not (tmp_path / run / "cases.csv").exists():
            write_case_csv([{"case": "a", "fold": 0, "dice": 0.5, "hd95_mm": 2.0, "avd_ml": 1.0, "lesion_f1": 1.0}],
                           str(tmp_path / run / "cases.csv"))  # fmt: skip
    compare_cross_validations(str(tmp_path / "reference"), str(tmp_path / "other"), out=str(out), **options)


def _perfusion_accuracy(tmp_path: Path, out: Path, **options) -> None:
    from custom.perfusion.commands import accuracy

    accuracy(cases=1, size=64, out=str(out), **options)


def _onnx(tmp_path: Path, out: Path, **options) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    from conftest import inference_network

    from custom.onnx_export import export_onnx

    torch.save(inference_network().state_dict(), tmp_path / "model.pt")
    export_onnx(str(tmp_path / "model.pt"), str(out), str(CONFIGS / "inference.json"), str(CONFIGS / "metadata.json"),
                str(BUNDLE), **options)  # fmt: skip


@pytest.mark.parametrize(
    "write, name, option",
    [(_ensemble_checkpoint, "model.pt", "--out"), (_package, "ctp_stroke.zip", "OUT"), (_compare_cv, "t.md", "--out"),
     (_perfusion_accuracy, "accuracy.json", "--out"), (_onnx, "model.onnx", "--out")],
    ids=["ensemble-checkpoint", "package", "compare-cv", "perfusion accuracy", "onnx"],
)
def test_a_one_file_output_is_replaced_only_when_asked(tmp_path, write, name, option):
    """ensemble-checkpoint, package, compare-cv, perfusion accuracy and onnx replaced an existing file without a word
    (``ensemble-checkpoint --out bundle/models/model.pt`` wrote an ensemble over the trained weights): refused, naming
    the file and ``--overwrite``, the file left as it was; ``overwrite=True`` replaces it."""
    out = tmp_path / "outputs" / name
    out.parent.mkdir()
    out.write_bytes(b"an earlier file")
    earlier = rf"the folder of {option} '.*outputs' holds 1 file\(s\) .*\({name}\).*--overwrite"
    with pytest.raises(FileExistsError, match=earlier):
        write(tmp_path, out)
    assert out.read_bytes() == b"an earlier file"
    write(tmp_path, out, overwrite=True)
    assert out.read_bytes() != b"an earlier file"


def test_an_ensemble_checkpoint_given_for_one_network_is_named_as_one(tmp_path):
    """``evaluate.json --ckpt_path ensemble.pt`` (a ``python -m custom ensemble-checkpoint`` file) was refused as a
    checkpoint of "another architecture, or weights trained with other input channels"; it names what the file is
    and where it is used."""
    def network():
        return UNet(spatial_dims=2, in_channels=5, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)

    path = tmp_path / "ensemble.pt"
    torch.save(ProbabilityEnsemble([network(), network()]).state_dict(), path)
    with pytest.raises(ValueError, match=f"checkpoint '{path}' is an ensemble checkpoint .*--ensemble_ckpt_paths"):
        load_network_checkpoint(path, network())


def test_a_model_pt_given_to_resume_is_named_as_weights_only(tmp_path):
    """``--resume_ckpt runs/fold0/model.pt`` (the best weights, no optimizer or trainer state) failed in ignite with
    ``Key 'optimizer' from x is not found in y``, naming no file; it names the file and what to resume from."""
    network = UNet(spatial_dims=2, in_channels=5, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    path = tmp_path / "model.pt"
    torch.save(network.state_dict(), path)
    loader = NamedCheckpointLoader(load_path=str(path), load_dict={"model": network, "optimizer": optimizer})
    with pytest.raises(ValueError, match=f"checkpoint '{path}' holds no model, optimizer: it is one network's "
                                         "weights .*latest_checkpoint_epoch=N.pt"):
        loader(Engine(lambda engine, batch: None))


def test_a_non_finite_training_loss_stops_the_run():
    """``--learning_rate 1e12`` trained to the end on NaN weights and wrote them as ``model.pt`` (exit status 0)."""
    losses = iter([torch.tensor(0.7), torch.tensor(float("nan"))])
    trainer = Engine(lambda engine, batch: [{"loss": next(losses)}])  # MONAI's decollated per-sample outputs
    RefuseNonFiniteLoss().attach(trainer)
    with pytest.raises(ValueError, match="training loss is nan at epoch 1, iteration 2: .*'learning_rate'"):
        trainer.run([0, 1], max_epochs=1)
    config = ConfigParser()
    config.read_config(CONFIGS / "train.json")  # the bundle's trainer runs it
    assert any(handler.get("_target_") == "custom.handlers.RefuseNonFiniteLoss" for handler in config["train#handlers"])
