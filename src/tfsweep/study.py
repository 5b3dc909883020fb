"""The Optuna side of a sweep: storage, sampler, pruner, and the bookkeeping that lets several workers
share one study and resume it after a crash without redoing or losing trials.

Budget rule: a study wants `n_trials` trials that count. A trial counts once it is running, complete,
pruned, or failed for a reason of its own (NaN loss, an exception). A trial whose worker died (kill -9,
Ctrl-C, a lost machine) does not count; it is failed and queued again with the same parameters by
Optuna's retry callback, and the retry continues from the dead trial's checkpoints.

Queue rule: the budget is a queue of trials. Recovery (`recover`, then `queue_budget`) puts in it
what the budget still lacks, a few trials per running one at a time, and a killed trial's retry; a worker
takes the next one (`next_trial`) and never creates one, so the budget is exact without counting the study
on each trial.

Ownership rule: a worker takes a trial from the queue and records itself as its owner holding the
study's lock shared (`study_lock(shared=True)`): askers never wait for each other. Recovery holds it
alone, and runs only when the queue is empty or a command starts. So a running trial without an owner,
seen by recovery, was left by a worker that died in between; a running trial whose owner is a process of
this machine that no longer exists is also orphaned; on a database, Optuna's heartbeat finds dead owners
elsewhere.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Iterator

import numpy
import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from tfsweep.credentials import redact_url
from tfsweep.crashpoints import crashpoint
from tfsweep.errors import ConfigError, UserError, first_line
from tfsweep.journal import check_journal
from tfsweep.processes import file_lock, process_alive
from tfsweep.storage_proxy import ProxyStorage
from tfsweep.sweep_config import SweepConfig, build

log = logging.getLogger(__name__)

WORKER_ATTR = "worker"  # "host:pid" of the process running the trial
CLAIM_ATTR = "claimed_trial"  # the trial number the worker attribute belongs to (retries copy user attrs)
FAIL_ATTR = "fail_reason"  # set when a trial failed by itself; such a trial counts and is not retried
PUBLISHER_ATTR = "publisher"  # study attribute: the worker publishing the results of so many finished trials
QUEUE_MIN = 16  # queued trials at least, and one per running trial: Optuna reads every queued trial on each sync
WAIT_SECONDS = 2.0  # a worker waiting for others' trials looks again this often (one cheap query)
PROXY_READY_SECONDS = 10  # how long a worker waits for the storage proxy to answer at its start


class StorageError(UserError):
    """The Optuna storage cannot be opened."""


class Outcome(enum.Enum):
    """How a trial ended, as the summary, the MLflow `optuna.state` tag and the bench read it."""

    complete = "complete"
    pruned = "pruned"
    failed = "failed"  # by itself: counts, and is not retried
    interrupted = "interrupted"  # its worker died or was stopped: retried
    running = "running"
    waiting = "waiting"


def outcome(trial: FrozenTrial) -> Outcome:
    if trial.state == TrialState.FAIL:
        return Outcome.failed if FAIL_ATTR in trial.user_attrs else Outcome.interrupted
    return {TrialState.COMPLETE: Outcome.complete, TrialState.PRUNED: Outcome.pruned,
            TrialState.RUNNING: Outcome.running, TrialState.WAITING: Outcome.waiting}[trial.state]


def experimental_ok() -> warnings.catch_warnings:
    """Optuna's heartbeat and retry API is marked experimental; we depend on it knowingly."""
    return warnings.catch_warnings(action="ignore", category=optuna.exceptions.ExperimentalWarning)


# -- storage ---------------------------------------------------------------------------------------
def is_database(sweep: SweepConfig) -> bool:
    return "://" in sweep.storage


def open_storage(sweep: SweepConfig, tables_ready: bool = False) -> optuna.storages.BaseStorage:
    """A journal file (the default: safe for several processes on one machine), a database URL, or the
    database through Optuna's gRPC proxy (`sweep.storage_proxy`).

    `tables_ready`: the command opened this database before starting its workers, so a worker neither
    creates Optuna's tables nor checks their schema version again (a few queries and Alembic's scripts).
    """
    try:
        if not is_database(sweep):
            path = Path(sweep.storage).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            check_journal(path)
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        engine = {"connect_args": {"connect_timeout": 10}} if sweep.storage.startswith("postgresql") else {}
        if sweep.storage_proxy:  # the database keeps only the heartbeat: no pool of idle connections
            engine["poolclass"] = sqlalchemy.pool.NullPool
        elif engine:  # one idle connection a worker; the heartbeat thread's comes and goes each minute
            engine["pool_size"] = 1
        # Optuna creates its tables on first use, and commands doing that at once collide; the lock
        # makes them take turns.
        with contextlib.nullcontext() if tables_ready else study_lock(sweep), experimental_ok():
            database = optuna.storages.RDBStorage(sweep.storage, engine_kwargs=engine,
                                                  skip_table_creation=tables_ready,
                                                  skip_compatibility_check=tables_ready,
                                                  heartbeat_interval=sweep.heartbeat_seconds,
                                                  grace_period=2 * sweep.heartbeat_seconds)
        if not sweep.storage_proxy:
            return database
        with experimental_ok():
            storage = ProxyStorage(sweep.storage_proxy, database)
        storage.wait_server_ready(timeout=PROXY_READY_SECONDS)
        return storage
    except UserError:
        raise
    except Exception as exc:  # SQLAlchemy, psycopg and OS errors all mean the same thing here
        proxy = f" through sweep.storage_proxy={sweep.storage_proxy}" if sweep.storage_proxy else ""
        raise StorageError(f"sweep.storage={redact_url(sweep.storage)!r} cannot be opened{proxy} ({first_line(exc)}); "
                           "start the database (and the proxy), fix the URL, or use a journal file path") from exc


