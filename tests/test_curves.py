"""A run shows a validation curve by default: `trainer.eval_every` follows `trainer.steps`."""

import pytest
from mlflow import MlflowClient

from conftest import TINY_TRAINING, compose_config
from tfsweep.training import train

BASE = ["paths.output_dir=/tmp/out"]


@pytest.mark.parametrize("steps", [250, 300, 999, 1500, 5000, 20000])
def test_every_run_of_250_steps_or_more_is_evaluated_at_least_5_times(steps):
    trainer = compose_config(BASE + [f"trainer.steps={steps}"]).trainer
    assert steps // trainer.eval_every >= 5


def test_the_fast_preset_of_the_readmes_first_command_draws_5_validation_points_too():
    trainer = compose_config(BASE + ["experiment=fast"]).trainer
    assert trainer.steps // trainer.eval_every >= 5


def test_the_tutorial_run_keeps_its_2000_step_evaluations():
    assert compose_config(BASE).trainer.eval_every == 2000
    assert compose_config(BASE + ["trainer.steps=100000"]).trainer.eval_every == 2000


def test_an_explicit_eval_every_wins():
    assert compose_config(BASE + ["trainer.steps=300", "trainer.eval_every=100"]).trainer.eval_every == 100


def test_a_300_step_run_records_a_validation_curve_of_at_least_5_points(synthetic_data, tmp_path):
    # The trainer's own intervals (eval_every, checkpoint_every) come from the yaml, as on the command line.
    tiny = {k: v for k, v in TINY_TRAINING.items() if k not in ("trainer.eval_every", "trainer.checkpoint_every")}
    overrides = {**synthetic_data, **tiny, "trainer.steps": "300", "trainer.log_every": "50",
                 "paths.output_dir": str(tmp_path / "run"), "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                 "tracking.log_model": "false", "tracking.log_checkpoints": "false"}
    cfg = compose_config([f"{k}={v}" for k, v in overrides.items()])
    train(cfg)
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    steps = [point.step for point in client.get_metric_history(run.info.run_id, "val/accuracy")]
    assert len(steps) >= 5 and steps[-1] == 300, steps
