"""The bundle's configs: workflow properties, train/evaluate/infer end to end, resume, the CLI entry points."""

import csv
import errno
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import monai
import pytest
import torch
from conftest import BUNDLE, CONFIGS, TINY_TRAINING, bundle_workflow, error_chain
from ignite.engine import Events
from monai.bundle import ConfigParser

from custom.crossval import override_arguments
from custom.lifecycle import latest_checkpoint


def _bundle_run(*arguments, run_id=None):
    command = [sys.executable, "-m", "monai.bundle", "run"] + ([run_id] if run_id else []) + list(arguments)
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout + completed.stderr


@pytest.mark.parametrize(
    "config_files, workflow_type",
    [(["train.json"], "train"), (["inference.json"], "infer")],
)
def test_workflow_properties_complete(config_files, workflow_type, tiny_phantom_dataset, tmp_path):
    """Checking the properties builds the trainer and its TensorBoard handlers: their folders are the test's."""
    workflow = bundle_workflow(config_files, workflow_type, dataset_dir=str(tiny_phantom_dataset), num_workers=0,
                               ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"))  # fmt: skip
    workflow.initialize()
    assert workflow.check_properties() == []


def test_network_and_preprocessing_identical_in_train_and_inference():
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    inference = ConfigParser.load_config_file(CONFIGS / "inference.json")
    assert train["network_def"] == inference["network_def"]
    train_image_steps = [  # the image's part: the first of a step's modes (image, label)
        {k: v[0] if k == "mode" else v for k, v in t.items() if k != "keys"}
        for t in train["train"]["deterministic_transforms"]
    ]
    inference_steps = [  # but the brain mask for the post-processing (test_lesions.py)
        {k: v for k, v in t.items() if k != "keys"}
        for t in inference["preprocessing"]["transforms"]
        if t["_target_"] != "custom.transforms.BrainMaskd"
    ]
    assert [t["_target_"] for t in train_image_steps] == [t["_target_"] for t in inference_steps]
    assert train_image_steps[0] == inference_steps[0]  # one NIfTI reader (custom.readers): nibabel's affine
    assert train_image_steps[3:6] == inference_steps[3:6]  # brain normalisation, spacing_mm resampling and padding


def test_metadata_declares_what_the_network_does():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 5 and list(image["channel_def"].values()) == ["CT", "CBF", "CBV", "MTT", "Tmax"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}
    network = ConfigParser(ConfigParser.load_config_file(CONFIGS / "inference.json")).get_parsed_content("network_def")
    with torch.no_grad():
        assert network(torch.zeros(1, 5, 32, 32)).shape == (1, 2, 32, 32)


def test_missing_dataset_dir_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    workflow = bundle_workflow(["train.json"], "train", dataset_dir=str(missing))
    workflow.initialize()
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert str(missing) in "".join(str(e) for e in (raised.value, raised.value.__cause__) if e)


def test_demo_keeps_a_user_dataset_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    workflow = bundle_workflow(["train.json", "demo.json"], "train", dataset_dir=str(missing))
    workflow.initialize()
    assert workflow.parser.get_parsed_content("dataset_dir") == str(missing)
    with pytest.raises(Exception):
        workflow.parser.get_parsed_content("train#datalist")
    assert not missing.exists()


@pytest.mark.integration
def test_train_evaluate_infer_end_to_end(tiny_phantom_dataset, tmp_path):
    ckpt_dir, train_dir = tmp_path / "models", tmp_path / "train"
    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_phantom_dataset)]
    output = _bundle_run(
        "--config_file", str(CONFIGS / "train.json"), *common,
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(train_dir), *override_arguments(TINY_TRAINING),
        run_id="training",
    )
    assert "Epoch[2] Metrics" in output
    assert (ckpt_dir / "model.pt").is_file() and latest_checkpoint(ckpt_dir).name == "latest_checkpoint_epoch=2.pt"
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)

    eval_dir = tmp_path / "eval"
    _bundle_run(
        "--config_file", str([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")]), *common,
        "--ckpt_path", str(ckpt_dir / "model.pt"), "--output_dir", str(eval_dir), "--num_workers", "0",
        "--save_masks", "True",
    )
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    validation = [e for e in dataset["training"] if e["fold"] == 0]
    with open(eval_dir / "val_mean_dice_raw.csv") as f:
        dice = {row["filename"]: float(row["mean"]) for row in csv.DictReader(f)}
    assert sorted(dice) == sorted(str(tiny_phantom_dataset / e["image"]) for e in validation)
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    for entry in validation:
        mask = nib.load(eval_dir / "masks" / f"{entry['case']}_seg.nii.gz")
        label = nib.load(tiny_phantom_dataset / entry["label"])
        assert mask.shape == label.shape and np.allclose(mask.affine, label.affine)

    infer_dir = tmp_path / "infer"
    _bundle_run(
        "--config_file", str(CONFIGS / "inference.json"), *common,
        "--ckpt_path", str(ckpt_dir / "model.pt"), "--output_dir", str(infer_dir), "--num_workers", "0",
    )
    with open(infer_dir / "lesion_volumes.csv") as f:
        volumes = list(csv.DictReader(f))
    assert [row["case"] for row in volumes] == [e["case"] for e in dataset["testing"]]
    for entry, row in zip(dataset["testing"], volumes):
        image = nib.load(tiny_phantom_dataset / entry["image"])
        mask = nib.load(infer_dir / f"{entry['case']}_seg.nii.gz")
        assert mask.shape == image.shape[:3] and np.allclose(mask.affine, image.affine)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
        assert float(row["lesion_ml"]) == pytest.approx(mask.get_fdata().sum() * voxel_ml, rel=1e-3)


def test_inference_into_an_earlier_runs_output_dir_is_refused_unless_asked(tiny_phantom_dataset, tmp_path):
    """A mask in an output folder may have been corrected by hand since: a second run into the folder is refused
    before any image is segmented, naming the id and the files; with --overwrite True it replaces them."""
    entry = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["testing"][0]
    image = str(tiny_phantom_dataset / (entry["image"] if isinstance(entry, dict) else entry))
    out = tmp_path / "out"

    def infer(**override):
        workflow = bundle_workflow(["inference.json"], "infer", datalist=[image], output_dir=str(out), num_workers=0,
                                   tta_flips=True, write_uncertainty=True, **override)  # fmt: skip
        workflow.initialize()
        workflow.run()

    infer()
    mask = out / f"{image.split('/')[-1].split('.nii')[0]}_seg.nii.gz"
    written = sorted(path.name for path in out.iterdir())
    assert written == sorted([mask.name, mask.name.replace("_seg", "_uncertainty"), "lesion_volumes.csv"])
    mask.write_bytes(b"corrected by hand")
    with pytest.raises(Exception) as raised:
        infer()
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    assert f"config id 'output_dir': '{out}' holds 3 file(s) of an earlier run that this run would replace " \
           f"({mask.name}, ...): replace them with --overwrite True" in message  # fmt: skip
    assert mask.read_bytes() == b"corrected by hand" and sorted(path.name for path in out.iterdir()) == written
    infer(overwrite=True)
    assert nib.load(mask).shape == nib.load(image).shape[:3]


def test_a_replacing_inference_stopped_half_way_leaves_no_earlier_table(tiny_phantom_dataset, tmp_path, monkeypatch):
    """With --overwrite True, lesion_volumes.csv was replaced only when the run completed: a rerun stopped after its
    first mask (a full disk here) left the earlier run's table beside that mask, listing volumes the mask no longer
    had. ``check_output_dir`` now removes the earlier table with the other outputs it lets this run replace."""
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    images = [str(tiny_phantom_dataset / (e["image"] if isinstance(e, dict) else e)) for e in dataset["testing"]]
    cases = [image.split("/")[-1].split(".nii")[0] for image in images]
    out = tmp_path / "out"

    def infer(**override):
        workflow = bundle_workflow(["inference.json"], "infer", datalist=images, output_dir=str(out), num_workers=0,
                                   **override)  # fmt: skip
        workflow.initialize()
        workflow.run()

    infer()
    assert (out / "lesion_volumes.csv").is_file()
    save = nib.save

    def disk_full_at_the_second_mask(image, filename):
        if f"{cases[1]}_seg" in str(filename):
            raise OSError(errno.ENOSPC, "simulated")
        save(image, filename)

    monkeypatch.setattr(nib, "save", disk_full_at_the_second_mask)
    with pytest.raises(Exception) as raised:
        infer(overwrite=True, lesion_threshold=0.9)
    assert "simulated" in error_chain(raised.value)
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{case}_seg.nii.gz" for case in cases)


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_case(configs, tiny_phantom_dataset, tmp_path):
    """Inference named an unwritable output_dir at its first mask, evaluation only when MetricsSaver wrote the
    tables after every case; both now make and probe it before the first case (here a path under a file)."""
    blocker = tmp_path / "a file"
    blocker.write_text("")
    out = blocker / "out"
    if configs == ["inference.json"]:
        entry = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["testing"][0]
        image = str(tiny_phantom_dataset / (entry["image"] if isinstance(entry, dict) else entry))
        workflow = bundle_workflow(configs, "infer", datalist=[image], output_dir=str(out), num_workers=0)
    else:
        workflow = bundle_workflow(configs, "train", dataset_dir=str(tiny_phantom_dataset), fold=0, save_masks=True,
                                   ckpt_path=str(BUNDLE / "models" / "model.pt"), output_dir=str(out),
                                   num_workers=0, cache_rate=0.0)  # fmt: skip
    evaluated = []
    workflow.initialize()
    evaluator_id = "evaluator" if configs == ["inference.json"] else "validate#evaluator"
    evaluator = workflow.parser.get_parsed_content(evaluator_id)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: evaluated.append(True))
    with pytest.raises(Exception) as raised:
        workflow.run()
    assert f"output folder '{out}' is not writable" in error_chain(raised.value)
    assert not evaluated


def test_inference_replacing_an_earlier_run_leaves_none_of_its_uncertainty_maps(tiny_phantom_dataset, tmp_path):
    """A case's outputs are its mask and its uncertainty map, whichever a run writes: a run without
    write_uncertainty into a folder holding an earlier run's map of its case is refused, and with --overwrite True
    that map is removed rather than left beside the new mask as if they were one run's."""
    entry = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["testing"][0]
    image = str(tiny_phantom_dataset / (entry["image"] if isinstance(entry, dict) else entry))
    out = tmp_path / "out"

    def infer(**override):
        workflow = bundle_workflow(["inference.json"], "infer", datalist=[image], output_dir=str(out), num_workers=0,
                                   **override)  # fmt: skip
        workflow.initialize()
        workflow.run()

    infer(tta_flips=True, write_uncertainty=True)
    mask = out / f"{image.split('/')[-1].split('.nii')[0]}_seg.nii.gz"
    uncertainty = mask.with_name(mask.name.replace("_seg", "_uncertainty"))
    mask.unlink()
    (out / "lesion_volumes.csv").unlink()  # the map alone is an output of the case
    with pytest.raises(Exception) as raised:
        infer()
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    assert f"config id 'output_dir': '{out}' holds 1 file(s) of an earlier run that this run would replace " \
           f"({uncertainty.name}): replace them with --overwrite True" in message  # fmt: skip
    assert sorted(path.name for path in out.iterdir()) == [uncertainty.name]
    infer(overwrite=True)
    assert sorted(path.name for path in out.iterdir()) == sorted([mask.name, "lesion_volumes.csv"])


def test_evaluation_into_an_earlier_runs_output_dir_is_refused_unless_asked(tiny_phantom_dataset, tmp_path):
    """MetricsSaver and SaveImaged replace files without a word: a second evaluation into a folder replaced the
    metric tables (here with fewer cases) and mixed its masks with the first's. It is refused before any case is
    evaluated, naming the id, the folder, the count and the first file; with --overwrite True the tables are
    replaced and, as this run writes no masks, the earlier masks of its cases are removed (those of other cases
    stay: this run's cases are the rows of its *_raw.csv)."""
    out = tmp_path / "eval"
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    fold_0 = sorted(entry["case"] for entry in dataset["training"] if entry["fold"] == 0)
    others = sorted(entry["case"] for entry in dataset["training"] if entry["fold"] != 0)

    def evaluate(fold, **override):
        workflow = bundle_workflow(
            ["train.json", "evaluate.json"], "train", dataset_dir=str(tiny_phantom_dataset), fold=fold,
            ckpt_path=str(BUNDLE / "models" / "model.pt"), output_dir=str(out), num_workers=0, cache_rate=0.0,
            **override,
        )
        workflow.initialize()
        workflow.run()

    def raw_cases():
        with open(out / "val_mean_dice_raw.csv") as f:
            return sorted(row["filename"].split("/")[-1].split(".nii")[0] for row in csv.DictReader(f))

    evaluate(-1, save_masks=True)
    assert sorted(path.name for path in (out / "masks").iterdir()) == sorted(f"{c}_seg.nii.gz" for c in fold_0 + others)
    written = sorted(path.relative_to(out) for path in out.rglob("*"))
    tables = sorted(path.name for path in out.glob("*.csv"))
    assert "metrics.csv" in tables and len(tables) == 1 + 2 * len(list(out.glob("*_raw.csv"))) > 1
    with pytest.raises(Exception) as raised:
        evaluate(0)
    message = "\n".join(str(error) for error in (raised.value, raised.value.__cause__) if error is not None)
    assert f"config id 'output_dir': '{out}' holds {len(fold_0) + len(tables)} file(s) of an earlier run that this " \
           f"run would replace (masks/{fold_0[0]}_seg.nii.gz, ...): replace them with --overwrite True" \
           in message  # fmt: skip
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == written
    assert raw_cases() == sorted(fold_0 + others)
    evaluate(0, overwrite=True)
    assert raw_cases() == fold_0
    assert sorted(path.name for path in (out / "masks").iterdir()) == [f"{c}_seg.nii.gz" for c in others]


@pytest.mark.integration
@pytest.mark.parametrize("slices", [1, 2])
def test_inference_keeps_shape_of_thin_slabs(tiny_phantom_dataset, tmp_path, slices):
    entry = json.loads((tiny_phantom_dataset / "dataset.json").read_text())["training"][0]
    image = nib.load(tiny_phantom_dataset / entry["image"])
    thin = tmp_path / f"thin_{slices}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, :slices], image.affine, image.header), thin)
    workflow = bundle_workflow(
        ["inference.json"], "infer", datalist=[str(thin)], output_dir=str(tmp_path / "out"), num_workers=0,
    )
    workflow.initialize()
    workflow.parser["handlers"][0]["_disabled_"] = True  # untrained weights are enough for shapes
    workflow.run()
    mask = nib.load(tmp_path / "out" / f"thin_{slices}_seg.nii.gz")
    assert mask.shape == image.shape[:2] + (slices,)
    assert np.allclose(mask.affine, image.affine)


def _train_in_process(dataset_dir, ckpt_dir, stop_after_epoch=None, resume_ckpt=None):
    overrides = {**TINY_TRAINING, "epochs": 3, "val_interval": 10}
    workflow = bundle_workflow(
        ["train.json"], "train", dataset_dir=str(dataset_dir), ckpt_dir=str(ckpt_dir),
        output_dir=str(ckpt_dir / "logs"), resume_ckpt=resume_ckpt, **overrides,
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    if stop_after_epoch is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after_epoch), lambda engine: engine.terminate())
    workflow.run()
    optimizer = workflow.parser.get_parsed_content("optimizer")
    return trainer.state.epoch, trainer.state.iteration, optimizer.param_groups[0]["lr"]


