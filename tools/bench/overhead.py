"""Where a sweep trial's wall time goes outside its training steps.

The trials are real ones, run by `run_sweep`: nothing in the trainer, tracking or sweep code knows it is
measured. While `measure_trials()` is active, the calls that make up each phase are wrapped from outside
with `unittest.mock.patch.object`, and every Trainer gets a TrainingTimer for its training steps. Each
second is counted once, under the outermost timed call (MLflow calls made inside a checkpoint upload
count as upload time), and only on the thread that runs the trial.

Two phases are not calls of their own and are estimated from the timings: tracing and compiling is the
first training chunk's time beyond the trial's steady time per step, plus the first evaluation's time
beyond a steady evaluation; the rest is what no phase accounts for (config composition, data loading,
Optuna's reports and attributes inside the trial, Python).
"""

from __future__ import annotations

import functools
import inspect
import statistics
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from unittest.mock import patch

from tfsweep.hooks import TrainingTimer

PHASES = {  # JSON key: how the table names it
    "trace_and_compile": "trace and compile",
    "model_build": "model build",
    "mlflow": "MLflow run creation, params and tags",  # and every other MlflowClient call of the trial
    "evaluations": "evaluations",
    "checkpoint_saves": "checkpoint saves",
    "checkpoint_uploads": "checkpoint uploads",
    "clear_keras": "clearing Keras",
    "between_trials": "between trials",  # the sweep's loop from one trial's `tell` to taking the next
    "rest": "the rest",
}


