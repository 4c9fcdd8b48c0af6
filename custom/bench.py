"""Benchmark of the bundle against plain PyTorch and the hardware: ``python -m custom bench [--quick] [--out FILE]``.

Why it exists: MONAI has no harness that puts a bundle's training and inference next to the bare network on
the same machine. This module measures, in one run, on phantom volumes written by the project's own
generator and converter:

(a) training throughput (2D slices/s) of the ``SupervisedTrainer`` built from ``train.json`` (its data
    pipeline and handlers) against a minimal PyTorch loop on pre-loaded tensors (same network, loss,
    optimizer, batch, patch size and threads), also for a few data-loading settings;
(b) the share of each training epoch spent waiting for data, after the first epoch;
(c) inference per volume through ``inference.json``, the TorchScript runner (``custom.deploy``) and ONNX
    Runtime, warm (model loaded) and as a cold command, with peak resident memory;
(d) time and memory against the number of cases and the slices per volume;
(e) FLOPs per slice (``torch.utils.flop_counter``) and the achieved rate against a large convolution.

Every figure is the median of repeats after a warm-up. Peak memory is the process's resident high-water mark
during the measured block; the cache column is its rise over the block's start (:class:`PeakMemory`). The report is a
Markdown document written atomically to ``out``.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.utils import instantiate

from custom.atomic import write_atomically, write_text_atomically
from custom.data.datalist import load_dataset_json, output_case_name

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``QUICK`` only checks that the harness runs end to end."""

    size: int  # in-plane matrix of the volumes (256 as in ISLES 2018)
    slices: int  # slices per volume for (a)-(c)
    source_cases: int  # distinct phantom cases; more cases reuse them under other names
    train_cases: int  # training volumes for (a)/(b)
    train_epochs: int  # epochs per training measurement, the first one is the warm-up
    plain_steps: int  # timed steps of the plain loop (after two warm-up steps)
    infer_volumes: int  # volumes per inference measurement
    repeats: int  # timed repeats of each inference measurement (after one warm-up pass)
    cold_repeats: int  # runs of each cold-start command
    patch: tuple[int, int]  # the demo's training patch
    case_counts: tuple[int, ...]  # (d): number of cases
    case_depth: int  # (d): slices per volume of the inference pass against the number of cases
    slice_counts: tuple[int, ...]  # (d): slices per volume
    depth_volumes: int  # (d): volumes per depth
    peak_conv: tuple[int, int, int]  # (batch, channels, side) of the 3x3 convolution measuring peak FLOP/s


# Sized to run in about 15 minutes on 2 busy CPU cores; raise the counts on a quiet or larger machine.
FULL = Sizes(
    size=256, slices=10, source_cases=4, train_cases=4, train_epochs=4, plain_steps=4, infer_volumes=4, repeats=2,
    cold_repeats=2, patch=(128, 128), case_counts=(10, 20, 40, 80), case_depth=2, slice_counts=(5, 10, 20, 40),
    depth_volumes=2, peak_conv=(8, 64, 128),
)
QUICK = Sizes(
    size=64, slices=3, source_cases=2, train_cases=4, train_epochs=2, plain_steps=1, infer_volumes=2, repeats=1,
    cold_repeats=2, patch=(32, 32), case_counts=(2, 4), case_depth=2, slice_counts=(2, 4), depth_volumes=1,
    peak_conv=(2, 16, 32),
)


# ----------------------------------------------------------------------------------------------- measurement tools
def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Resident memory of a block (Linux; None elsewhere): ``peak_mb``, the process's high-water mark during the
    block, and ``extra_mb``, that mark above the resident size at the block's start.

    Resets the kernel's high-water mark (``VmHWM``) through ``/proc/self/clear_refs`` on entry, reads it on exit.
    ``peak_mb`` is an upper bound of what the block needs in a fresh process (it includes the runtime and what
    earlier measurements left allocated); ``extra_mb`` is near 0 for work whose memory the allocator already holds.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_mb("VmRSS")
        except OSError:
            self.start = None
        self.extra_mb = self.peak_mb = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_mb("VmHWM")
        if self.start is not None and peak is not None:
            self.peak_mb, self.extra_mb = peak, peak - self.start


def _median(values) -> float:
    return float(statistics.median(values))


