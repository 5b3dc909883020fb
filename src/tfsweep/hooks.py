"""Hooks: what runs around the training loop, as with the Estimator's SessionRunHooks."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What a hook may use of the trainer (`tfsweep.trainer.Trainer`, which imports this module)."""

    cfg: DictConfig
    steps: int
    start_step: int
    model_dir: Path
    splits: Any
    network: Any  # keras.Model
    manager: Any  # tf.train.CheckpointManager of model_dir
    hooks: list[Hook]
    stop_reason: str | None

    def request_stop(self, reason: str) -> None: ...

    def last_probabilities(self) -> np.ndarray: ...

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]: ...


class Hook:
    """Override what you need. `trainer.request_stop(reason)` ends training after the current chunk."""

    def begin(self, trainer: Trainer) -> None: ...

    def after_log(self, trainer: Trainer, step: int, logs: dict[str, float]) -> None: ...

    def before_eval(self, trainer: Trainer, step: int, split: str) -> None: ...

    def after_eval(self, trainer: Trainer, step: int, split: str, metrics: dict[str, float]) -> None: ...

    def before_checkpoint(self, trainer: Trainer, step: int) -> None: ...

    def after_checkpoint(self, trainer: Trainer, step: int, path: str) -> None: ...

    def end(self, trainer: Trainer, error: BaseException | None) -> None:
        """Always called; `error` is the exception that ended training, or None."""


@contextmanager
def running(trainer: Trainer) -> Iterator[None]:
    """Around a training loop: every hook's `begin`, then, however the loop ends, every hook's `end`.
    Here, not in `tfsweep.trainer` (which imports TensorFlow), so the load test's stand-in shares it."""
    error: BaseException | None = None
    for hook in trainer.hooks:
        hook.begin(trainer)
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        for hook in trainer.hooks:
            hook.end(trainer, error)


def chunk_ends(start_step: int, trainer_cfg: DictConfig) -> list[int]:
    """The global steps after `start_step` where a training chunk ends: each log, evaluation and checkpoint
    point, and the last; here, so that the load test's stand-in (without TensorFlow) stops at the same steps."""
    t = trainer_cfg
    ends = {s for every in (t.log_every, t.eval_every, t.checkpoint_every) for s in range(every, t.steps, every)}
    return sorted(s for s in ends | {t.steps} if s > start_step)


class LoggingHook(Hook):
    """The tutorial's `loss = ..., step = ...` and `global_step/sec` lines."""

    def after_log(self, trainer, step, logs):
        log.info("loss = %.6f, step = %d", logs["train/loss"], step)
        log.info("global_step/sec: %.4g", logs["global_step_per_sec"])

    def after_eval(self, trainer, step, split, metrics):
        log.info("%s at step %d: %s", split, step,
                 ", ".join(f"{k.split('/', 1)[1]} = {v:.4f}" for k, v in metrics.items()))


class ProbabilitiesHook(Hook):
    """The tutorial's LoggingTensorHook on `softmax_tensor`: the last batch's probabilities."""

    def after_log(self, trainer, step, logs):
        with np.printoptions(precision=3, suppress=True):
            log.info("probabilities (step %d) = %s", step, trainer.last_probabilities())


class ProgressBarHook(Hook):
    """A progress bar over global steps, on a terminal only (logs stay clean in files and CI)."""

    def begin(self, trainer):
        self.bar = tqdm(total=trainer.steps, initial=trainer.start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), leave=False)

    def after_log(self, trainer, step, logs):
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{logs['train/loss']:.4f}")

    def end(self, trainer, error):
        self.bar.close()


class TrainingTimer(Hook):
    """Seconds spent in training steps, and steps/sec over them between the first and the last log point.

    The clock stops for every evaluation and checkpoint (from `before_*` to `after_*`), wherever they fall
    between log points: a steps/sec that counted them would charge the trainer for its validation passes,
    which a bare `model.fit` does not make. The first chunk includes tracing, which `steps_per_sec` leaves out.
    """

    def __init__(self) -> None:
        self.training_seconds = 0.0
        self.marks: list[tuple[int, float]] = []  # (global step, training_seconds) at each log point
        self._mark = 0.0

    def begin(self, trainer):
        self._mark = time.perf_counter()

    def _stop_clock(self, *args) -> None:
        self.training_seconds += time.perf_counter() - self._mark

    def _start_clock(self, *args) -> None:
        self._mark = time.perf_counter()

    def after_log(self, trainer, step, logs):
        now = time.perf_counter()
        self.training_seconds += now - self._mark
        self.marks.append((step, self.training_seconds))
        self._mark = now

    before_eval = before_checkpoint = _stop_clock
    after_eval = after_checkpoint = _start_clock

    @property
    def steps_per_sec(self) -> float:
        (first_step, first), (last_step, last) = self.marks[0], self.marks[-1]
        return (last_step - first_step) / (last - first)