class ChunkTimer(TrainingTimer):
    """A TrainingTimer that also keeps each log interval's steps and training seconds.

    The first interval holds the tracing of the training step; comparing it with the others measures it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.intervals: list[tuple[int, float]] = []  # (steps, training seconds) per log interval
        self._last_step = 0

    def begin(self, trainer):
        super().begin(trainer)
        self._last_step = trainer.start_step

    def after_log(self, trainer, step, logs):
        before = self.training_seconds
        super().after_log(trainer, step, logs)
        self.intervals.append((step - self._last_step, self.training_seconds - before))
        self._last_step = step


@dataclass
class TrialRecord:
    """What one trial spent where: the durations of each phase's calls, and its trainers' timers."""

    study: str
    number: int
    wall_seconds: float = 0.0  # from taking the trial to the return of `study.tell()`
    between_seconds: float = 0.0  # from the previous trial's `tell` in the same study to taking this one
    calls: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    timers: list[ChunkTimer] = field(default_factory=list)


class PhaseClock:
    """Collects a TrialRecord per trial from the wrapped calls."""

    def __init__(self) -> None:
        self.trials: list[TrialRecord] = []
        self.current: TrialRecord | None = None
        self._started = 0.0
        self._last_told: tuple[str, float] | None = None  # (study name, when its last trial was told)
        self._busy = False
        self._thread = threading.get_ident()

    def trial_asked(self, study_name: str, number: int, asked_at: float) -> None:
        self.current, self._started = TrialRecord(study_name, number), asked_at
        if self._last_told is not None and self._last_told[0] == study_name:
            self.current.between_seconds = asked_at - self._last_told[1]

    def trial_told(self, study_name: str) -> None:
        if self.current is None:
            return
        now = time.perf_counter()
        self.current.wall_seconds = now - self._started
        self.trials.append(self.current)
        self.current, self._last_told = None, (study_name, now)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        record = self.current
        if record is None or self._busy or threading.get_ident() != self._thread:
            yield  # outside a trial, nested in a timed call, or another thread (MLflow's async logging)
            return
        self._busy, start = True, time.perf_counter()
        try:
            yield
        finally:
            record.calls[name].append(time.perf_counter() - start)
            self._busy = False

    def timed(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return timed_call


@contextmanager
def measure_trials() -> Iterator[PhaseClock]:
    """Within this block, every Optuna trial of this process is recorded in the returned clock's `trials`.

    A trial runs from the sweep taking it from the study's queue (`study.next_trial`) to `study.tell()`.
    """
    import keras
    import optuna
    import tensorflow as tf
    from mlflow import MlflowClient
    from mlflow.utils.async_logging.run_operations import RunOperations

    from tfsweep import logged_model
    from tfsweep import study as studies
    from tfsweep.trainer import Trainer

    clock = PhaseClock()
    uploads = [(MlflowClient, "log_artifacts"), (MlflowClient, "log_artifact"), (logged_model, "log_model")]
    mlflow_calls = [(MlflowClient, name) for name, value in vars(MlflowClient).items()
                    if inspect.isfunction(value) and (name == "__init__" or not name.startswith("_"))
                    and (MlflowClient, name) not in uploads]
    timed = [*((owner, name, "checkpoint_uploads") for owner, name in uploads),
             *((owner, name, "mlflow") for owner, name in mlflow_calls),
             (RunOperations, "wait", "mlflow"),  # the metrics MLflow still sends when a run ends
             (tf.train.CheckpointManager, "save", "checkpoint_saves"),
             (Trainer, "evaluate", "evaluations"),
             (keras.backend, "clear_session", "clear_keras")]
    build, next_trial, tell = Trainer.__init__, studies.next_trial, optuna.study.Study.tell

    def timed_init(trainer, *args, **kwargs):
        with clock.phase("model_build"):
            build(trainer, *args, **kwargs)
        if clock.current is not None:
            timer = ChunkTimer()
            trainer.hooks.append(timer)
            clock.current.timers.append(timer)

    def timed_next_trial(study, *args, **kwargs):
        asked_at = time.perf_counter()
        trial = next_trial(study, *args, **kwargs)
        if trial is not None:
            clock.trial_asked(study.study_name, trial.number, asked_at)
        return trial

    def timed_tell(study, *args, **kwargs):
        try:
            return tell(study, *args, **kwargs)
        finally:
            clock.trial_told(study.study_name)

    with ExitStack() as stack:
        for owner, name, phase in timed:
            stack.enter_context(patch.object(owner, name, clock.timed(phase, getattr(owner, name))))
        for owner, name, wrapper, original in ((Trainer, "__init__", timed_init, build),
                                               (studies, "next_trial", timed_next_trial, next_trial),
                                               (optuna.study.Study, "tell", timed_tell, tell)):
            stack.enter_context(patch.object(owner, name, functools.wraps(original)(wrapper)))
        yield clock


def first_chunk_excess(intervals: list[tuple[int, float]]) -> float:
    """Seconds the first log interval took beyond the steady time per step of the others (0 without others)."""
    if len(intervals) < 2:
        return 0.0
    (first_steps, first_seconds), rest = intervals[0], intervals[1:]
    per_step = sum(seconds for _, seconds in rest) / sum(steps for steps, _ in rest)
    return max(0.0, first_seconds - first_steps * per_step)


def breakdown(trials: list[TrialRecord]) -> dict[str, Any]:
    """Per-trial and mean seconds of each phase; the phases, training steps and rest add up to the wall time.

    A steady evaluation is the median of every evaluation but each trial's first, pooled over trials:
    the validation split and its batch size are the same in every trial.
    """
    later_evaluations = [s for t in trials for s in t.calls["evaluations"][1:]]
    steady_evaluation = statistics.median(later_evaluations) if later_evaluations else None
    rows = []
    for t in trials:
        evaluations = t.calls["evaluations"]
        eval_trace = 0.0
        if evaluations and steady_evaluation is not None:
            eval_trace = max(0.0, evaluations[0] - steady_evaluation)
        train_trace = sum(first_chunk_excess(timer.intervals) for timer in t.timers)
        training = sum(timer.training_seconds for timer in t.timers) - train_trace
        wall = t.wall_seconds + t.between_seconds
        phases = {"trace_and_compile": train_trace + eval_trace,
                  "model_build": sum(t.calls["model_build"]),
                  "mlflow": sum(t.calls["mlflow"]),
                  "evaluations": sum(evaluations) - eval_trace,
                  "checkpoint_saves": sum(t.calls["checkpoint_saves"]),
                  "checkpoint_uploads": sum(t.calls["checkpoint_uploads"]),
                  "clear_keras": sum(t.calls["clear_keras"]),
                  "between_trials": t.between_seconds}
        phases["rest"] = wall - training - sum(phases.values())
        rows.append({"study": t.study, "number": t.number, "wall_seconds": wall, "training_seconds": training,
                     "outside_seconds": wall - training, "phases_seconds": phases,
                     "calls": {name: len(durations) for name, durations in t.calls.items()}})
    mean = lambda values: statistics.fmean(values) if values else None
    return {
        "trials_measured": len(rows),
        "mean_trial_seconds": mean([r["wall_seconds"] for r in rows]),
        "mean_training_seconds": mean([r["training_seconds"] for r in rows]),
        "mean_outside_seconds": mean([r["outside_seconds"] for r in rows]),
        "phases_seconds": {name: mean([r["phases_seconds"][name] for r in rows]) for name in PHASES},
        "steady_evaluation_seconds": steady_evaluation,
        "per_trial": rows,
    }