def _fmt(value, digits=2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; numbers are expected already formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def describe_machine() -> dict:
    """CPU model, cores, torch threads, library versions and GPU of this machine."""
    import monai

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


# ----------------------------------------------------------------------------------------------------- test data
def write_volumes(folder: Path, sizes: Sizes) -> dict[int, list[Path]]:
    """Phantom volumes for the benchmark: ``{slices: [image paths]}`` plus a label beside each image.

    ``sizes.source_cases`` phantom cases go through the real ISLES 2018 converter; each benchmark volume takes
    one of them and repeats its slices cyclically to the wanted depth. Each depth gets as many volumes as the
    measurements need; beyond ``source_cases`` they are symbolic links with their own names (loaders, caches
    and writers still treat them as separate cases).
    """
    from custom.data.isles2018 import prepare_isles2018
    from custom.data.phantom import write_phantom

    raw = write_phantom(folder / "raw", cases=sizes.source_cases, test_cases=0, seed=0, size=sizes.size)
    dataset = Path(prepare_isles2018(raw / "TRAINING", folder / "dataset", patients=raw / "patients.csv", folds=2))
    sources = load_dataset_json(dataset, ("training",))["training"]
    counts = {depth: sizes.depth_volumes for depth in sizes.slice_counts}
    counts[sizes.case_depth] = max(sizes.case_counts)
    # (d) trains on the first N volumes of the training depth for every N in case_counts
    counts[sizes.slices] = max(counts.get(sizes.slices, 0), 2 * sizes.train_cases, sizes.infer_volumes,
                               max(sizes.case_counts))
    volumes: dict[int, list[Path]] = {}
    for depth, count in counts.items():
        out = folder / f"d{depth}"
        written = []
        for index in range(min(count, sizes.source_cases)):
            entry = sources[index % len(sources)]
            for key in ("image", "label"):
                source = nib.load(dataset / entry[key])
                data = np.asarray(source.dataobj)
                data = np.take(data, np.arange(depth) % data.shape[2], axis=2)
                image = nib.Nifti1Image(data, source.affine, source.header)
                path = out / f"case{index}{'' if key == 'image' else '_label'}.nii.gz"
                write_atomically(path, lambda temporary, image=image: nib.save(image, temporary))
            written.append(out / f"case{index}.nii.gz")
        for index in range(len(written), count):
            for suffix in ("", "_label"):
                link = out / f"case{index}{suffix}.nii.gz"
                link.symlink_to(f"case{index % len(written)}{suffix}.nii.gz")
        volumes[depth] = [out / f"case{index}.nii.gz" for index in range(count)]
    return volumes


def _label_of(image: Path) -> Path:
    return image.with_name(image.name.replace(".nii.gz", "_label.nii.gz"))


# ----------------------------------------------------------------------------------------------------- training
def train_workflow(
    images: list[Path], work: Path, patch, samples: int, batch: int, epochs: int, configs=("train.json",), **override
):
    """The train.json workflow (plus override ``configs``) on ``images``, no validation run, files under ``work``,
    replacing the checkpoints of an earlier measurement there (they are only timed); initialised."""
    datalist = [{"image": str(p), "label": str(_label_of(p))} for p in images]
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(work),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "logs"),
        epochs=epochs,
        val_interval=epochs + 1,
        patch_size=list(patch),
        samples_per_volume=samples,
        batch_size=batch,
        overwrite=True,
        **{"train#datalist": datalist, "validate#datalist": datalist[:2], **override},
    )
    workflow.initialize()
    return workflow


def time_bundle_training(workflow) -> dict:
    """Run the workflow; per epoch after the first: slices/s and the share of time spent getting batches."""
    trainer = workflow.parser.get_parsed_content("train#trainer")
    marks: dict[str, list] = {"epoch": [], "slices": [], "wait": []}
    clock = {}

    def epoch_started(engine):
        marks["epoch"].append(time.perf_counter())
        marks["slices"].append(0)
        marks["wait"].append(0.0)

    def batch_started(engine):
        clock["batch"] = time.perf_counter()

    def batch_completed(engine):
        marks["wait"][-1] += time.perf_counter() - clock["batch"]
        marks["slices"][-1] += int(engine.state.batch["image"].shape[0])  # still collated here

    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, batch_started)
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, batch_completed)
    # Events.COMPLETED fires after every epoch-end handler (checkpointing included) of the last epoch.
    trainer.add_event_handler(Events.COMPLETED, lambda engine: marks["epoch"].append(time.perf_counter()))
    with PeakMemory() as memory:
        workflow.run()
    durations = np.diff(marks["epoch"])[1:]
    return {
        "slices_per_s": _median(np.asarray(marks["slices"][1:]) / durations),
        "data_wait": _median(np.asarray(marks["wait"][1:]) / durations),
        "slices_per_epoch": marks["slices"][-1],
        "peak_mb": memory.peak_mb,
    }


