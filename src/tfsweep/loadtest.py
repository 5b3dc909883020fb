"""A load test of the coordination layer: N real sweep workers against one PostgreSQL and one MLflow server.

Each worker is a process running the sweep's own worker loop (`tfsweep.sweep.work`, `run_trial`) on a
study in PostgreSQL with trials tracked on the MLflow server. Only training is replaced: `stand_in_train`
has `tfsweep.training.train`'s signature and drives the real hooks (the MlflowHook, the PruningHook, ...)
through a `StandInTrainer` that takes milliseconds instead of minutes and writes checkpoint files the size
of the real network's. Every Optuna and MLflow call stays real: the study lock, ask, suggest, report,
should_prune, tell, heartbeats, run creation, params, metric batches, the checkpoint upload, run end.

The workers never import TensorFlow (64 of them would not fit in a small machine): `install_stand_in`
puts the stand-in in place of `tfsweep.training`, the one module through which the sweep reaches it.

The calls are timed from outside with `unittest.mock.patch.object`, as the benchmark's sweep-overhead row
times real trials; each second counts once, under the outermost timed call of its thread.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import types
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest.mock import patch

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[2]
RESULTS_DIR = PROJECT_DIR / "bench" / "results"
EXPERIMENT = "tfsweep-loadtest"

# The coordination calls of one trial, as the table names them. Per trial, a group's seconds are the sum
# of its calls in that trial (a trial reports and sends metric batches several times).
GROUPS = {
    "ask": "ask",  # the study lock (waiting included), recovery of dead workers' trials, study.ask, claim
    "suggest": "suggest",
    "report_prune": "report+prune",  # PruningHook.after_eval: trial.report and trial.should_prune
    "tell": "tell",  # the trial's user attributes and study.tell
    "run_creation": "run create",  # connect, the run, its params and config.yaml, the sweep's params
    "metric_batch": "metrics",  # the store's log_batch with metrics, sent from MLflow's async queue
    "artifact_upload": "upload",  # the checkpoint files
    "end": "end",  # the run's end-of-trial tags and set_terminated
}
# Also timed, for finding the bottleneck: parts of `ask`, and what a worker does besides the groups.
DETAILS = ("lock_wait", "lock_hold", "recover", "metric_wait", "upload_wait", "heartbeat", "compose", "after_tell")


# -- the stand-in for training ---------------------------------------------------------------------
def checkpoint_bytes(cfg: DictConfig) -> int:
    """The size of a real checkpoint of `cfg`'s network: float32 weights plus the optimizer's slots."""
    from tfsweep.config import feature_map_size
    from tfsweep.data import IMAGE_SIZE

    model = cfg.model
    kernel, (first, second) = model.kernel_size, model.filters[:2]
    side = feature_map_size(model, IMAGE_SIZE)
    weights = (kernel * kernel * first + first + kernel * kernel * first * second + second
               + side * side * second * model.dense_units + model.dense_units
               + model.dense_units * model.num_classes + model.num_classes)
    target = str(cfg.optimizer.get("_target_", "")).lower()  # Adam keeps 2 slots per weight, momentum 1
    slots = 2 if "adam" in target else 1 if float(cfg.optimizer.get("momentum", 0) or 0) > 0 else 0
    return 4 * weights * (1 + slots)


class StandInCheckpoints:
    """What hooks read of `tf.train.CheckpointManager`: `checkpoints`, `latest_checkpoint`, `directory`.

    Files are named and indexed as TensorFlow names them (`ckpt-200.index`, `ckpt-200.data-00000-of-00001`,
    `checkpoint`) and the data file has the real size; it is sparse, so writing it costs no disk time.
    """

    def __init__(self, directory: Path, keep: int, size: int) -> None:
        self.directory, self.keep, self.size = str(directory), keep, size
        self.checkpoints: list[str] = []

    @property
    def latest_checkpoint(self) -> str | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def save(self, checkpoint_number: int) -> str:
        prefix = str(Path(self.directory) / f"ckpt-{checkpoint_number}")
        Path(prefix + ".index").write_bytes(os.urandom(256))
        with open(prefix + ".data-00000-of-00001", "wb") as data:
            data.write(os.urandom(4096))
            data.truncate(self.size)
        self.checkpoints.append(prefix)
        for old in self.checkpoints[:-self.keep]:
            for path in Path(old).parent.glob(Path(old).name + ".*"):
                path.unlink()
        self.checkpoints = self.checkpoints[-self.keep:]
        names = [Path(p).name for p in self.checkpoints]
        (Path(self.directory) / "checkpoint").write_text(
            f'model_checkpoint_path: "{names[-1]}"\n' + "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in names))
        return prefix


def synthetic_accuracy(cfg: DictConfig, step: int) -> float:
    """A validation curve that rises with the steps and depends on the trial's values, so TPE has something
    to learn and the median pruner stops some trials, as in a real sweep."""
    learning_rate = OmegaConf.select(cfg, "optimizer.learning_rate", default=1e-3)
    learning_rate = float(learning_rate) if isinstance(learning_rate, (int, float)) else 1e-3  # or a schedule
    ceiling = 0.99 - 0.08 * abs(math.log10(learning_rate) + 2.5) - 0.05 * float(cfg.model.dropout)
    return max(0.1, ceiling * (1 - math.exp(-4 * step / cfg.trainer.steps)))


class StandInTrainer:
    """Satisfies `tfsweep.hooks.Trainer` and calls the hooks at the steps the real Trainer calls them.

    `train_seconds` of sleep stand in for all the training chunks together.
    """

    def __init__(self, cfg: DictConfig, hooks: list, train_seconds: float, checkpoint_size: int) -> None:
        self.cfg, self.hooks, self.train_seconds = cfg, list(hooks), train_seconds
        self.steps, self.start_step = cfg.trainer.steps, 0
        self.model_dir = Path(cfg.trainer.model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.splits = self.network = None
        self.manager = StandInCheckpoints(self.model_dir, cfg.trainer.keep_checkpoints, checkpoint_size)
        self._stop_reason: str | None = None

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def last_probabilities(self):
        import numpy as np

        return np.full((1, self.cfg.model.num_classes), 1 / self.cfg.model.num_classes)

    def predict(self, images):
        raise NotImplementedError("the load test's stand-in has no network")

    def _evaluate(self, step: int) -> dict[str, float]:
        accuracy = synthetic_accuracy(self.cfg, step)
        metrics = {"val/loss": 1 - accuracy, "val/accuracy": accuracy}
        for hook in self.hooks:
            hook.after_eval(self, step, "val", metrics)
        return metrics

    def train(self) -> dict[str, float]:
        t, metrics, error = self.cfg.trainer, {}, None
        boundaries = sorted({s for every in (t.log_every, t.eval_every, t.checkpoint_every)
                             for s in range(every, self.steps, every)} | {self.steps})
        for hook in self.hooks:
            hook.begin(self)
        try:
            for step in boundaries:
                if self._stop_reason is not None:
                    break
                time.sleep(self.train_seconds / len(boundaries))
                at_end = step == self.steps
                if step % t.log_every == 0 or at_end:
                    accuracy = synthetic_accuracy(self.cfg, step)
                    logs = {"train/loss": 1 - accuracy, "train/accuracy": accuracy, "global_step_per_sec": 1e4}
                    for hook in self.hooks:
                        hook.after_log(self, step, logs)
                if step % t.eval_every == 0 or at_end:
                    metrics.update(self._evaluate(step))
                if step % t.checkpoint_every == 0 or at_end:
                    for hook in self.hooks:
                        hook.before_checkpoint(self, step)
                    path = self.manager.save(step)
                    for hook in self.hooks:
                        hook.after_checkpoint(self, step, path)
            return metrics
        except BaseException as exc:
            error = exc
            raise
        finally:
            for hook in self.hooks:
                hook.end(self, error)


STAND_IN = {"train_seconds": 0.005, "checkpoint_size": None}  # set in each worker by `install_stand_in`


def stand_in_train(cfg: DictConfig, hooks=(), parent_run_id: str | None = None,
                   run_tags: dict[str, str] | None = None) -> dict[str, float]:
    """`tfsweep.training.train` without TensorFlow: the same checks, tracking client and hooks."""
    from tfsweep import tracking, tracking_store
    from tfsweep.config import validate
    from tfsweep.hooks import LoggingHook

    validate(cfg)
    all_hooks = [LoggingHook()]
    if cfg.tracking.enabled:
        client = tracking_store.connect(cfg.tracking.uri)
        all_hooks.append(tracking.MlflowHook(cfg, client, parent_run_id=parent_run_id, tags=run_tags))
    all_hooks.extend(hooks)
    size = STAND_IN["checkpoint_size"] or checkpoint_bytes(cfg)
    try:
        return StandInTrainer(cfg, all_hooks, STAND_IN["train_seconds"], size).train()
    except Exception:  # the sweep records one line of it; a load test wants to know where it came from
        log.exception("trial in %s failed", cfg.paths.output_dir)
        raise


def install_stand_in(train_seconds: float = 0.005, checkpoint_size: int | None = None) -> None:
    """Make `tfsweep.training` the stand-in in this process; call before anything imports `tfsweep.sweep`.

    `tfsweep.sweep_trial` and `tfsweep.sweep_results` import `train` and `evaluate_checkpoint` from
    `tfsweep.training` when they load, and that module imports TensorFlow.
    """
    if "tfsweep.training" in sys.modules and not getattr(sys.modules["tfsweep.training"], "STAND_IN", False):
        raise RuntimeError("tfsweep.training is already imported: install the stand-in first")
    STAND_IN.update(train_seconds=train_seconds, checkpoint_size=checkpoint_size)
    module = types.ModuleType("tfsweep.training", "The load test's stand-in for training (no TensorFlow).")
    module.STAND_IN = True
    module.train = stand_in_train

    def evaluate_checkpoint(cfg, split="test"):
        return {f"{split}/loss": 0.0, f"{split}/accuracy": 0.0}

    module.evaluate_checkpoint = evaluate_checkpoint
    sys.modules["tfsweep.training"] = module


# -- timing the calls ------------------------------------------------------------------------------
class CallClock:
    """Per trial of this process: its wall time and the seconds of each group's calls."""

    def __init__(self) -> None:
        self.trials: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._last_told: float | None = None
        self._before_next: dict[str, list[float]] = defaultdict(list)

    def _busy(self) -> int:
        return getattr(self._local, "busy", 0)

    @contextmanager
    def timed(self, group: str, outermost: bool = True) -> Iterator[None]:
        """Add this call's seconds to `group` of the current trial; with `outermost`, only when no other
        timed call of this thread encloses it (it is then part of that call's seconds)."""
        if outermost and self._busy():
            yield
            return
        self._local.busy = self._busy() + 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._local.busy -= 1
            self.add(group, time.perf_counter() - start)

    def add(self, group: str, seconds: float) -> None:
        """Count `seconds` to the current trial, or to the next one between trials (the study lock's
        recovery runs before the trial it hands out exists)."""
        with self._lock:
            calls = self.current["calls"] if self.current is not None else self._before_next
            calls[group].append(seconds)

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

    from tfsweep import study as studies
    from tfsweep import checkpoint_artifacts, sweep_trial, tracking
    from tfsweep.hooks import Hook

    clock = CallClock()
    local = threading.local()
    lock, ask = studies.study_lock, studies.ask

    @contextmanager
    def timed_lock(sweep):
        local.asked, requested = False, time.perf_counter()
        with lock(sweep):
            acquired = time.perf_counter()
            local.requested = requested
            with clock.timed("ask_section"):  # makes the section the outermost call of its thread
                yield
        released = time.perf_counter()
        if local.asked:
            clock.add("ask", released - requested)
            clock.add("lock_wait", acquired - requested)
            clock.add("lock_hold", released - acquired)

    def timed_ask(study, *args, **kwargs):
        trial = ask(study, *args, **kwargs)
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

    tell = optuna.study.Study.tell
    wrapped = [
        (studies, "recover", "recover", False, None),
        (sweep_trial, "suggest", "suggest", True, None),
        (sweep_trial, "trial_config", "compose", True, None),
        (sweep_trial.PruningHook, "after_eval", "report_prune", True, None),
        (optuna.trial.Trial, "set_user_attr", "tell", True, None),
        (optuna.storages.RDBStorage, "record_heartbeat", "heartbeat", True, None),
        (tracking, "connect", "run_creation", True, None),
        (tracking.MlflowHook, "begin", "run_creation", True, None),
        # The sweep's own hooks that start with the run (linking the trial and its run, its params).
        *((hook, "begin", "run_creation", True, None) for hook in vars(sweep_trial).values()
          if isinstance(hook, type) and issubclass(hook, Hook) and "begin" in vars(hook)),
        (RestStore, "log_batch", "metric_batch", True, has_metrics),
        (SqlAlchemyStore, "log_batch", "metric_batch", True, has_metrics),
        (tracking.MlflowHook, "_wait_for_queue", "metric_wait", True, None),  # the loop waits for sent batches
        (checkpoint_artifacts.CheckpointUploader, "wait", "upload_wait", True, None),  # ... and for an upload
        (MlflowClient, "log_artifact", "artifact_upload", True, None),
        (MlflowClient, "log_artifacts", "artifact_upload", True, None),
        (HttpArtifactRepository, "log_artifact", "artifact_upload", True, None),
        (HttpArtifactRepository, "log_artifacts", "artifact_upload", True, None),
        (MlflowClient, "set_tag", "end", True, None),
        (MlflowClient, "set_terminated", "end", True, None),
    ]
    with ExitStack() as stack:
        for owner, name, group, outermost, only_if in wrapped:
            if not hasattr(owner, name):  # the code it times has changed: say so rather than show zeros
                log.warning("load test: %s.%s is gone; %s is not timed there", owner.__name__, name, group)
                continue
            stack.enter_context(patch.object(owner, name, clock.wrap(group, getattr(owner, name), outermost, only_if)))
        stack.enter_context(patch.object(studies, "study_lock", timed_lock))
        stack.enter_context(patch.object(studies, "ask", functools.wraps(ask)(timed_ask)))
        stack.enter_context(patch.object(optuna.study.Study, "tell", functools.wraps(tell)(timed_tell)))
        # Keras is not loaded in a stand-in worker; clearing its session would load TensorFlow.
        stack.enter_context(patch.object(sweep_trial, "_clear_keras", lambda: None))
        yield clock