@pytest.mark.integration
def test_resume_continues_epochs_and_learning_rate(tiny_phantom_dataset, tmp_path):
    uninterrupted = _train_in_process(tiny_phantom_dataset, tmp_path / "full")
    interrupted = _train_in_process(tiny_phantom_dataset, tmp_path / "cut", stop_after_epoch=1)
    assert interrupted[0] == 1
    resume = latest_checkpoint(tmp_path / "cut")
    assert resume.name == "latest_checkpoint_epoch=1.pt"
    resumed = _train_in_process(tiny_phantom_dataset, tmp_path / "cut", resume_ckpt=str(resume))
    assert resumed[:2] == uninterrupted[:2] == (3, uninterrupted[1])
    assert resumed[2] == pytest.approx(uninterrupted[2])
    assert resumed[2] != pytest.approx(interrupted[2])


@pytest.mark.integration
def test_plain_run_trains(tiny_phantom_dataset, tmp_path):
    output = _bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(BUNDLE),
        "--dataset_dir", str(tiny_phantom_dataset), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "logs"), *override_arguments({**TINY_TRAINING, "epochs": 1}),
    )
    assert "Epoch[1] Metrics" in output
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.parametrize("configs", [["multi_gpu_train.json"], ["evaluate.json", "multi_gpu_evaluate.json"]])
def test_multi_gpu_configs_use_the_local_gpu_on_every_node(configs, monkeypatch):
    """torchrun --nnodes 2 --nproc_per_node 8 (docs/scaling.md): the second node's ranks 8-15 run on its GPUs 0-7
    (torchrun's LOCAL_RANK); the global rank named cuda:8 to cuda:15, which no node has."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")] + [str(CONFIGS / c) for c in configs])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 9)
    assert parser.get_parsed_content("device") == torch.device("cuda:1")


def test_multi_gpu_ranks_draw_different_augmentations(monkeypatch):
    """MONAI's DataLoader seeds the dataset's random transforms from torch's global generator, which `initialize`
    seeds: with one seed on every rank, all ranks drew the same flips, crops and intensity shifts at each step
    (on different volumes). Rank 0 keeps the single-process seed; DDP gives every rank rank 0's initial weights."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        parser.get_parsed_content("initialize", lazy=False)
        draws[rank] = torch.empty((), dtype=torch.int64).random_().item()
    monai.utils.set_determinism(seed=parser["seed"])
    single_process = torch.empty((), dtype=torch.int64).random_().item()
    monai.utils.set_determinism(seed=None)
    assert draws[0] == single_process
    assert draws[1] != draws[0]


