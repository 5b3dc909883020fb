"""Timing a worker's coordination calls from outside, with `unittest.mock.patch.object`.

As the benchmark's sweep-overhead row (`bench.overhead`) times real trials, but that one counts
the trial's own thread only, so that its phases add up to the trial's wall time. This clock counts every
thread (MLflow sends metric batches from its own), gives the seconds between two trials to the next one
(the study lock's recovery runs before the trial it hands out exists) and also times parts of `ask`
inside it. Otherwise each second counts once, under the outermost timed call of its thread.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator
from unittest.mock import patch

log = logging.getLogger(__name__)

# The coordination calls of one trial, as the table names them. Per trial, a group's seconds are the sum
# of its calls in that trial (a trial reports and sends metric batches several times).
GROUPS = {
    "ask": "ask",  # the study lock held shared (waiting included), taking the next queued trial, claiming it
    "suggest": "suggest",
    "report_prune": "report+prune",  # PruningHook.after_eval: trial.report and trial.should_prune
    "tell": "tell",  # the trial's user attributes and study.tell
    "run_creation": "run create",  # connect, the run, its params and config.yaml, the sweep's params
    "metric_batch": "metrics",  # the store's log_batch with metrics, sent from MLflow's async queue
    "artifact_upload": "upload",  # the checkpoint files
    "end": "end",  # the run's end-of-trial tags and set_terminated
}
# Also timed, for finding the bottleneck: parts of `ask`, and what a worker does besides the groups.
# lock_*: the lock held shared to take a trial; alone_*: held alone to recover trials and refill the queue.
DETAILS = ("lock_wait", "lock_hold", "alone_wait", "alone_hold", "recover", "metric_wait", "upload_wait", "heartbeat", "compose", "after_tell")


class CallClock:
    """Per trial of this process: its wall time and the seconds of each group's calls."""

    def __init__(self) -> None:
        self.trials: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._last_told: float | None = None
        self._before_next: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def timed(self, group: str, outermost: bool = True) -> Iterator[None]:
        """Add this call's seconds to `group` of the current trial; with `outermost`, only when no other
        timed call of this thread encloses it (it is then part of that call's seconds)."""
        depth = getattr(self._local, "depth", 0)
        if outermost and depth:
            yield
            return
        self._local.depth, start = depth + 1, time.perf_counter()
        try:
            yield
        finally:
            self._local.depth = depth
            self.add(group, time.perf_counter() - start)

    def add(self, group: str, seconds: float) -> None:
        """Count `seconds` to the current trial, or to the next one between trials."""
        with self._lock:
            (self._before_next if self.current is None else self.current["calls"])[group].append(seconds)

    def wrap(self, group: str, function: Callable, outermost: bool = True,
             only_if: Callable[..., bool] | None = None) -> Callable:
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            if only_if is not None and not only_if(*args, **kwargs):
                return function(*args, **kwargs)
            with self.timed(group, outermost):
                return function(*args, **kwargs)

        return timed_call

    def start_trial(self, number: int, started: float) -> None:
        with self._lock:
            self.current = {"number": number, "started": started, "calls": self._before_next}
            self._before_next = defaultdict(list)
            if self._last_told is not None and self.trials:
                self.trials[-1]["calls"]["after_tell"].append(started - self._last_told)

    def end_trial(self) -> None:
        with self._lock:
            if self.current is None:
                return
            self._last_told = time.perf_counter()
            self.current["wall_seconds"] = self._last_told - self.current.pop("started")
            self.trials.append(self.current)
            self.current = None


@contextmanager
def measure_calls() -> Iterator[CallClock]:
    """Within this block, the coordination calls of this process's trials are timed into the clock."""
    import optuna
    from mlflow import MlflowClient
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # Imported here, not at the top: `sweep_trial` imports `tfsweep.training`, which must be the stand-in.
    from tfsweep import study as studies
    from tfsweep import checkpoint_artifacts, sweep_trial, tracking, tracking_store
    from tfsweep.hooks import Hook

    clock = CallClock()
    local = threading.local()
    lock, next_trial, tell = studies.study_lock, studies.next_trial, optuna.study.Study.tell

    @contextmanager
    def timed_lock(sweep, shared=False):
        local.asked, requested = False, time.perf_counter()
        with lock(sweep, shared=shared):
            acquired, local.requested = time.perf_counter(), requested
            with clock.timed("lock_section"):  # makes the section the outermost call of its thread
                yield
        released = time.perf_counter()
        if local.asked:
            clock.add("ask", released - requested)
            clock.add("lock_wait", acquired - requested)
            clock.add("lock_hold", released - acquired)
        elif not shared:
            clock.add("alone_wait", acquired - requested)
            clock.add("alone_hold", released - acquired)

    def timed_next_trial(study, *args, **kwargs):
        trial = next_trial(study, *args, **kwargs)
        if trial is not None:
            clock.start_trial(trial.number, getattr(local, "requested", time.perf_counter()))
            local.asked = True
        return trial

    def timed_tell(study, *args, **kwargs):
        try:
            with clock.timed("tell"):
                return tell(study, *args, **kwargs)
        finally:
            clock.end_trial()

    def has_metrics(store, run_id, metrics=(), *args, **kwargs):
        return bool(metrics)

    timed = [
        (studies, "recover", "recover"),
        (sweep_trial, "suggest", "suggest"),
        (sweep_trial, "trial_config", "compose"),
        (sweep_trial.PruningHook, "after_eval", "report_prune"),
        (optuna.trial.Trial, "set_user_attr", "tell"),
        (optuna.storages.RDBStorage, "record_heartbeat", "heartbeat"),
        (tracking_store, "connect", "run_creation"),
        (tracking.MlflowHook, "begin", "run_creation"),
        # The sweep's own hooks that start with the run (linking the trial and its run, its params).
        *((hook, "begin", "run_creation") for hook in vars(sweep_trial).values()
          if isinstance(hook, type) and issubclass(hook, Hook) and "begin" in vars(hook)),
        (RestStore, "log_batch", "metric_batch"),
        (SqlAlchemyStore, "log_batch", "metric_batch"),
        (tracking.MlflowHook, "_wait_for_queue", "metric_wait"),  # the loop waits for sent batches
        (checkpoint_artifacts.CheckpointUploader, "wait", "upload_wait"),  # ... and for an upload
        *((owner, name, "artifact_upload") for owner in (MlflowClient, HttpArtifactRepository)
          for name in ("log_artifact", "log_artifacts")),
        (MlflowClient, "set_tag", "end"),
        (MlflowClient, "set_terminated", "end"),
    ]
    options = {"recover": {"outermost": False},  # counted inside `ask` as well
               "metric_batch": {"only_if": has_metrics}}  # not the batches of params and tags
    with ExitStack() as stack:
        for owner, name, group in timed:
            if not hasattr(owner, name):  # the code it times has changed: say so rather than show zeros
                log.warning("load test: %s.%s is gone; %s is not timed there", owner.__name__, name, group)
                continue
            wrapper = clock.wrap(group, getattr(owner, name), **options.get(group, {}))
            stack.enter_context(patch.object(owner, name, wrapper))
        stack.enter_context(patch.object(studies, "study_lock", timed_lock))
        stack.enter_context(patch.object(studies, "next_trial", functools.wraps(next_trial)(timed_next_trial)))
        stack.enter_context(patch.object(optuna.study.Study, "tell", functools.wraps(tell)(timed_tell)))
        # Keras is not loaded in a stand-in worker; clearing its session would load TensorFlow.
        stack.enter_context(patch.object(sweep_trial, "_clear_keras", lambda: None))
        yield clock