def load_study(sweep: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    with study_lock(sweep):  # creating a new study in a database is a race too
        study = optuna.create_study(storage=storage, study_name=sweep.study_name, direction=sweep.direction.value,
                                    pruner=build("pruner", sweep.pruner), load_if_exists=True)
        if study.metric_names != [sweep.metric]:
            with experimental_ok():
                study.set_metric_names([sweep.metric])  # the dashboard's axis reads val/accuracy, not Objective 0
        return study


def next_trial(study: optuna.Study, sweep: SweepConfig) -> optuna.Trial | None:
    """Take the next queued trial and claim it; None when the queue is empty. Call holding
    `study_lock(sweep, shared=True)`.

    The sampler is seeded by `sweep.seed` and the trial's place in the budget (its first attempt's
    number), so a resumed study, or a second worker, draws what one uninterrupted worker would have
    drawn, not a replay of the first draws. It is set before the Trial exists: multivariate TPE samples
    when the Trial is made.
    """
    study._thread_local.cached_all_trials = None  # noqa: SLF001 - as Study.ask does: read the storage afresh
    trial_id = study._pop_waiting_trial_id()  # noqa: SLF001 - Study.ask without its fall-back to a new trial
    if trial_id is None:
        return None
    crashpoint("sweep.after_trial_created")
    frozen = study._storage.get_trial(trial_id)  # noqa: SLF001
    position = (retry_history(frozen) or [frozen.number])[0]
    seed = None if sweep.seed is None else int(numpy.random.SeedSequence([sweep.seed, position]).generate_state(1)[0])
    study.sampler = build("sampler", sweep.sampler, seed=seed)
    trial = optuna.Trial(study, trial_id)
    claim(study, trial)
    crashpoint("sweep.after_owner_recorded")
    return trial


@functools.cache
def _lock_engine(url: str) -> sqlalchemy.Engine:
    """One connection kept open for the lock: not a new server process and password exchange each time."""
    return sqlalchemy.create_engine(url, pool_size=1, pool_pre_ping=True, connect_args={"connect_timeout": 10})


@contextlib.contextmanager
def study_lock(sweep: SweepConfig, shared: bool = False) -> Iterator[None]:
    """Held shared while a trial is taken and claimed; held alone while trials are recovered and queued,
    while tables are created and while a publisher is chosen.

    A file lock for a journal or SQLite file, a PostgreSQL advisory lock for a database shared by
    machines; both are released by the operating system or the server when their process dies. On SQLite
    it is always held alone: a pop there reads the trial without locking its row.
    """
    if sweep.storage.startswith("postgresql"):
        key, mode = {"key": f"tfsweep:{sweep.study_name}"}, "_shared" if shared else ""
        with _lock_engine(sweep.storage).connect() as connection:
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock{mode}(hashtext(:key))"), key)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock{mode}(hashtext(:key))"), key)
        return
    if is_database(sweep):
        url = sqlalchemy.make_url(sweep.storage)
        if url.get_backend_name() != "sqlite" or not url.database:
            raise ConfigError(f"sweep.storage={redact_url(sweep.storage)!r} is not supported: use a journal file "
                              "path, sqlite:///<file> or postgresql://user@host/db")
        lock_path = Path(url.database).expanduser().with_suffix(".lock")
        shared = False  # SQLite has no SELECT ... FOR UPDATE: two askers at once could take one trial
    else:
        lock_path = Path(sweep.storage).expanduser().with_name(Path(sweep.storage).name + ".study.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path, shared=shared):
        yield


# -- the budget ------------------------------------------------------------------------------------
def uses_budget(trial: FrozenTrial) -> bool:
    """Whether the trial uses up one of the study's `n_trials`."""
    return outcome(trial) in (Outcome.complete, Outcome.pruned, Outcome.failed, Outcome.running)


def finished_trials(study: optuna.Study) -> int:
    return sum(uses_budget(t) and t.state.is_finished() for t in study.get_trials(deepcopy=False))


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The complete trial with the best value, the earliest of equal ones; None before one completes.
    Not `study.best_trial`: a database's own query returns any of equal trials, so through the proxy and
    directly, or from one call to the next, the published best could differ."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: t.value) if complete else None  # the first of equals, by number


def is_finished(study: optuna.Study, n_trials: int) -> bool:
    """All the budget's trials have ended (none is running in another worker)."""
    return finished_trials(study) >= n_trials and not any_running(study)


def any_running(study: optuna.Study) -> bool:
    return bool(running_trials(study))


def may_need_a_retry(study: optuna.Study, sweep: SweepConfig) -> bool:
    """Whether a worker that finds the budget taken should stay: a trial still runs on a database storage,
    and if its worker (maybe on another machine) dies, the heartbeat shows it and the trial is queued again
    for whoever is still there. On a journal file, rerunning the command does that instead."""
    return is_database(sweep) and any_running(study)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier attempts this trial retries, oldest first ([] for a first attempt)."""
    with experimental_ok():
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


# -- owners ----------------------------------------------------------------------------------------
def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record this process as the trial's owner; `next_trial` does, right after taking it."""
    storage = study._storage  # noqa: SLF001 - Study has no public storage accessor
    if is_heartbeat_enabled(storage):  # a study's RDBStorage is wrapped in Optuna's cache: not an RDBStorage
        storage.record_heartbeat(trial._trial_id)  # noqa: SLF001 - an owned trial always has a heartbeat
    trial.set_user_attr(WORKER_ATTR, worker_id())
    crashpoint("sweep.before_owner_recorded")
    trial.set_user_attr(CLAIM_ATTR, trial.number)


def worker_alive(worker: str) -> bool:
    """Whether the worker "host:pid" may still run: a process of this machine that exists, or any other
    machine's (their deaths show in Optuna's heartbeat instead)."""
    host, _, pid = worker.rpartition(":")
    return host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid() or process_alive(int(pid))


def _orphaned(trial: FrozenTrial) -> bool:
    """A running trial that no live worker owns (call under `study_lock`)."""
    if trial.user_attrs.get(CLAIM_ATTR) != trial.number:
        return True  # its creator died before recording itself: it would still hold the lock otherwise
    return not worker_alive(str(trial.user_attrs.get(WORKER_ATTR, "")))


def running_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def may_need_recovery(study: optuna.Study, watched: list[FrozenTrial]) -> bool:
    """Whether a worker may have died since `watched` were the running trials (at the last recovery): one
    of them ended interrupted, is still unclaimed, or has a dead owner of this machine, or Optuna's
    heartbeat finds one gone silent. Reads the running trials only and takes no lock, so waiting workers
    can ask it often; `recover` then decides, holding the lock."""
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)  # failed here, retried by `recover`
    now = {t.number: t for t in running_trials(study)}
    storage = study._storage  # noqa: SLF001
    for trial in watched:
        if trial.number not in now:
            if outcome(storage.get_trial(trial._trial_id)) is Outcome.interrupted:  # noqa: SLF001
                return True
        elif _orphaned(now[trial.number]):
            return True
    return False