# -- the workers -----------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker_main(ctx, index: int, ready, start, out_path: str, train_seconds: float, checkpoint_size: int | None) -> None:
    """One worker process: load the sweep with the stand-in, wait for the others, run trials, save timings."""
    logging.basicConfig(level=logging.WARNING, format=f"[worker {index}] %(message)s")
    install_stand_in(train_seconds, checkpoint_size)
    from tfsweep import sweep

    record: dict[str, Any] = {"worker": index, "pid": os.getpid()}
    with measure_calls() as clock:
        ready.put(index)
        start.wait()
        started, cpu = time.perf_counter(), _cpu_seconds()
        try:
            sweep.work(ctx, index, show_progress=False)
        except Exception as exc:  # the parent reports it; the other workers go on
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record.update(seconds=time.perf_counter() - started, cpu_seconds=_cpu_seconds() - cpu,
                      max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      tensorflow_loaded="tensorflow" in sys.modules,
                      trials=[{**t, "calls": dict(t["calls"])} for t in clock.trials])
    Path(out_path).write_text(json.dumps(record))
    sys.exit(1 if "error" in record else 0)


# -- server CPU from /proc -------------------------------------------------------------------------
def _tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children it has reaped (PostgreSQL's
    backends end with their connections)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        stats[int(entry.name)] = fields
        children[int(fields[1])].append(int(entry.name))
    total, pending = 0.0, [root_pid]
    while pending:
        pid = pending.pop()
        if pid in stats:
            utime, stime, cutime, cstime = map(int, stats[pid][11:15])
            total += (utime + stime + cutime + cstime) / tick
        pending.extend(children.get(pid, []))
    return total


