"""The MLflow tracking store: a client checked to answer and to accept writes, and experiments by name.

Training runs, the sweep's parent run, its checks and the load test all open the store through `connect`,
so an unreachable or read-only store fails the same way, in one sentence, before anything is logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient

from tfsweep.credentials import redact_url
from tfsweep.errors import TrackingError, first_line
from tfsweep.processes import file_lock

log = logging.getLogger(__name__)

# Errors of several processes creating a fresh store's tables at once (MLflow does it on first use):
# SQLite and PostgreSQL wording, and MLflow's own schema check meeting a half-migrated database.
CREATION_RACE = ("already exists", "duplicate key", "unique constraint failed", "database is locked",
                 "out-of-date database schema", "no such table")
CREATION_ATTEMPTS = 8


@contextmanager
def _fail_fast() -> Iterator[None]:
    """Make an unreachable HTTP store fail in seconds rather than after minutes of retries.

    Only these two variables are set and put back: `patch.dict` restores by clearing and refilling
    os.environ, while the threads of an earlier run (metric batches) may be reading it."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _creating_sqlite_store(uri: str) -> Iterator[None]:
    """Serialize first use of a SQLite store among this project's processes: MLflow creates its tables
    then (a store created by another program, such as `mlflow ui`, is covered by the retry in `connect`)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///")).expanduser().with_suffix(".lock")
    if not lock_path.parent.is_dir():
        yield  # MLflow reports the missing folder in its own words
        return
    with file_lock(lock_path):
        yield


def connect(uri: str) -> MlflowClient:
    """A client for `uri`, checked to answer and to accept writes; raise TrackingError naming it otherwise.

    Several processes meeting a fresh database collide while MLflow creates its tables; that race is
    retried (the tables exist a moment later), never reported as an unreachable store.
    """
    shown = redact_url(uri)
    for attempt in itertools.count(1):
        problem = "cannot be reached"
        try:
            with _fail_fast(), _creating_sqlite_store(uri):
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
                problem = "cannot be written"
                _probe_write(uri)
            return client
        except Exception as exc:  # MLflow raises many types here (MlflowException, OSError, SQLAlchemy errors)
            if _is_creation_race(exc) and attempt < CREATION_ATTEMPTS:
                log.info("tracking store %s is being created by another process; retrying", shown)
                time.sleep(0.25 * 2 ** attempt)  # backoff while the other process finishes its tables
                continue
            reason = first_line(exc).replace(uri, shown)
            if problem == "cannot be written":
                target = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else "the database"
                fix = f"make {target} writable, or set tracking.uri to a store you can write"
            else:
                fix = "start the MLflow server, fix the URI, or unset MLFLOW_TRACKING_URI to use ./mlflow.db"
            raise TrackingError(f"tracking.uri={shown!r} {problem} ({reason}); {fix}") from exc


def _is_creation_race(exc: BaseException | None) -> bool:
    while exc is not None:
        if any(sign in str(exc).lower() for sign in CREATION_RACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _probe_write(uri: str) -> None:
    """Raise now, before a run exists, if a database store only reads (a read-only mlflow.db)."""
    from sqlalchemy import create_engine

    if uri.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql", "mysql", "mssql"):
        return  # an HTTP server or a file store reports its own errors
    engine = create_engine(uri)
    try:
        with engine.connect() as connection, connection.begin() as transaction:
            connection.exec_driver_sql("DELETE FROM experiments WHERE 1 = 0")  # needs write access, changes nothing
            transaction.rollback()
    finally:
        engine.dispose()


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created if need be; remembered per store, as each trial asks for it."""
    key = (client.tracking_uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = _find_or_create_experiment(client, name)
    return _experiment_ids[key]


_experiment_ids: dict[tuple[str, str], str] = {}


def _find_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:
        if (experiment := client.get_experiment_by_name(name)) is None:
            raise
        return experiment.experiment_id  # workers started together: another one created it first