def recover(study: optuna.Study, sweep: SweepConfig) -> None:
    """Fail the running trials of dead workers and queue every interrupted trial again once.

    Call holding `study_lock` alone. Optuna's heartbeat fails a database trial whose worker went
    silent on any machine; the ownership rule finds the rest.
    """
    with experimental_ok():
        optuna.storages.fail_stale_trials(study)  # does nothing without a heartbeat (journal file)
    storage = study._storage  # noqa: SLF001
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _orphaned(trial):
            # FrozenTrial has no public id; Optuna's own fail_stale_trials uses the same one.
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
            log.warning("trial %d was interrupted (its worker %s is gone); it will be retried", trial.number,
                        trial.user_attrs.get(WORKER_ATTR, "died before claiming it, so it"))
            crashpoint("sweep.after_trial_failed")
    trials = study.get_trials(deepcopy=True)
    retried = {n for t in trials for n in retry_history(t)}
    with experimental_ok():
        # The retry resumes from the dead trial's checkpoints, so it keeps the steps already reported.
        retry = RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry, inherit_intermediate_values=True)
    for trial in trials:
        if outcome(trial) is Outcome.interrupted and trial.number not in retried:
            retry(study, trial)  # does nothing once the trial has used up sweep.max_retry


def queue_budget(study: optuna.Study, sweep: SweepConfig) -> int:
    """Queue new trials for what the budget lacks; return how many trials the queue holds. Call holding
    `study_lock` alone, after `recover`.

    A trial takes its place in the budget when it is queued: the budget lacks n_trials minus the trials
    that count, the queued ones, and the interrupted ones whose retry `recover` has still to queue (one
    interrupted while this runs). An interrupted trial with no retry left gives its place to a new trial.
    The queue is kept short (`QUEUE_MIN`, or one per running trial), not the whole budget: every worker's
    sync with the storage reads each queued trial, several times a trial.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retry_history(t)}
    taken = sum(uses_budget(t) or outcome(t) is Outcome.waiting or (
        outcome(t) is Outcome.interrupted and t.number not in retried
        and (sweep.max_retry is None or len(retry_history(t)) < sweep.max_retry)) for t in trials)
    queued = sum(outcome(t) is Outcome.waiting for t in trials)
    running = sum(t.state is TrialState.RUNNING for t in trials)
    added = max(0, min(sweep.n_trials - taken, max(QUEUE_MIN, running) - queued))
    for _ in range(added):
        study.enqueue_trial({}, skip_if_exists=False)
    return queued + added