def server_pids(stack) -> dict[str, int]:
    """The MLflow server's and the PostgreSQL postmaster's process ids, from the stack's state folder."""
    state = Path(stack.state_dir)
    return {"mlflow": int((state / "mlflow.pid").read_text().split()[0]),
            "postgres": int((state / "postgres" / "postmaster.pid").read_text().split()[0])}


# -- one load level --------------------------------------------------------------------------------
def sweep_overrides(n_workers: int, n_trials: int, storage: str, tracking_uri: str, workdir: Path,
                    study_name: str, extra: list[str] = ()) -> list[str]:
    """The sweep command line of a load level: the default sweep on the given storage and tracking server."""
    return [f"sweep.study_name={study_name}", f"sweep.storage='{storage}'", f"sweep.n_trials={n_trials}",
            f"sweep.n_workers={n_workers}", f"sweep.dir='{workdir / study_name}'", f"tracking.uri='{tracking_uri}'",
            f"tracking.experiment_name={EXPERIMENT}", *extra]


def run_level(overrides: list[str], n_workers: int, workdir: Path, pids: dict[str, int] | None = None,
              train_seconds: float = 0.005, checkpoint_size: int | None = None,
              start_timeout: float = 900) -> dict[str, Any]:
    """Run one sweep of `n_workers` stand-in workers started together; return its measurements.

    The parent prepares the study as `run_sweep` does (checks, storage, parent run), starts the workers,
    releases them at once when all have loaded, and times from that moment to the last one's exit.
    The finished study is not published: that happens once per study, not per trial.
    """
    from tfsweep import study as studies
    from tfsweep import sweep_tracking
    from tfsweep.config import flatten
    from tfsweep.sweep_config import SweepContext, check, command_overrides, compose_sweep

    cfg = compose_sweep(overrides)
    sweep = check(cfg)
    ctx = SweepContext(sweep, command_overrides(cfg), cfg.tracking.experiment_name, cfg.tracking.uri)
    client = ctx.client()
    study = studies.load_study(sweep, studies.open_storage(sweep))
    ctx.parent_run_id = sweep_tracking.parent_run(client, ctx.experiment, study,
                                                  {f"sweep.{k}": v for k, v in flatten(cfg.sweep).items()
                                                   if k != "storage"})
    spawn = multiprocessing.get_context("spawn")
    ready, start = spawn.Queue(), spawn.Event()
    outputs = [workdir / f"worker-{i}.json" for i in range(n_workers)]
    processes = [spawn.Process(target=worker_main, name=f"loadtest-worker-{i}",
                               args=(ctx, i, ready, start, str(outputs[i]), train_seconds, checkpoint_size))
                 for i in range(n_workers)]
    # Not a "View run ... at" line on stdout for every trial's end.
    with patch.dict(os.environ, {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
        for process in processes:
            process.start()
    _wait_until_loaded(processes, ready, start_timeout)
    start.set()
    started = time.perf_counter()
    cpu_before = {name: _tree_cpu_seconds(pid) for name, pid in (pids or {}).items()}
    for process in processes:
        process.join()
    wall = time.perf_counter() - started
    server_cpu = {name: _tree_cpu_seconds(pid) - cpu_before[name] for name, pid in (pids or {}).items()}
    workers = []
    for process, path in zip(processes, outputs):
        record = json.loads(path.read_text()) if path.exists() else {"trials": []}
        record["exitcode"] = process.exitcode
        workers.append(record)
    audit = audit_study(studies.load_study(sweep, studies.open_storage(sweep)), sweep.n_trials,
                        client, ctx.experiment, sweep.study_name)
    return summarize_level(n_workers, sweep.n_trials, wall, workers, audit, server_cpu)


def _wait_until_loaded(processes: list, ready, timeout: float) -> None:
    """Wait until every worker has loaded and is ready; stop them all if one dies or time runs out."""
    import queue

    deadline, loaded = time.monotonic() + timeout, 0
    while loaded < len(processes):
        try:
            ready.get(timeout=1)
            loaded += 1
            continue
        except queue.Empty:
            pass
        dead = [p for p in processes if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            for process in processes:
                process.kill()
            reason = (f"{dead[0].name} exited with code {dead[0].exitcode} while loading" if dead
                      else f"the workers did not all load within {timeout:.0f} s")
            raise RuntimeError(f"load test stopped: {reason}")


def audit_study(study, n_trials: int, client, experiment: str, study_name: str) -> dict[str, Any]:
    """Duplicated and lost trials, by the study's trial numbers and by the MLflow child runs."""
    from optuna.trial import TrialState

    from tfsweep import sweep_tracking

    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    runs = []
    if client is not None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`{sweep_tracking.STUDY_TAG}` = '{study_name}' and "
                                  f"tags.`{sweep_tracking.ROLE_TAG}` = 'trial'", max_results=50000)
    run_numbers = [int(r.data.tags.get(sweep_tracking.NUMBER_TAG, -1)) for r in runs]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {
        "study_trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": [{"number": t.number, "reason": t.user_attrs.get("fail_reason")}
                   for t in trials if t.state == TrialState.FAIL],
        "left_running": sum(not t.state.is_finished() for t in trials),
        "duplicated_trials": (len(numbers) - len(set(numbers))) + max(0, len(trials) - n_trials),
        "lost_trials": len(set(range(n_trials)) - {t.number for t in finished}),
        "mlflow_runs": len(runs),
        "duplicated_runs": len(run_numbers) - len(set(run_numbers)),
        "lost_runs": len(set(range(n_trials)) - set(run_numbers)),
        "runs_not_finished": sum(r.info.status != "FINISHED" for r in runs),
    }


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarize_level(n_workers: int, n_trials: int, wall: float, workers: list[dict], audit: dict[str, Any],
                    server_cpu: dict[str, float]) -> dict[str, Any]:
    """The level's row: trials per minute, per-trial p50/p99 seconds of each group, errors, duplicates, losses."""
    trials = [t for w in workers for t in w.get("trials", [])]
    per_trial = {group: [sum(t["calls"].get(group, [])) for t in trials] for group in (*GROUPS, *DETAILS)}
    per_call = {group: [s for t in trials for s in t["calls"].get(group, [])] for group in (*GROUPS, *DETAILS)}
    worker_errors = [f"worker {w.get('worker')}: {w.get('error') or 'exit code %s' % w['exitcode']}"
                     for w in workers if w.get("error") or w["exitcode"]]
    told = len(trials)
    return {
        "workers": n_workers,
        "trials": n_trials,
        "wall_seconds": wall,
        "trials_per_minute": 60 * told / wall if wall else None,
        "trial_seconds": {"p50": percentile([t["wall_seconds"] for t in trials], 50),
                          "p99": percentile([t["wall_seconds"] for t in trials], 99)},
        "per_trial": {g: {"p50": percentile(v, 50), "p99": percentile(v, 99)} for g, v in per_trial.items()},
        "per_call": {g: {"calls": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}
                     for g, v in per_call.items()},
        "errors": len(worker_errors) + len(audit["failed"]) + audit["runs_not_finished"],
        "error_messages": worker_errors + [f"trial {f['number']}: {f['reason']}" for f in audit["failed"]],
        "duplicated": audit["duplicated_trials"] + audit["duplicated_runs"],
        "lost": audit["lost_trials"] + audit["lost_runs"],
        "audit": audit,
        "server_cpu_seconds": server_cpu,
        "server_cpu_seconds_per_trial": {k: v / told for k, v in server_cpu.items()} if told else {},
        "worker_cpu_seconds_per_trial": sum(w.get("cpu_seconds", 0) for w in workers) / told if told else None,
        "workers_loaded_tensorflow": sum(bool(w.get("tensorflow_loaded")) for w in workers),
        "worker_max_rss_mb": max((w.get("max_rss_mb", 0) for w in workers), default=None),
    }


# -- the whole test --------------------------------------------------------------------------------
COLUMNS = ["workers", "trials", "wall s", "trials/min", *(f"{label} p50/p99 ms" for label in GROUPS.values()),
           "errors", "duplicated", "lost"]


def table(levels: list[dict[str, Any]]) -> str:
    """The markdown table of the levels: one row per number of workers."""
    def ms(stats: dict[str, float | None]) -> str:
        return "/".join("-" if stats[q] is None else f"{1000 * stats[q]:.0f}" for q in ("p50", "p99"))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for level in levels:
        cells = [str(level["workers"]), str(level["trials"]), f"{level['wall_seconds']:.1f}",
                 f"{level['trials_per_minute']:.0f}", *(ms(level["per_trial"][g]) for g in GROUPS),
                 str(level["errors"]), str(level["duplicated"]), str(level["lost"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_trial_seconds(results_dir: Path = RESULTS_DIR) -> tuple[float | None, str]:
    """A default-sweep trial's median wall time, from the newest full benchmark's sweep-overhead row
    (sweeps/bench.yaml runs default-sweep trials); (None, reason) when there is none."""
    for path in sorted(results_dir.glob("*-full.json"), reverse=True):
        row = json.loads(path.read_text()).get("rows", {}).get("sweep_overhead", {})
        seconds = (row.get("detail") or {}).get("median_trial_seconds")
        if seconds:
            shown = path.relative_to(PROJECT_DIR) if path.is_relative_to(PROJECT_DIR) else path
            return float(seconds), f"{shown}, median default-sweep trial"
    return None, "no full benchmark in bench/results; give --trial-seconds"


def estimate_capacity(levels: list[dict[str, Any]], trial_seconds: float, server_cores: float) -> dict[str, Any]:
    """How many real workers one PostgreSQL and one MLflow server can feed, and the first bottleneck.

    Three ceilings, from the largest level: each server's CPU seconds per trial (a server with
    `server_cores` cores serves at most server_cores / cpu_per_trial trials a second), and the study
    lock, which serializes asking (at most 1 / lock_hold trials a second). A worker asks for one trial
    every `trial_seconds`, so a ceiling of R trials per second feeds R x trial_seconds workers. The first
    bottleneck by latency is the group whose p50 per trial grew most from the smallest level to the largest.
    """
    largest, smallest = levels[-1], levels[0]
    ceilings: dict[str, float] = {}
    for server, cpu in largest["server_cpu_seconds_per_trial"].items():
        if cpu > 0:
            ceilings[f"{server} CPU"] = server_cores / cpu * trial_seconds
    hold = largest["per_trial"]["lock_hold"]["p50"]
    if hold:
        ceilings["study lock"] = trial_seconds / hold
    growth = {}
    for group in GROUPS:
        low, high = smallest["per_trial"][group]["p50"], largest["per_trial"][group]["p50"]
        if low and high:
            growth[group] = high / low
    limit = min(ceilings, key=ceilings.get) if ceilings else None
    return {"trial_seconds": trial_seconds, "server_cores": server_cores,
            "workers_by_ceiling": {k: round(v) for k, v in ceilings.items()},
            "workers": round(ceilings[limit]) if limit else None, "first_limit": limit,
            "p50_growth": growth, "grows_first": max(growth, key=growth.get) if growth else None}


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    from tfsweep.bench.machine import read_cpuinfo

    return {"cpu": read_cpuinfo()["model_name"], "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(),
            **{package: version(package) for package in ("optuna", "mlflow", "sqlalchemy", "psycopg2-binary")
               if _installed(package)},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
        return True
    except PackageNotFoundError:
        return False


@contextmanager
def _taking_turns(lock_file: str | None) -> Iterator[None]:
    if lock_file is None:
        yield
        return
    import fcntl

    with open(lock_file, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_load_test(worker_counts: list[int], trials_per_worker: int, stack_dir: Path, *, mlflow_port: int = 5001,
                  trial_seconds: float | None = None, train_seconds: float = 0.005,
                  checkpoint_size: int | None = None, lock_file: str | None = None, server_cores: float | None = None,
                  results_dir: Path | None = RESULTS_DIR, extra_overrides: list[str] = (),
                  keep_artifacts: bool = False) -> dict[str, Any]:
    """Bring up (or reuse) the local stack and run one sweep per worker count; return (and save) the result."""
    from tfsweep import stack as stacks

    running = stacks.up(stack_dir, mlflow_port=mlflow_port)
    os.environ.update(running.worker_env())  # the workers inherit the tracking server's credentials
    pids = server_pids(running)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    levels = []
    for n_workers in worker_counts:
        with _taking_turns(lock_file), tempfile.TemporaryDirectory(prefix="tfsweep-loadtest-") as tmp:
            study_name = f"loadtest-{stamp}-{n_workers}w"
            overrides = sweep_overrides(n_workers, n_workers * trials_per_worker, running.storage_url(),
                                        running.tracking_uri, Path(tmp), study_name, list(extra_overrides))
            log.info("%d workers, %d trials: study %s", n_workers, n_workers * trials_per_worker, study_name)
            level = run_level(overrides, n_workers, Path(tmp), pids, train_seconds, checkpoint_size)
            level["study"] = study_name
            levels.append(level)
            if not keep_artifacts:
                remove_checkpoint_artifacts(Path(running.state_dir) / "artifacts", study_name)
            log.info("%s", table([level]).splitlines()[-1])
    seconds, source = (trial_seconds, "--trial-seconds") if trial_seconds else default_trial_seconds()
    result = {"mode": "loadtest", "machine": machine(), "stack": {"mlflow": running.tracking_uri,
              "postgres": f"{running.host}:{running.pg_port}"}, "trials_per_worker": trials_per_worker,
              "train_seconds": train_seconds, "levels": levels, "table": table(levels),
              "trial_seconds_source": source}
    if seconds:
        result["capacity"] = estimate_capacity(levels, seconds, server_cores or os.cpu_count())
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{result['machine']['date'][:16].replace(':', '')}-loadtest.json"
        path.write_text(json.dumps(result, indent=2))
        result["path"] = str(path)
    return result


def remove_checkpoint_artifacts(artifacts_root: Path, study_name: str) -> int:
    """Delete the checkpoint files a level's trials uploaded to the local stack (several GB at 64 workers);
    the runs, their metrics and other artifacts stay. Return how many runs were cleaned."""
    from mlflow import MlflowClient

    from tfsweep import sweep_tracking

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{sweep_tracking.STUDY_TAG}` = '{study_name}'",
                              max_results=50000)
    for run in runs:
        uri = run.info.artifact_uri
        if uri.startswith("mlflow-artifacts:/"):
            shutil.rmtree(artifacts_root / uri.removeprefix("mlflow-artifacts:/").lstrip("/") / "checkpoints",
                          ignore_errors=True)
    return len(runs)


def capacity_lines(result: dict[str, Any]) -> list[str]:
    capacity = result.get("capacity")
    if not capacity:
        return [f"no capacity estimate: {result['trial_seconds_source']}"]
    ceilings = ", ".join(f"{name} {workers}" for name, workers in capacity["workers_by_ceiling"].items())
    return [f"capacity at {capacity['trial_seconds']:.1f} s a trial ({result['trial_seconds_source']}), servers on "
            f"{capacity['server_cores']:g} cores: about {capacity['workers']} workers; first limit: "
            f"{capacity['first_limit']} (workers per ceiling: {ceilings})",
            f"p50 per trial grew most with the workers in: {capacity['grows_first']} "
            f"(x{capacity['p50_growth'].get(capacity['grows_first'], float('nan')):.1f})"]
