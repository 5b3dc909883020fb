"""The Optuna side of a sweep: storage, sampler, pruner, and the bookkeeping that lets several workers
share one study and resume it after a crash without redoing or losing trials.

Budget rule: a study wants `n_trials` trials that count. A trial counts once it is running, complete,
pruned, or failed for a reason of its own (NaN loss, an exception). A trial whose worker died (kill -9,
Ctrl-C, a lost machine) does not count; it is failed and queued again with the same parameters by
Optuna's retry callback, and the retry continues from the dead trial's checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from tfsweep.errors import ConfigError, UserError

log = logging.getLogger(__name__)

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PRUNERS = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
           "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
WORKER_ATTR = "worker"  # "host:pid" of the process running the trial
CLAIM_ATTR = "claimed_trial"  # the trial number the worker attribute belongs to (retries copy user attrs)
FAIL_ATTR = "fail_reason"  # set when a trial failed by itself; such a trial counts and is not retried
SURPLUS_ATTR = "surplus"  # set on a trial started after the budget was met by other workers


class StorageError(UserError):
    """The Optuna storage cannot be opened."""


def _build(kind: str, registry: dict[str, Any], spec: dict[str, Any], **extra: Any) -> Any:
    name = spec["name"]
    if name not in registry:
        raise ConfigError(f"sweep.{kind}.name={name!r} is unknown: choose one of {', '.join(registry)}")
    settings = dict(spec["settings"].get(name) or {})
    try:
        return registry[name](**settings, **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sweep.{kind}.settings.{name} is invalid for {registry[name].__name__}: {exc}") from exc


def build_sampler(sweep: dict[str, Any], seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if sweep["seed"] is None else sweep["seed"] + seed_offset
    return _build("sampler", SAMPLERS, sweep["sampler"], seed=seed)


def build_pruner(sweep: dict[str, Any]) -> optuna.pruners.BasePruner:
    return _build("pruner", PRUNERS, sweep["pruner"])


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the earlier attempts this trial retries, oldest first ([] for a first attempt)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def retry_callback(sweep: dict[str, Any]) -> RetryHeartbeatStaleTrialCallback:
    # The retry resumes from the dead trial's checkpoints, so it keeps the steps already reported.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=sweep["max_retry"], inherit_intermediate_values=True)


def open_storage(sweep: dict[str, Any]) -> optuna.storages.BaseStorage:
    """A journal file (the default: safe for several processes on one machine) or a database URL."""
    target = str(sweep["storage"])
    try:
        if "://" in target:
            engine_kwargs = {"connect_args": {"connect_timeout": 10}} if target.startswith("postgresql") else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat is
                return optuna.storages.RDBStorage(
                    target, engine_kwargs=engine_kwargs, heartbeat_interval=sweep["heartbeat_seconds"],
                    grace_period=2 * sweep["heartbeat_seconds"], heartbeat_stale_trial_callback=retry_callback(sweep))
        path = Path(target).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    except Exception as exc:  # SQLAlchemy, psycopg2 and OS errors all mean the same thing here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"sweep.storage={redacted(target)!r} cannot be opened ({reason[:200]}); start the "
                           "database, fix the URL, or use a journal file path") from exc


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        if ":" in credentials:
            return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def load_study(sweep: dict[str, Any], storage, sampler=None, pruner=None) -> optuna.Study:
    return optuna.create_study(storage=storage, study_name=sweep["study_name"], direction=sweep["direction"],
                               sampler=sampler, pruner=pruner, load_if_exists=True)


# -- the budget ------------------------------------------------------------------------------------
def counts(trial: FrozenTrial) -> bool:
    """Whether the trial uses up one of the study's `n_trials`."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and FAIL_ATTR in trial.user_attrs and SURPLUS_ATTR not in trial.user_attrs


def counted_trials(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def claim(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Mark `trial` as this process's; False when it is surplus (budget already met, or a duplicate retry).

    Trial numbers are handed out in order by the storage, so every worker sees the same trials ahead of
    its own and they agree, without a lock, on which trials fit into the budget.
    """
    trial.set_user_attr(WORKER_ATTR, worker_id())
    trial.set_user_attr(CLAIM_ATTR, trial.number)
    trials = study.get_trials(deepcopy=False)
    ahead = [t for t in trials if t.number < trial.number]
    mine = next(t for t in trials if t.number == trial.number)
    history = retry_history(mine)
    duplicate = bool(history) and any(retry_history(t)[-1:] == history[-1:]
                                      for t in ahead)
    if duplicate or sum(counts(t) for t in ahead) >= n_trials:
        trial.set_user_attr(SURPLUS_ATTR, True)
        return False
    return True


# -- dead workers ----------------------------------------------------------------------------------
def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _died_here(trial: FrozenTrial) -> bool:
    """A running trial claimed by a process of this machine that no longer exists."""
    if trial.user_attrs.get(CLAIM_ATTR) != trial.number:
        return False
    host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))


def recover_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage, sweep: dict[str, Any]) -> None:
    """Fail the trials of dead workers on this machine and queue every interrupted trial again once.

    The journal storage has no heartbeat, so a trial left RUNNING by a killed process is found by its
    recorded host and pid; a database storage's heartbeat also catches workers on other machines.
    """
    retry = retry_callback(sweep)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING and _died_here(trial):
            # FrozenTrial has no public id; Optuna's own fail_stale_trials uses the same one.
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            log.warning("trial %d was interrupted (worker %s is gone); it will be retried", trial.number,
                        trial.user_attrs[WORKER_ATTR])
    trials = study.get_trials(deepcopy=True)
    retried = {n for t in trials for n in retry_history(t)}
    for trial in trials:
        interrupted = (trial.state == TrialState.FAIL and FAIL_ATTR not in trial.user_attrs
                       and SURPLUS_ATTR not in trial.user_attrs)
        if interrupted and trial.number not in retried:
            retry(study, trial)  # does nothing once the trial has used up sweep.max_retry