def plain_optimizer(parser, network: torch.nn.Module) -> torch.optim.Optimizer:
    """The config's ``optimizer`` (class and every setting, as parsed from train.json) on ``network``'s parameters:
    the plain loop's, read from the config so that its settings cannot drift from the workflow's."""
    config = parser["optimizer"]
    settings = {
        key: parser.get_parsed_content(f"optimizer#{key}")
        for key in config
        if key != "params" and not key.startswith("_")
    }
    return instantiate(config["_target_"], "default", params=network.parameters(), **settings)


def time_plain_training(workflow, steps: int, channels_last: bool = False) -> dict:
    """The minimal PyTorch loop on one pre-loaded batch of the workflow's data: slices/s of the median step.

    Same network definition, loss, optimizer settings and batch as the workflow, on this process's threads.
    """
    parser = workflow.parser
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    device = parser.get_parsed_content("device")
    images, labels = batch["image"].as_tensor().to(device), batch["label"].as_tensor().to(device)
    network = parser.get_parsed_content("network_def", instantiate=True).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    loss_function = parser.get_parsed_content("loss", instantiate=True)
    optimizer = plain_optimizer(parser, network)
    network.train()
    times = []
    for _ in range(2 + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
        float(loss)  # waits for the device
        times.append(time.perf_counter() - start)
    return {"slices_per_s": images.shape[0] / _median(times[2:]), "batch": tuple(images.shape)}


def training_throughput(volumes, work: Path, sizes: Sizes) -> tuple[list, list, dict]:
    """(a) and (b): bundle against plain loop, full slices and patches; data-loading variants on patches."""
    # (name, patch, samples per volume, batch size, volumes): train.json's full slices and demo.json's patches.
    configs = [
        ("full slices", [-1, -1], 8, 4, sizes.train_cases),
        ("demo patches", list(sizes.patch), 4, 4, 2 * sizes.train_cases),
    ]
    if sizes is QUICK:
        configs = [
            ("full slices", [-1, -1], 2, 2, sizes.train_cases),
            ("demo patches", list(sizes.patch), 2, 2, sizes.train_cases),
        ]
    rows, variant_rows, rates = [], [], {}
    for name, patch, samples, batch, cases in configs:
        images = volumes[sizes.slices][:cases]
        workflow = train_workflow(images, work / name.replace(" ", "_"), patch, samples, batch, sizes.train_epochs)
        plain = time_plain_training(workflow, sizes.plain_steps)
        bundle = time_bundle_training(workflow)
        side = f"{sizes.size}x{sizes.size}" if patch[0] < 0 else f"{patch[0]}x{patch[1]}"
        rates[name] = {"side": side, "bundle": bundle["slices_per_s"], "plain": plain["slices_per_s"]}
        rows.append(
            [
                f"{name} ({side})",
                f"{plain['batch'][0]}",
                _fmt(bundle["slices_per_s"]),
                _fmt(plain["slices_per_s"]),
                _fmt(bundle["slices_per_s"] / plain["slices_per_s"]),
                f"{100 * bundle['data_wait']:.1f} %",
                _fmt(bundle["peak_mb"], 0),
            ]
        )
        if name == "demo patches":
            rates["patch_batch"] = plain["batch"]
            variants = [
                (f"{loader}, num_workers={workers}", {"train#dataloader#_target_": loader, "num_workers": workers})
                for loader, workers in (
                    ("DataLoader", 0), ("DataLoader", 2), ("DataLoader", 4), ("ThreadDataLoader", 0)
                )
            ]
            for label, override in variants:
                run = time_bundle_training(
                    train_workflow(images, work / "variant", patch, samples, batch, sizes.train_epochs, **override)
                )
                variant_rows.append(
                    [label, _fmt(run["slices_per_s"]), _fmt(run["slices_per_s"] / plain["slices_per_s"]),
                     f"{100 * run['data_wait']:.1f} %"]
                )
            cl = time_plain_training(workflow, sizes.plain_steps, channels_last=True)
            variant_rows.append(["plain loop, channels_last", _fmt(cl["slices_per_s"]), "", ""])
        del workflow
        gc.collect()
    return rows, variant_rows, rates


def distributed_point(arguments_json: str) -> None:
    """One rank of the distributed measurement, run by torchrun: train.json + multi_gpu_train.json on the demo
    patches; rank 0 writes the slices/s of all ranks together to ``result``."""
    arguments = json.loads(arguments_json)
    images = [Path(p) for p in arguments["images"]]
    workflow = train_workflow(
        images, Path(arguments["work"]), arguments["patch"], 4, 4, arguments["epochs"],
        configs=("train.json", "multi_gpu_train.json"),
    )
    result = time_bundle_training(workflow)
    world = int(os.environ["WORLD_SIZE"])
    if int(os.environ["RANK"]) == 0:
        total = {"slices_per_s": result["slices_per_s"] * world, "data_wait": result["data_wait"]}
        write_text_atomically(arguments["result"], json.dumps(total))
    workflow.finalize()


def distributed_throughput(volumes, work: Path, sizes: Sizes) -> list:
    """(f): training slices/s of train.json + multi_gpu_train.json under torchrun with 1 and 2 processes."""
    rows = []
    for processes in (1, 2):
        result = work / f"ddp{processes}.json"
        arguments = {
            "images": [str(p) for p in volumes[sizes.slices][: 2 * sizes.train_cases]],
            "work": str(work / f"ddp{processes}"),
            "patch": list(sizes.patch), "epochs": sizes.train_epochs, "result": str(result),
        }
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "custom.bench", json.dumps(arguments)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        if completed.returncode != 0:
            raise RuntimeError(f"distributed measurement failed: {' '.join(command)}\n{completed.stderr[-3000:]}")
        measured = json.loads(result.read_text())
        threads = torch.get_num_threads() if processes == 1 else 1  # torchrun sets OMP_NUM_THREADS=1 for several
        rows.append([processes, threads, _fmt(measured["slices_per_s"]), f"{100 * measured['data_wait']:.1f} %"])
    return rows


# ---------------------------------------------------------------------------------------------------- inference
def inference_workflow(images: list[Path], out: Path, num_workers: int = 0):
    """The inference.json workflow on ``images`` with the shipped checkpoint, initialised."""
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        datalist=[str(p) for p in images],
        output_dir=str(out),
        num_workers=num_workers,
    )
    workflow.initialize()
    return workflow


