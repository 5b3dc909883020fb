"""Slow: the real MNIST files, fetched and verified as a user's first run would, then a short training."""

import pytest

from conftest import compose_config
from tfsweep.data import load_splits
from tfsweep.training import train

pytestmark = pytest.mark.slow


def test_real_mnist_splits_are_the_tutorials():
    splits = load_splits(compose_config(["paths.output_dir=."]).data)
    assert len(splits.train_images) == 55_000 and len(splits.validation_images) == 5_000
    assert len(splits.test_images) == 10_000
    assert splits.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST labels


def test_a_few_hundred_steps_on_real_mnist_beat_chance_by_far(tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", "optimizer=adam", "trainer.steps=300",
                          "trainer.eval_every=300", "trainer.progress_bar=false",
                          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.log_model=false",
                          "tracking.log_checkpoints=false"])
    metrics = train(cfg)
    assert metrics["test/accuracy"] > 0.9, metrics
