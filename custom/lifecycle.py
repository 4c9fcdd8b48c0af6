"""Pieces of the training lifecycle that MONAI lacks, used by ``configs/train.json``.

- :class:`ValidationAtIntervalAndEnd`: validation every ``interval`` epochs *and* after the last epoch,
  so a run of any length ends with a ``model.pt`` chosen by validation.
- :class:`ResumableBestMetric`: the best validation score as an entry of the resumable checkpoint, so
  ``--resume_ckpt`` does not forget which ``model.pt`` is the best one.
- :class:`CrashSafeCheckpointSaver`: MONAI's ``CheckpointSaver`` writing through ``custom.atomic``, so
  ``kill -9`` never leaves a truncated checkpoint under its final name.
  A run takes over the periodic checkpoints of the run it resumes, so ``n_saved`` counts both runs' files.
- :func:`latest_checkpoint`: the newest periodic checkpoint of a ``ckpt_dir``, the one to resume from.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, DiskSaver
from monai.engines import Evaluator
from monai.handlers import CheckpointSaver, ValidationHandler

from custom.atomic import write_atomically


class ValidationAtIntervalAndEnd(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also runs the validator after the trainer's last epoch.

    Why it exists: ``ValidationHandler`` fires on ``EPOCH_COMPLETED(every=interval)`` only, so a run
    shorter than ``interval`` (``--epochs 1``, a MONAI Label fine-tune of a few epochs) never validates,
    the best-metric ``CheckpointSaver`` never writes ``model.pt``, and the epochs after the last multiple
    of ``interval`` are never considered. The last epoch is ``engine.state.max_epochs``, which is what
    MONAI Label overrides (``train#trainer#max_epochs``). A run stopped early by ``terminate()`` (the
    ``time_budget_s`` limit) is validated once more when it stops, so it too ends with a ``model.pt``.
    """

    def __init__(self, interval: int, validator: Evaluator | None = None, exec_at_start: bool = False) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=True, exec_at_start=exec_at_start)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
        engine.add_event_handler(Events.TERMINATE, self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)


class ResumableBestMetric:
    """The validator's best key metric and the best-model saver's record of it, as a checkpoint entry.

    Why it exists: MONAI's ``CheckpointSaver(save_key_metric=True)`` keeps the score of the saved best
    model in memory only, and the validator's ``state.best_metric`` starts again at -1; after
    ``--resume_ckpt`` the first validation therefore overwrites ``model.pt`` even when it is worse.
    MONAI can store that record only inside the best-model file itself (``key_metric_save_state``), which
    would make ``model.pt`` more than a state dict. Listed with the network, optimizer, scheduler and
    trainer in the ``save_dict``/``load_dict`` of the latest checkpoint, this object restores both.
    The record holds numbers and file names only, so it loads with ``weights_only=True``.
    """

    def __init__(self, validator: Evaluator, best_model_saver: CheckpointSaver) -> None:
        if best_model_saver._key_metric_checkpoint is None:
            raise ValueError("best_model_saver must be a CheckpointSaver with save_key_metric=True")
        self.validator = validator
        self.best_model_saver = best_model_saver

    def state_dict(self) -> dict:
        return {
            "best_metric": float(self.validator.state.best_metric),
            "best_metric_epoch": int(self.validator.state.best_metric_epoch),
            # MONAI exposes CheckpointSaver.load_state_dict but not its counterpart; ignite's Checkpoint has it.
            "best_model_saver": dict(self.best_model_saver._key_metric_checkpoint.state_dict()),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.validator.state.best_metric = state_dict["best_metric"]
        self.validator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        self.best_model_saver.load_state_dict(state_dict["best_model_saver"])


class _AtomicDiskSaver(BaseSaveHandler):
    """The save handler MONAI's CheckpointSaver builds (an ignite ``DiskSaver``), writing atomically.

    A fixed file name (``model.pt``) is never removed before it is replaced: the rename replaces it, so
    the file exists at every moment, also for a MONAI Label server reading it during a fine-tune.
    """

    def __init__(self, disk_saver: DiskSaver) -> None:
        self.disk_saver = disk_saver
        self.fixed_filename = getattr(disk_saver, "filename", None)  # MONAI's fixed-name DiskSaver subclass

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() == self.disk_saver.save_on_rank:
            path = self.disk_saver.dirname / (self.fixed_filename or filename)
            write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))

    def remove(self, filename: str) -> None:
        if self.fixed_filename is None:
            self.disk_saver.remove(filename)


class CrashSafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files go through :func:`custom.atomic.write_atomically`.

    Why it exists: MONAI builds its ignite ``DiskSaver`` with ``atomic=False``, so ``kill -9`` or a full
    disk during ``torch.save`` leaves a truncated checkpoint under its final name, and ignite removes the
    previous checkpoint before it writes the next one. Written through a temporary file and a rename,
    with ``n_saved`` of 2 or more for the periodic checkpoints, the newest complete checkpoint is always
    on disk under its own name.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(checkpoint.save_handler)

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self._interval_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, self._take_over_periodic_checkpoints)

    def _take_over_periodic_checkpoints(self, engine: Engine) -> None:
        """Make the folder's periodic checkpoints this run's: ignite's record of them starts empty in every run, so
        a resumed run would keep all of the run it resumed, and a run replacing another would leave its later ones
        (which ``latest_checkpoint`` would then pick).

        Runs on ``STARTED``, after a ``CheckpointLoader`` attached before this saver has restored the step: the
        checkpoints up to that step count as this run's (``n_saved`` of them kept, the newest), those after it
        belong to the run this one replaces or resumes from an earlier point, and are removed.
        """
        checkpoint = self._interval_checkpoint
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        # ignite's file name: <prefix>_<name>_<score_name>=<n>.pt, name "checkpoint" for several objects
        prefix = f"{checkpoint.filename_prefix}_" if checkpoint.filename_prefix else ""
        name = next(iter(self.save_dict)) if len(self.save_dict) == 1 else "checkpoint"
        found = periodic_checkpoints(self.save_dir, prefix + name, checkpoint.score_name)
        earlier = [(number, path.name) for number, path in found if number <= step]
        kept = earlier[-checkpoint.n_saved:] if checkpoint.n_saved else earlier
        for number, path in found:
            if (number, path.name) not in kept:
                checkpoint.save_handler.remove(path.name)
        checkpoint.load_state_dict({"_saved": kept})


def periodic_checkpoints(folder, basename: str = "latest_checkpoint", score_name: str = "epoch") -> list:
    """The ``<basename>_<score_name>=<n>.pt`` files of ``folder`` (MONAI's CheckpointSaver names its periodic
    checkpoints so) as ``(n, path)``, oldest first."""
    pattern = re.compile(rf"{re.escape(basename)}_{re.escape(score_name)}=(\d+)\.pt")
    matches = ((pattern.fullmatch(path.name), path) for path in Path(folder).glob("*.pt"))
    return sorted((int(match.group(1)), path) for match, path in matches if match)


def latest_checkpoint(ckpt_dir) -> Path | None:
    """The newest ``latest_checkpoint_epoch=N.pt`` written by train.json's CheckpointSaver, or None."""
    found = periodic_checkpoints(ckpt_dir)
    return found[-1][1] if found else None