def _timed_passes(run_once, volumes: int, repeats: int) -> dict:
    """Seconds per volume (median over ``repeats`` passes after one warm-up pass) and the peak RSS."""
    run_once()
    times = []
    with PeakMemory() as memory:
        for _ in range(repeats):
            start = time.perf_counter()
            run_once()
            times.append((time.perf_counter() - start) / volumes)
    return {"s_per_volume": _median(times), "peak_mb": memory.peak_mb}


def _bundle_pass(images, out, num_workers=0):
    workflow = inference_workflow(images, out, num_workers)
    evaluator = workflow.parser.get_parsed_content("evaluator")
    return evaluator.run


def _runner_pass(network, images, out):
    from custom import deploy

    def run_once():
        for path in images:
            volume, affine = deploy.read_case(path)
            mask = deploy.segment_volume(network, volume)
            deploy.write_mask(mask, affine, out / f"{output_case_name(path)}_seg.nii.gz")

    return run_once


def export_models(work: Path) -> dict[str, Path]:
    """The shipped TorchScript model and an ONNX export of the shipped checkpoint (written under ``work``)."""
    from custom.onnx_export import export_onnx

    onnx = export_onnx(
        ckpt=str(BUNDLE / "models" / "model.pt"), out=str(work / "model.onnx"),
        config=str(CONFIGS / "inference.json"), meta=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE),
    )
    return {"torchscript": BUNDLE / "models" / "model.ts", "onnx": Path(onnx)}


