"""Ignite handlers MONAI lacks: a per-case lesion volume table, a report of rejected inputs, named checkpoint errors
(also for checkpoints loaded without an engine, as the fold ensemble's members are)."""

import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader
from monai.optimizers import WarmupCosineSchedule

from custom.clinical import case_volumes, describe, write_volume_table
from custom.data.datalist import output_case_name
from custom.deploy import read_stacked_image
from custom.training_record import check_record


class LesionVolumeWriter:
    """Write ``lesion_volumes.csv`` (``custom.clinical.VOLUME_COLUMNS``) for every segmented case at the end of a run.

    Why it exists: MONAI's ``MetricsSaver`` needs a ground truth; inference has none, yet clinicians read the
    lesion volume first, next to the perfusion volumes. Reads each decollated output's ``pred_key`` (a binary
    mask MetaTensor on the input grid, with its affine), re-reads the raw maps of the image file named in its
    meta (``filename_or_obj``; not the normalised network input) and builds the row with
    ``custom.clinical.case_volumes``, as ``custom/deploy.py`` does: lesion voxels and mL, hypoperfusion
    (Tmax > 6 s), threshold-rule core, mismatch, and the research-use-only label. Logs one line per case.
    """

    def __init__(self, output_file: str, pred_key: str = "pred") -> None:
        self.output_file = Path(output_file)
        self.pred_key = pred_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            pred = output[self.pred_key]
            if not isinstance(pred, MetaTensor):
                raise TypeError(f"'{self.pred_key}' must be a MetaTensor carrying its affine, got {type(pred)}")
            image = str(pred.meta.get("filename_or_obj") or "")
            if not image:
                raise ValueError(
                    f"'{self.pred_key}' names no image file (meta 'filename_or_obj'); the volume table re-reads the "
                    "raw maps from it"
                )
            case = output_case_name(image)
            maps, _ = read_stacked_image(image)
            mask = pred.detach().cpu().numpy()
            if mask.ndim == 4 and mask.shape[0] == 1:  # channel-first (1, H, W, D) after AsDiscreted(argmax)
                mask = mask[0]
            try:
                volumes = case_volumes(maps, mask > 0, pred.affine.cpu().numpy(), case)
            except ValueError as err:
                raise ValueError(f"'{image}': {err}") from err
            row = {"case": case, "image": image, **volumes}
            self.rows.append(row)
            engine.logger.info(describe(row))

    def _write(self, engine: Engine) -> None:
        write_volume_table(self.rows, self.output_file)


class RejectedImagesReporter:
    """Fail an inference run at its end, naming every image that was set aside and why.

    Why it exists: one bad case must not stop the others, yet must not pass unnoticed. The images are
    screened before the run (``custom.data.datalist.screen_inference_images``); the good ones are segmented
    and written, then this handler, attached after the writers, logs each rejected image and raises, so the
    command exits non-zero.
    """

    def __init__(self, rejected: dict[str, str]) -> None:
        self.rejected = dict(rejected)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _report(self, engine: Engine) -> None:
        if not self.rejected:
            return
        for reason in self.rejected.values():
            engine.logger.error(f"not segmented: {reason}")
        listing = "\n  - ".join(self.rejected.values())
        raise RuntimeError(
            f"{len(self.rejected)} image(s) not segmented (the other images were written):\n  - {listing}"
        )


@contextmanager
def checkpoint_errors_named(path, targets) -> Iterator[None]:
    """Re-raise a checkpoint loading error with the checkpoint's file name and the ``targets`` it was loaded into.

    ``weights_only=True`` refuses a pickle that would run code, ``load_state_dict`` lists the missing,
    unexpected and mismatched weights of a checkpoint of another architecture, and ``torch.load`` rejects a
    truncated file, but none names the file, and the last two are both ``RuntimeError``s; resuming from a
    ``model.pt`` (weights only) failed in ignite: ``Key 'optimizer' from x is not found in y``. They are re-raised as
    ValueErrors, refusals of the file (which the command lines print as one line: ``custom.deploy.is_refusal``).
    """
    try:
        yield
    except FileNotFoundError as err:
        raise FileNotFoundError(f"checkpoint '{path}' does not exist") from err
    except pickle.UnpicklingError as err:
        raise ValueError(f"checkpoint '{path}' is refused by safe loading (weights_only=True): {err}") from err
    except (RuntimeError, KeyError, ValueError) as err:
        try:  # torch.load reports a truncated or foreign file as a RuntimeError too: tell the two apart
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as unreadable:
            raise ValueError(
                f"checkpoint '{path}' cannot be read (truncated, or not a PyTorch checkpoint): {unreadable}"
            ) from err
        if isinstance(loaded, Mapping) and loaded and all(str(name).startswith("members.") for name in loaded):
            # a ProbabilityEnsemble's state dict was reported as "another architecture or input channels"
            raise ValueError(
                f"checkpoint '{path}' is an ensemble checkpoint (python -m custom ensemble-checkpoint), not one "
                "network's weights: segment with it as inference.json's --ensemble_ckpt_paths, score the folds' "
                "ensemble with python -m custom ensemble-bench CV_DIR, or pass one of its members' model.pt"
            ) from err
        if isinstance(err, ValueError):  # ignite's `Key 'optimizer' from x is not found in y`, naming no file
            missing = [str(target) for target in targets if isinstance(loaded, Mapping) and str(target) not in loaded]
            if not missing:
                raise
            raise ValueError(
                f"checkpoint '{path}' holds no {', '.join(missing)}: it is one network's weights (a model.pt), not a "
                "training checkpoint; --resume_ckpt takes a latest_checkpoint_epoch=N.pt of the run's ckpt_dir"
            ) from err
        raise ValueError(
            f"checkpoint '{path}' does not fit {', '.join(map(str, targets))} "
            "(another architecture, or weights trained with other input channels: contralateral_channels or "
            f"adjacent_slices?): {err}"
        ) from err


