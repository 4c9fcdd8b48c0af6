"""A wall-clock training budget for MONAI workflows that fits the run and its learning-rate schedule to it.

Why it exists: a user with a fixed slot (a 2-hour GPU job, a 12-minute CPU demo) wants to say "train for
this long" and get a finished run, not one cut off with the learning rate still high. Ignite's ``TimeLimit``
only terminates, starts its clock when it is constructed (in a bundle: while the config is parsed, before the
datasets are cached), is not a MONAI handler (no ``attach``) and lets the processes of a distributed run stop
after different iterations, which hangs the one still waiting for its gradients' all-reduce. MONAI has
nothing that sizes a run by time.
"""

import statistics
import time

import ignite.distributed as idist
from ignite.engine import Engine, Events

RECENT_EPOCHS = 10  # an epoch's time is the median of the last ones, so a machine that slows down is followed


class TrainingTimeLimit:
    """Fit a training run to ``limit_sec`` seconds of wall clock, counted from the start of the run.

    Used by train.json as ``time_budget_s``. Before every epoch from the second on, it measures the epochs
    and validations so far (an epoch's time, with its checkpointing and logging, is the median of the last
    ten; the first epoch, which starts the data loading, counts only until others are measured) and projects
    how many epochs fit in the time left, with a validation every ``val_interval`` epochs and after the last
    one (until the first has run, a validation is counted as long as an epoch; ``validator`` None: the run has
    none). It sets ``engine.state.max_epochs`` to that number, never above the configured ``epochs``, so the
    run ends on a validated epoch (``custom.lifecycle.ValidationAtIntervalAndEnd``), and scales
    ``lr_scheduler``'s ``t_total`` to the new length and its ``warmup_steps`` by the same factor, so the
    warm-up/cosine schedule (``monai.optimizers.WarmupCosineSchedule``) ends with the budget. When the projection
    was optimistic, the run is terminated after the iteration that crosses the limit; Ignite then fires
    ``COMPLETED``, so every end-of-run handler runs. In a distributed run every process follows process 0's
    fit and stops after the same iteration. A resumed run (``resume_ckpt``) gets the whole budget again and
    is fitted from its own epochs.
    """

    def __init__(
        self, limit_sec: int, lr_scheduler=None, validator: Engine | None = None, val_interval: int = 1
    ) -> None:
        if isinstance(limit_sec, bool) or not isinstance(limit_sec, int) or limit_sec <= 0:
            raise ValueError(f"time_budget_s must be a positive whole number of seconds or null, got {limit_sec!r}")
        if lr_scheduler is not None and not all(hasattr(lr_scheduler, a) for a in ("t_total", "warmup_steps")):
            raise ValueError(
                f"time_budget_s fits a schedule with 't_total' and 'warmup_steps' (monai.optimizers."
                f"WarmupCosineSchedule); lr_scheduler is a {type(lr_scheduler).__name__}"
            )
        self.limit_sec = limit_sec
        self.lr_scheduler = lr_scheduler
        self.validator = validator
        self.val_interval = val_interval

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)
        engine.add_event_handler(Events.EPOCH_STARTED, self._fit)
        if self.validator is not None:
            self.validator.add_event_handler(Events.STARTED, self._validation_started)
            self.validator.add_event_handler(Events.COMPLETED, self._validation_completed)

    def _start(self, engine: Engine) -> None:
        self.started_at = time.time()
        self.distributed = idist.get_world_size() > 1
        self.configured_epochs = engine.state.max_epochs
        self.epoch_seconds: list[float] = []
        self.validation_seconds: list[float] = []
        self.validating_in_epoch = 0.0
        self.epoch_started_at: float | None = None
        self.announced = False
        if self.lr_scheduler is not None:
            self.schedule_steps = self.lr_scheduler.t_total
            self.warmup_steps = self.lr_scheduler.warmup_steps

    def _check(self, engine: Engine) -> None:
        over = time.time() - self.started_at > self.limit_sec
        if self.distributed:
            over = bool(idist.all_reduce(int(over), op="MAX"))
        if over:
            engine.logger.info(f"time budget: {self.limit_sec} s reached after iteration {engine.state.iteration}")
            engine.terminate()

    def _validation_started(self, validator: Engine) -> None:
        self.validation_started_at = time.time()

    def _validation_completed(self, validator: Engine) -> None:
        seconds = time.time() - self.validation_started_at
        self.validation_seconds.append(seconds)
        self.validating_in_epoch += seconds

    def _fit(self, engine: Engine) -> None:
        now = time.time()
        if self.epoch_started_at is not None:
            self.epoch_seconds.append(now - self.epoch_started_at - self.validating_in_epoch)
        self.epoch_started_at, self.validating_in_epoch = now, 0.0
        if not self.epoch_seconds:
            return
        seconds_left = self.limit_sec - (now - self.started_at)
        epoch_s = statistics.median(self.epoch_seconds[1:][-RECENT_EPOCHS:] or self.epoch_seconds)
        if self.validation_seconds:
            validation_s = statistics.mean(self.validation_seconds)
        elif self.validator is not None:
            validation_s = epoch_s  # none run yet; measured: 0.5 to 1.4 epochs (docs/results.md)
        else:
            validation_s = 0.0
        epochs = epochs_that_fit(
            first=engine.state.epoch,
            configured=self.configured_epochs,
            seconds_left=seconds_left,
            epoch_s=epoch_s,
            validation_s=validation_s,
            val_interval=self.val_interval,
        )
        if self.distributed:
            epochs = int(idist.broadcast(epochs, src=0))
        if epochs == engine.state.max_epochs:
            return
        if not self.announced and idist.get_rank() == 0:
            self.announced = True
            engine.logger.info(
                f"time budget: {seconds_left:.0f} s left fit epochs {engine.state.epoch} "
                f"to {epochs} of {engine.state.max_epochs}; refitted before every epoch, the learning-rate schedule "
                f"ends with the last one"
            )
        engine.state.max_epochs = epochs
        if self.lr_scheduler is not None:
            total = epochs * engine.state.epoch_length
            self.lr_scheduler.t_total = total
            self.lr_scheduler.warmup_steps = round(self.warmup_steps * total / self.schedule_steps)


def epochs_that_fit(
    first: int, configured: int, seconds_left: float, epoch_s: float, validation_s: float, val_interval: int
) -> int:
    """The last epoch E (``first`` <= E <= ``configured``) such that epochs ``first``..E and their validations
    (every ``val_interval`` epochs and after E) fit in ``seconds_left``; ``first`` when not even that epoch
    fits, for the time limit to cut."""

    def seconds(last: int) -> float:
        validations = last // val_interval - (first - 1) // val_interval + (1 if last % val_interval else 0)
        return (last - first + 1) * epoch_s + validations * validation_s

    last = min(configured, first - 1 + int(seconds_left // epoch_s))
    while last > first and seconds(last) > seconds_left:
        last -= 1
    return max(first, last)