def test_a_multi_gpu_run_without_validation_studies_builds(monkeypatch):
    """MONAI Label's ``val_split`` 0 or -1 (or a single labelled study) leaves a fine-tune no validation study: in one
    process the final weights are saved, but on the multi-GPU path the validation ``DistributedSampler`` refused the
    empty dataset ("the dataset length is less than the number of participating ranks"), torchrun exited with status 1
    and the fine-tune failed (HTTP 500, seen with a real server). The sampler is left out when there is nothing to
    validate, and kept otherwise."""
    from monai.data import DistributedSampler

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.update({"cache_rate": 0.0, "num_workers": 0, "validate#dataset#data": []})
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    loader = parser.get_parsed_content("validate#dataloader")
    assert len(loader.dataset) == 0 and not isinstance(loader.sampler, DistributedSampler)
    parser["validate#dataset#data"] = [{"image": f"case_{n}.nii.gz", "label": f"label_{n}.nii.gz"} for n in range(3)]
    assert isinstance(parser.get_parsed_content("validate#dataloader").sampler, DistributedSampler)


@pytest.mark.integration
def test_multi_gpu_configs_run_distributed_on_cpu(tiny_phantom_dataset, tmp_path):
    """torchrun with two CPU processes (gloo): the multi-GPU overrides train, checkpoint and evaluate."""
    common = ["--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_phantom_dataset)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    torchrun += ["-m", "monai.bundle", "run"]
    train = subprocess.run(
        torchrun + ["--config_file", str([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])]
        + common + ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "logs")]
        + override_arguments({**TINY_TRAINING, "epochs": 1}),
        capture_output=True, text=True,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert latest_checkpoint(tmp_path / "models").name == "latest_checkpoint_epoch=1.pt"
    # rank 0 alone saves, and alone says so (the other rank's periodic saver logged saves it never made)
    assert (train.stdout + train.stderr).count("Saved checkpoint at epoch: 1") == 1
    # only rank 0 writes TensorBoard files (events.out.tfevents.<time>.<host>.<pid>.<n>): one process's
    event_files = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert event_files and len({path.name.rsplit(".", 2)[1] for path in event_files}) == 1, event_files
    configs = [str(CONFIGS / c) for c in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    evaluate = subprocess.run(
        torchrun + ["--config_file", str(configs)] + common
        + ["--ckpt_path", str(tmp_path / "models" / "model.pt"), "--output_dir", str(tmp_path / "eval"),
           "--num_workers", "0"],
        capture_output=True, text=True,
    )
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    dataset = json.loads((tiny_phantom_dataset / "dataset.json").read_text())
    with open(tmp_path / "eval" / "val_mean_dice_raw.csv") as f:
        cases = [row["filename"] for row in csv.DictReader(f)]
    fold_0 = [str(tiny_phantom_dataset / e["image"]) for e in dataset["training"] if e["fold"] == 0]
    assert sorted(cases) == sorted(fold_0)
