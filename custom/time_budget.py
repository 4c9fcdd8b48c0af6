"""A wall-clock training budget for MONAI workflows, with Ignite's own ``TimeLimit`` doing the stopping.

Why it exists: a user with a fixed slot (a 2-hour GPU job, a 12-minute CPU demo) wants to say "train for
this long". ``ignite.handlers.TimeLimit`` terminates an engine once a limit has passed, but MONAI workflows
only take handlers with an ``attach`` method, and ``TimeLimit`` starts its clock when it is constructed,
which in a bundle is while the config is parsed (before the datasets are cached). This wrapper starts the
clock when the run starts and checks it after every iteration.
"""

from ignite.engine import Engine, Events
from ignite.handlers import TimeLimit


class TrainingTimeLimit:
    """Terminate a training engine once ``limit_sec`` seconds have passed since its run started.

    Used by train.json as ``time_budget_s``: the run stops after the iteration that crosses the limit,
    Ignite then fires ``COMPLETED``, so every end-of-run handler still runs. The learning-rate schedule
    still follows ``epochs``; choose ``epochs`` so that they roughly fit the budget (``python -m custom
    accuracy-bench`` measures an epoch first and does so).
    """

    def __init__(self, limit_sec: int) -> None:
        if isinstance(limit_sec, bool) or not isinstance(limit_sec, int) or limit_sec <= 0:
            raise ValueError(f"time_budget_s must be a positive whole number of seconds or null, got {limit_sec!r}")
        self.limit_sec = limit_sec
        self.time_limit: TimeLimit | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start_clock)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _start_clock(self, engine: Engine) -> None:
        self.time_limit = TimeLimit(self.limit_sec)

    def _check(self, engine: Engine) -> None:
        self.time_limit(engine)
