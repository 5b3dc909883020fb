"""The runs the benchmark times: our trainer through `train(cfg)`, a bare Keras `fit` of the same network,
and a training run whose test accuracy is checked against its wall time."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
from omegaconf import DictConfig

from tfsweep.config import compose_config
from tfsweep.hooks import Hook, TrainingTimer

FAST_PRESET = "fast"  # conf/experiment/fast.yaml: the recommended fast configuration
FAST_TARGET, TUTORIAL_TARGET = 0.990, 0.973  # test accuracy each configuration is timed to

Curve = list[tuple[float, int, float]]  # (training seconds, global step, test accuracy)


class Workspace:
    """Fresh output folders (a reused model_dir would resume) and one MLflow store for the benchmark."""

    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def config(self, *overrides: str) -> DictConfig:
        """The real training config, as `src/train.py <overrides>` composes it, in a new run folder."""
        self.count += 1
        return compose_config("train", [f"tracking.uri={self.tracking_uri}", "tracking.experiment_name=bench",
                                        "trainer.progress_bar=false", *overrides,
                                        f"paths.output_dir={self.root / f'run-{self.count:03d}'}"])


def trainer_run(cfg: DictConfig) -> dict[str, float]:
    """Our trainer through `train(cfg)`: steps/sec in the loop, the wall seconds of the whole call, and the
    CPU seconds of the MLflow metric batches of the steps steps/sec is timed over (0 without tracking)."""
    from tfsweep.training import train

    timer = TrainingTimer()
    start = time.perf_counter()
    with metric_batches() as batches:
        metrics = train(cfg, hooks=[timer])
    first_step, last_step = timer.marks[0][0], timer.marks[-1][0]
    # The points of a log step are sent while the steps after it train: those of the first log point to
    # the one before the last fall in the timed window.
    in_loop = [cpu for steps, cpu in batches if steps and first_step <= min(steps) < last_step]
    return {"steps_per_sec": timer.steps_per_sec, "wall_seconds": time.perf_counter() - start,
            "timed_seconds": timer.marks[-1][1] - timer.marks[0][1],
            "metric_batches_in_loop": len(in_loop), "metric_batch_cpu_seconds": sum(in_loop), **metrics}


@contextmanager
def metric_batches() -> Iterator[list[tuple[set[int], float]]]:
    """Every `MlflowClient.log_batch` call in the block, on any thread, as (its metrics' steps, the CPU
    seconds its thread spent in it). The CPU time is what tracking takes from the training loop, which a
    steps/s ratio of tracked and untracked runs shows only above this machine's round-to-round spread."""
    from mlflow import MlflowClient

    calls: list[tuple[set[int], float]] = []
    log_batch = MlflowClient.log_batch

    @functools.wraps(log_batch)
    def timed(client, run_id, metrics=(), *args, **kwargs):
        cpu = time.thread_time()
        try:
            return log_batch(client, run_id, metrics, *args, **kwargs)
        finally:
            calls.append(({metric.step for metric in metrics or ()}, time.thread_time() - cpu))

    with patch.object(MlflowClient, "log_batch", timed):
        yield calls


def keras_fit_run(cfg: DictConfig, splits) -> dict[str, float]:
    """The baseline: a bare Keras `model.fit` of the same network, batch, precision and input pipeline."""
    import keras
    from hydra.utils import instantiate

    from tfsweep.inputs import train_input_fn
    from tfsweep.model import build_network

    keras.utils.set_random_seed(cfg.trainer.seed)
    network = build_network(cfg.model, cfg.trainer.precision)
    network.compile(optimizer=instantiate(cfg.optimizer, _partial_=True)(learning_rate=instantiate(cfg.schedule)),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    dataset = train_input_fn(splits.train_images, splits.train_labels, cfg.data.batch_size, cfg.trainer.seed,
                             cfg.data.shuffle_buffer)
    first_timed = cfg.trainer.log_every  # TrainingTimer's window: from the first log point on
    marks: dict[int, float] = {}
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: marks.__setitem__(batch + 1, time.perf_counter()))
    network.fit(dataset, epochs=1, steps_per_epoch=cfg.trainer.steps, verbose=0, shuffle=False, callbacks=[timer])
    return {"steps_per_sec": (cfg.trainer.steps - first_timed) / (marks[cfg.trainer.steps] - marks[first_timed])}


class AccuracyCurve(Hook):
    """Test accuracy against training wall time, checked every `every` steps; the checks' own time is
    taken off the clock. Stops the run once `budget_s` seconds of training have passed.

    Not a TrainingTimer on purpose: its clock keeps running through the run's own validation passes and
    checkpoints, since time to quality is what a user's run takes; only the benchmark's checks are not.
    """

    def __init__(self, every: int, budget_s: float | None = None) -> None:
        self.every, self.budget_s = every, budget_s
        self.points: Curve = []
        self._start = self._excluded = 0.0

    def begin(self, trainer):
        self._start, self._excluded = time.perf_counter(), 0.0

    def after_log(self, trainer, step, logs):
        if step % self.every and step != trainer.steps:
            return
        now = time.perf_counter()
        seconds = now - self._start - self._excluded
        classes = trainer.predict(trainer.splits.test_images)["classes"]
        self.points.append((seconds, step, float(np.mean(classes == trainer.splits.test_labels))))
        self._excluded += time.perf_counter() - now
        if self.budget_s is not None and seconds >= self.budget_s:
            trainer.request_stop(f"the benchmark's time budget of {self.budget_s:.0f} s is spent")


def curve_run(cfg: DictConfig, every: int, budget_s: float | None = None) -> dict[str, Any]:
    """Train with an AccuracyCurve; return its points with the run's final metrics."""
    from tfsweep.training import train

    curve = AccuracyCurve(every, budget_s)
    metrics = train(cfg, hooks=[curve])
    return {"points": curve.points, **metrics}


def time_to(points: Curve, target: float) -> float | None:
    """Seconds at the first checked point whose test accuracy reaches `target`, or None."""
    return next((seconds for seconds, _, accuracy in points if accuracy >= target), None)


def accuracy_at(points: Curve, seconds: float) -> float | None:
    """Test accuracy at the last checked point no later than `seconds`."""
    reached = [accuracy for at, _, accuracy in points if at <= seconds]
    return reached[-1] if reached else None
