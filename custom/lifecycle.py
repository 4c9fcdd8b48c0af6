"""Two pieces of the training lifecycle that MONAI lacks, used by ``configs/train.json``.

- :class:`ValidationAtIntervalAndEnd`: validation every ``interval`` epochs *and* after the last epoch,
  so a run of any length ends with a ``model.pt`` chosen by validation.
- :class:`ResumableBestMetric`: the best validation score as an entry of the resumable checkpoint, so
  ``--resume_ckpt`` does not forget which ``model.pt`` is the best one.
"""

from collections.abc import Mapping

from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.handlers import CheckpointSaver, ValidationHandler


class ValidationAtIntervalAndEnd(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that also runs the validator after the trainer's last epoch.

    Why it exists: ``ValidationHandler`` fires on ``EPOCH_COMPLETED(every=interval)`` only, so a run
    shorter than ``interval`` (``--epochs 1``, a MONAI Label fine-tune of a few epochs) never validates,
    the best-metric ``CheckpointSaver`` never writes ``model.pt``, and the epochs after the last multiple
    of ``interval`` are never considered. The last epoch is ``engine.state.max_epochs``, which is what
    MONAI Label overrides (``train#trainer#max_epochs``); a run stopped early by ``terminate()`` keeps
    the interval schedule only.
    """

    def __init__(self, interval: int, validator: Evaluator | None = None, exec_at_start: bool = False) -> None:
        super().__init__(interval=interval, validator=validator, epoch_level=True, exec_at_start=exec_at_start)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
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