def _cold_start(command: list[str], repeats: int) -> float:
    """Median wall time in seconds of a command run from a fresh interpreter."""
    times = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for _ in range(repeats):
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        times.append(time.perf_counter() - start)
        if completed.returncode != 0:
            raise RuntimeError(f"cold-start command failed: {' '.join(command)}\n{completed.stderr[-2000:]}")
    return _median(times)


ONNX_SCRIPT = (
    "import sys; from pathlib import Path; from custom import deploy; from custom.onnx_export import OnnxNetwork; "
    "net = OnnxNetwork(sys.argv[1]); volume, affine = deploy.read_case(sys.argv[2]); "
    "deploy.write_mask(deploy.segment_volume(net, volume), affine, Path(sys.argv[3]) / 'onnx_seg.nii.gz')"
)


def inference_latency(volumes, work: Path, sizes: Sizes, models) -> tuple[list, dict]:
    """(c): warm seconds per volume and peak RSS of the three runners; cold start of each command."""
    from custom.onnx_export import OnnxNetwork

    images = volumes[sizes.slices][: sizes.infer_volumes]
    out = work / "infer"
    runners = {
        "inference.json (monai.bundle)": _bundle_pass(images, out / "bundle"),
        "TorchScript (custom.deploy)": _runner_pass(
            torch.jit.load(str(models["torchscript"])).eval(), images, out / "ts"
        ),
        "ONNX Runtime (OnnxNetwork)": _runner_pass(OnnxNetwork(models["onnx"]), images, out / "onnx"),
    }
    one = str(images[0])
    cold_commands = {
        "inference.json (monai.bundle)": [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json"),
            "--bundle_root", str(BUNDLE), "--datalist", json.dumps([one]), "--output_dir", str(out / "cold_bundle"),
            "--overwrite", "True",  # each repeat replaces the mask of the one before
        ],
        "TorchScript (custom.deploy)": [
            sys.executable, "-m", "custom", "deploy", one, "--model", str(models["torchscript"]),
            "--out", str(out / "cold_ts"), "--overwrite",
        ],
        "ONNX Runtime (OnnxNetwork)": [sys.executable, "-c", ONNX_SCRIPT, str(models["onnx"]), one, str(out)],
    }
    rows, rates = [], {}
    for name, run_once in runners.items():
        warm = _timed_passes(run_once, len(images), sizes.repeats)
        cold = _cold_start(cold_commands[name], sizes.cold_repeats)
        rates[name] = sizes.slices / warm["s_per_volume"]
        rows.append([name, _fmt(warm["s_per_volume"], 3), _fmt(warm["peak_mb"], 0), _fmt(cold, 2)])
    return rows, rates


# ------------------------------------------------------------------------------------------------------ scaling
def scaling(volumes, work: Path, sizes: Sizes) -> tuple[list, list]:
    """(d): cache fill, a training epoch and an inference pass against the number of cases; inference per depth."""
    case_rows = []
    for count in sizes.case_counts:
        images = volumes[sizes.slices][:count]
        with PeakMemory() as cache_memory:
            start = time.perf_counter()
            workflow = train_workflow(images, work / f"scale{count}", list(sizes.patch), 2, 4, 2, num_workers=0)
            workflow.parser.get_parsed_content("train#dataset")
            cache_s = time.perf_counter() - start
        epoch = time_bundle_training(workflow)
        del workflow
        run_once = _bundle_pass(volumes[sizes.case_depth][:count], work / f"scale_infer{count}")
        with PeakMemory() as infer_memory:
            start = time.perf_counter()
            run_once()
            infer_s = time.perf_counter() - start
        del run_once
        case_rows.append(
            [count, _fmt(cache_s, 1), _fmt(cache_memory.extra_mb, 0),
             _fmt(epoch["slices_per_epoch"] / epoch["slices_per_s"], 1), _fmt(epoch["peak_mb"], 0),
             _fmt(infer_s, 1), _fmt(infer_memory.peak_mb, 0)]
        )
    depth_rows = []
    for depth in sizes.slice_counts:
        images = volumes[depth][: sizes.depth_volumes]
        warm = _timed_passes(_bundle_pass(images, work / f"depth{depth}"), len(images), sizes.repeats)
        depth_rows.append([depth, _fmt(warm["s_per_volume"], 3), _fmt(1000 * warm["s_per_volume"] / depth, 1),
                           _fmt(warm["peak_mb"], 0)])
    return case_rows, depth_rows