def load_network_checkpoint(
    path, network: torch.nn.Module, key: str = "model", name: str = "model", input_settings=None
) -> None:
    """Load the weights of checkpoint ``path`` into ``network`` as ``NamedCheckpointLoader`` does, without an engine.

    The file is read with ``weights_only=True`` on the CPU; a checkpoint holding ``{key: state_dict, ...}`` (as
    train.json's CheckpointSaver writes) gives its ``key`` entry, any other is taken as the state dict itself.
    Loading is strict; every failure names the file (``checkpoint_errors_named``). With ``input_settings`` (config
    id -> value, ``custom.training_record.INPUT_SETTINGS``), a checkpoint whose training record differs is refused.
    """
    if input_settings is not None:
        check_record(path, input_settings)
    with checkpoint_errors_named(path, [name]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, Mapping):
            raise RuntimeError(f"expected a state dict, found {type(checkpoint).__name__}")
        network.load_state_dict(checkpoint[key] if key in checkpoint else checkpoint, strict=True)


class NamedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` whose errors name the checkpoint file, and which keeps the configured length of
    a warm-up/cosine schedule as MONAI's keeps the configured ``max_epochs``.

    Why it exists: a checkpoint of another architecture or channel count makes ``load_state_dict`` list the
    missing, unexpected and mismatched weights, and ``weights_only=True`` refuses a pickle that would run
    code, but neither error names the file they came from. And a ``WarmupCosineSchedule``'s state holds its
    ``t_total`` and ``warmup_steps``: a run resumed with more ``epochs``, or without the ``time_budget_s`` that
    fitted it, would follow the checkpoint's shorter cosine past its end, where the learning rate climbs back
    to its peak. The resumed run continues from the checkpoint's step on the schedule its configuration sets,
    from its first step on (the optimizer's restored learning rate is set to that schedule's). And ``model.pt`` holds
    no input settings: with ``input_settings`` (config id -> this run's value) a checkpoint whose training record
    (``custom.training_record``) names other values is refused (weights trained with ``contralateral_channels``
    ``difference`` took ``mirror``'s 10 channels without a word).
    """

    def __init__(self, *args, input_settings=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_settings = input_settings

    def __call__(self, engine: Engine) -> None:
        if self.input_settings is not None:
            check_record(self.load_path, self.input_settings)
        configured = {
            schedule: (schedule.t_total, schedule.warmup_steps)
            for schedule in self.load_dict.values()
            if isinstance(schedule, WarmupCosineSchedule)
        }
        with checkpoint_errors_named(self.load_path, self.load_dict):
            super().__call__(engine)
        for schedule, (t_total, warmup_steps) in configured.items():
            schedule.t_total, schedule.warmup_steps = t_total, warmup_steps
            # the optimizer state brought the rate the checkpoint's schedule set for this step (0 at the end of a
            # finished run): the first resumed step takes the configured schedule's rate instead
            rates = [base * rate(schedule.last_epoch) for base, rate in zip(schedule.base_lrs, schedule.lr_lambdas)]
            for group, lr in zip(schedule.optimizer.param_groups, rates):
                group["lr"] = lr


class RefuseNonFiniteLoss:
    """Stop a training run with a ValueError at the first iteration whose loss is not finite.

    Why it exists: a diverged run (``--learning_rate 1e12``) trained on with NaN weights to its last epoch, and its
    first validation wrote them as ``model.pt`` (every weight NaN), with exit status 0. Ignite's ``TerminateOnNan``
    only ends the run, which then validates and saves as a run stopped early does.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output  # MONAI's trainer: a dict, or a list of per-sample dicts after decollation
        loss = torch.as_tensor((output[0] if isinstance(output, list) else output)["loss"])
        if not torch.isfinite(loss).all():
            raise ValueError(
                f"training loss is {loss.float().mean().item()} at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration}: the weights diverged (config id 'learning_rate' too high?); the run stops "
                "before they are validated or saved as model.pt"
            )
