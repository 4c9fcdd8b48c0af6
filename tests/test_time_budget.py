"""The wall-clock training budget (``time_budget_s``): it ends the run, and fits the epochs and the schedule to it."""

import datetime
import json
import time

import pytest
import torch
import torch.distributed as dist
from conftest import CONFIGS, TINY_TRAINING
from ignite.engine import Engine, Events
from monai.bundle import ConfigWorkflow

from custom.time_budget import TrainingTimeLimit, epochs_that_fit


@pytest.mark.parametrize("limit", [0, -3, 1.5, True, "60"])
def test_time_budget_must_be_whole_positive_seconds(limit):
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainingTimeLimit(limit)


def test_a_schedule_without_a_total_length_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="StepLR"):
        TrainingTimeLimit(60, lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1))


def test_the_epochs_that_fit_count_their_validations():
    # from epoch 2, 100 s left, 1 s per epoch, 5 s per validation every 10 epochs and after the last:
    # up to epoch 66 that is 65 epochs + 7 validations (10, 20, ..., 60 and 66) = 100 s; epoch 67 needs 101 s
    assert epochs_that_fit(first=2, configured=300, seconds_left=100, epoch_s=1.0, validation_s=5.0,
                           val_interval=10) == 66
    # ending on a multiple of the interval needs no extra validation: 70 epochs + 7 validations = 105 s
    assert epochs_that_fit(first=1, configured=300, seconds_left=105, epoch_s=1.0, validation_s=5.0,
                           val_interval=10) == 70
    assert epochs_that_fit(first=2, configured=40, seconds_left=1000, epoch_s=1.0, validation_s=5.0,
                           val_interval=10) == 40  # never more than configured
    assert epochs_that_fit(first=5, configured=300, seconds_left=3, epoch_s=4.0, validation_s=5.0,
                           val_interval=10) == 5  # not even this epoch fits: it runs, and the time limit cuts it


class _Clock:
    """Stands in for the ``time`` module of custom.time_budget: each training iteration takes one second."""

    now = 0.0

    def time(self):
        return self.now


@pytest.mark.parametrize("validated, expected", [(True, 90), (False, 100)])
def test_before_the_first_validation_one_is_counted_as_long_as_an_epoch(monkeypatch, validated, expected):
    # 1 s epochs, 100 s budget, validation every 10 epochs: fitted before epoch 2 with 99 s left, epochs 2..90
    # and their 9 validations counted at 1 s each take 98 s (epoch 91 would need 100 s); without a validator
    # epochs 2..100 fit
    clock = _Clock()
    monkeypatch.setattr("custom.time_budget.time", clock)

    def step(engine, batch):
        clock.now += 1.0

    trainer = Engine(step)
    TrainingTimeLimit(100, validator=Engine(lambda engine, batch: None) if validated else None,
                      val_interval=10).attach(trainer)  # fmt: skip
    fitted = {}

    @trainer.on(Events.EPOCH_STARTED(once=2))
    def record_the_fit(engine):
        fitted["max_epochs"] = engine.state.max_epochs
        engine.terminate()

    trainer.run([0], max_epochs=300)
    assert fitted["max_epochs"] == expected


def _budget_run(tiny_phantom_dataset, tmp_path, **overrides):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(CONFIGS.parent),
        **{**TINY_TRAINING, **overrides},
        dataset_dir=str(tiny_phantom_dataset),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "logs"),
    )
    workflow.initialize()
    workflow.run()
    return workflow.parser


@pytest.mark.parametrize("validation_cases", [[], None])
def test_the_budget_counts_validations_only_when_the_run_has_some(tiny_phantom_dataset, tmp_path, validation_cases):
    # MONAI Label's val_split can leave no validation case; then no validation time may be counted
    overrides = {} if validation_cases is None else {"validate#dataset#data": validation_cases}
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type="train", bundle_root=str(CONFIGS.parent), dataset_dir=str(tiny_phantom_dataset),
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "logs"), time_budget_s=60,
        **{**TINY_TRAINING, **overrides},
    )  # fmt: skip
    workflow.initialize()
    handlers = workflow.parser.get_parsed_content("train#handlers")
    (budget,) = [h for h in handlers if isinstance(h, TrainingTimeLimit)]
    if validation_cases is None:
        assert budget.validator is workflow.parser.get_parsed_content("validate#evaluator")
    else:
        assert budget.validator is None


def test_a_budget_ends_the_run_on_a_validated_epoch_with_the_schedule_finished(tiny_phantom_dataset, tmp_path):
    epochs = 300  # minutes of training at this size; the budget must end it after seconds
    parser = _budget_run(tiny_phantom_dataset, tmp_path, epochs=epochs, val_interval=4, warmup_epochs=30,
                         learning_rate=0.001, time_budget_s=12)  # several epochs, also on a loaded machine
    trainer = parser.get_parsed_content("train#trainer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert 1 < trainer.state.epoch <= trainer.state.max_epochs < epochs
    # the warm-up/cosine schedule was fitted to the epochs that fit: same warm-up fraction (30 of 300 epochs)
    assert scheduler.t_total == trainer.state.max_epochs * trainer.state.epoch_length
    assert scheduler.warmup_steps == round(scheduler.t_total / 10)
    # so the run ends with the learning rate near the end of its cosine, not at the top of a 300-epoch schedule
    final_lr = parser.get_parsed_content("optimizer").param_groups[0]["lr"]
    assert final_lr < 0.2 * 0.001
    # the last epoch was validated, so model.pt is chosen from the whole run
    assert parser.get_parsed_content("validate#evaluator").state.epoch == trainer.state.epoch
    assert (tmp_path / "models" / "model.pt").is_file()


def test_a_budget_shorter_than_an_epoch_still_ends_with_a_validated_model(tiny_phantom_dataset, tmp_path):
    parser = _budget_run(tiny_phantom_dataset, tmp_path, epochs=300, val_interval=1000, time_budget_s=1)
    trainer = parser.get_parsed_content("train#trainer")
    assert 0 < trainer.state.epoch < 300
    # stopped by the budget before any interval validation, the run was still validated and left a model
    assert parser.get_parsed_content("validate#evaluator").state.best_metric_epoch == trainer.state.epoch
    assert (tmp_path / "models" / "model.pt").is_file()


def _distributed_budget_run(rank: int, limits: list[int], folder: str) -> None:
    """One process of a two-process gloo run whose every iteration all-reduces, as DDP does with the gradients."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))

    def step(engine, batch):
        dist.all_reduce(torch.ones(1))
        time.sleep(0.01)

    engine = Engine(step)
    TrainingTimeLimit(limits[rank]).attach(engine)
    engine.run(range(5), max_epochs=10_000)
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump([engine.state.epoch, engine.state.iteration, engine.state.max_epochs], f)
    dist.destroy_process_group()


def test_distributed_processes_stop_together_on_process_0s_fit(tmp_path):
    # process 1's budget ends long before process 0's: alone it would stop and leave process 0 waiting in its
    # all-reduce (an error after gloo's 30 s timeout); together they stop after the same iteration
    torch.multiprocessing.spawn(_distributed_budget_run, args=([1000, 2], str(tmp_path)), nprocs=2)
    ends = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ends[0] == ends[1]
    epoch, iteration, max_epochs = ends[0]
    assert 1 < epoch < max_epochs  # process 0's fit (1000 s) kept the epochs; process 1's budget stopped the run