# -------------------------------------------------------------------------------------------------------- FLOPs
def flops(sizes: Sizes, training_rates: dict, inference_rates: dict) -> tuple[list, dict]:
    """(e): FLOPs per slice of the network, the peak conv rate, and achieved GFLOP/s of each measured rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from custom.losses import WeightedCEGeneralizedDiceLoss

    parser = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type="train", bundle_root=str(BUNDLE),
    ).parser
    network = parser.get_parsed_content("network_def", instantiate=True)

    def per_slice(side: int, train: bool) -> float:
        images = torch.randn(2, 5, side, side)
        counter = FlopCounterMode(display=False)
        with counter:
            if train:
                labels = (torch.rand(2, 1, side, side) > 0.9).long()
                WeightedCEGeneralizedDiceLoss()(network(images), labels).backward()
            else:
                with torch.inference_mode():
                    network.eval()(images)
        network.train()
        return counter.get_total_flops() / 2

    batch, channels, side = sizes.peak_conv
    x, w = torch.randn(batch, channels, side, side), torch.randn(channels, channels, 3, 3)
    conv_flops = 2 * batch * channels * channels * 9 * side * side
    times = []
    with torch.inference_mode():
        for _ in range(2 + sizes.repeats * 2):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            times.append(time.perf_counter() - start)
    peak = conv_flops / _median(times[2:]) / 1e9

    rows = [["3x3 convolution " + f"{batch}x{channels}x{side}x{side} (peak reference)", "", "", _fmt(peak, 1), "100 %"]]
    sides = {"full slices": sizes.size, "demo patches": sizes.patch[0]}
    for name, side_px in sides.items():
        work_per_slice = per_slice(side_px, train=True) / 1e9
        for who in ("bundle", "plain"):
            rate = training_rates[name][who]
            achieved = rate * work_per_slice
            rows.append([f"training, {name}, {who}", training_rates[name]["side"], _fmt(work_per_slice, 2),
                         _fmt(achieved, 1), f"{100 * achieved / peak:.0f} %"])
    forward = per_slice(sizes.size, train=False) / 1e9
    for name, rate in inference_rates.items():
        achieved = rate * forward
        rows.append([f"inference, {name}", f"{sizes.size}x{sizes.size}", _fmt(forward, 2), _fmt(achieved, 1),
                     f"{100 * achieved / peak:.0f} %"])
    return rows, {"peak": peak, "forward": forward}


# --------------------------------------------------------------------------------------------------------- report
def bench(quick: bool = False, out: str | None = None, work_dir: str | None = None) -> str:
    """Measure training, inference, scaling and FLOPs of the bundle on phantom data; write a Markdown report.

    Args:
        quick: tiny sizes (64 x 64 volumes, a few cases) that only check the harness runs end to end.
        out: the Markdown file to write (replaced atomically; an existing file keeps its text around the generated
            block). Default: ``docs/performance.md``, and ``runs/bench_quick.md`` with ``quick``, whose toy numbers
            would otherwise replace the measured tables that the text of docs/performance.md interprets.
        work_dir: folder for the generated volumes, checkpoints and masks (default: a temporary folder,
            removed at the end).

    Returns:
        The path of the report.
    """
    sizes = QUICK if quick else FULL
    out = out or ("runs/bench_quick.md" if quick else "docs/performance.md")
    command = "python -m custom bench" + (" --quick" if quick else "") + f" --out {out}"
    load_before, started = os.getloadavg(), time.perf_counter()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        volumes = write_volumes(work / "volumes", sizes)
        train_rows, variant_rows, training_rates = training_throughput(volumes, work / "train", sizes)
        models = export_models(work)
        infer_rows, inference_rates = inference_latency(volumes, work, sizes, models)
        case_rows, depth_rows = scaling(volumes, work / "scaling", sizes)
        flop_rows, _ = flops(sizes, training_rates, inference_rates)
        ddp_rows = distributed_throughput(volumes, work / "ddp", sizes)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    load_after, runtime = os.getloadavg(), time.perf_counter() - started
    machine = describe_machine()
    sections = [
        "## Machine\n",
        _table(["item", "value"], [[k, v] for k, v in machine.items()]
               + [["load average (1, 5, 15 min) before", ", ".join(f"{v:.2f}" for v in load_before)],
                  ["load average (1, 5, 15 min) after", ", ".join(f"{v:.2f}" for v in load_after)],
                  ["bench runtime", f"{runtime:.0f} s"]]),
        f"\nCommand: `{command}`; volumes: {sizes.size} x {sizes.size} in-plane, phantom data through the real "
        "converter, 5 channels, gzip NIfTI. Peak MiB is the process's resident high-water mark during the "
        "measured block (runtime included, and whatever earlier measurements left allocated: an upper bound); "
        "cache MiB is that mark's rise over the block's start.\n",
        "## (a, b) Training throughput: train.json against a plain PyTorch loop\n",
        f"Training volumes of {sizes.slices} slices ({sizes.train_cases} for full slices, 8 per volume, batch 4; "
        f"{2 * sizes.train_cases} for the demo's patches, 4 per volume, batch 4), {sizes.train_epochs} epochs of "
        "which the "
        "first is the warm-up; slices/s is the median over the other epochs (epoch = from its start to the next, "
        "every handler included). Plain loop: the same network, loss, AdamW and batch on one pre-loaded batch, "
        f"median of {sizes.plain_steps} steps after 2 warm-up steps. Data wait = time inside the loader's `next()`"
        " per epoch.\n",
        _table(["configuration", "slices per step", "bundle slices/s", "plain slices/s", "ratio", "data wait",
                "epochs peak MiB"], train_rows),
        "\n### Data-loading settings (demo patches)\n",
        _table(["train#dataloader", "bundle slices/s", "ratio to plain", "data wait"], variant_rows),
        "\n## (c) Inference per volume\n",
        f"{sizes.infer_volumes} volumes of {sizes.slices} slices; NIfTI read to mask written, model loaded, median "
        f"of {sizes.repeats} passes after a warm-up pass. Cold start: one volume, the whole command from a fresh "
        f"interpreter (median of {sizes.cold_repeats}).\n",
        _table(["runner", "warm s/volume", "peak MiB", "cold start s"], infer_rows),
        "\n## (d) Scaling\n",
        f"Against the number of cases: building train.json's CacheDataset of {sizes.slices}-slice volumes, its "
        "second training epoch (demo patches, 2 samples per volume, batch 4, `num_workers=0`), and one "
        f"inference.json pass (model loaded) over as many {sizes.case_depth}-slice volumes.\n",
        _table(["cases", "cache fill s", "cache MiB", "train epoch s", "train epoch peak MiB", "inference s",
                "inference peak MiB"],
               case_rows),
        f"\nAgainst the slices per volume (inference.json, warm, {sizes.depth_volumes} volumes, median of "
        f"{sizes.repeats} passes):\n",
        _table(["slices", "s/volume", "ms/slice", "peak MiB"], depth_rows),
        "\n## (e) FLOPs and achieved rate\n",
        "FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (training: forward, loss and backward). "
        "Peak: median of a large 3x3 convolution in the same process.\n",
        _table(["what", "slice", "GFLOP/slice", "achieved GFLOP/s", "of peak"], flop_rows),
        "\n## (f) Distributed data parallel on this machine\n",
        "train.json + multi_gpu_train.json under `torchrun --standalone --nproc_per_node=N` (gloo on CPU, NCCL on "
        f"GPUs), demo patches, {2 * sizes.train_cases} volumes, 4 per volume, batch 4 per process; slices/s of all "
        "processes together, median over the epochs after the first.\n",
        _table(["processes", "threads per process", "slices/s", "data wait (rank 0)"], ddp_rows),
    ]
    tables = "\n".join(sections) + "\n"
    write_text_atomically(out, with_tables(Path(out), f"{BEGIN}\n<!-- generated by `{command}` -->\n{tables}{END}"))
    print(tables)
    return str(out)


BEGIN, END = "<!-- bench tables: begin -->", "<!-- bench tables: end -->"


def with_tables(path: Path, block: str) -> str:
    """The text of ``path`` with its generated block replaced by ``block`` (a new file is the block alone).

    The prose around the markers is kept; an existing file without both markers is refused rather than
    overwritten.
    """
    if not path.exists():
        return f"# Performance\n\n{block}\n"
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"'{path}' exists but has no '{BEGIN}' ... '{END}' block to replace; choose another --out")
    head, rest = text.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


if __name__ == "__main__":
    distributed_point(sys.argv[1])
