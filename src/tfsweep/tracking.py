"""MLflow tracking of one training run: params, metric curves, checkpoints and the final model.

The record is exactly once: a `model_dir` has one MLflow run, a metric point is keyed by
(run, key, step) and a step the run already has is never logged again, and a run has one model. A
process killed anywhere and run again completes the same run instead of adding to it.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest.mock import patch

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric, Param, RunStatus, RunTag
from omegaconf import DictConfig, OmegaConf

from tfsweep.checkpoint_artifacts import CheckpointUploader, uploads_while_training
from tfsweep.config import flatten
from tfsweep.crashpoints import crashpoint
from tfsweep.credentials import redact_url
from tfsweep.errors import TrackingError, first_line
from tfsweep.hooks import Hook

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # in model_dir: resuming the model_dir continues this MLflow run
RUN_KEY_FILE = "mlflow_run_key"  # in model_dir, written before the run is created, and tagged on it
RUN_KEY_TAG = "tfsweep.model_dir_key"
MODEL_NAME = "model"
# Errors of several processes creating a fresh store's tables at once (MLflow does it on first use):
# SQLite and PostgreSQL wording, and MLflow's own schema check meeting a half-migrated database.
CREATION_RACE = ("already exists", "duplicate key", "unique constraint failed", "database is locked",
                 "out-of-date database schema", "no such table")
CREATION_ATTEMPTS = 8


def _fail_fast():
    """Make an unreachable HTTP store fail in seconds rather than after minutes of retries."""
    return patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})


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
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def redacted_config(cfg: DictConfig) -> DictConfig:
    """`cfg` resolved, with `tracking.uri` as it may be shown and recorded."""
    shown = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    shown.tracking.uri = redact_url(cfg.tracking.uri)
    return shown


class MlflowHook(Hook):
    """Logs one training run to MLflow; a resumed `model_dir` continues the same run."""

    def __init__(self, cfg: DictConfig, client: MlflowClient, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.cfg, self.client = cfg, client
        self.parent_run_id, self.tags = parent_run_id, dict(tags or {})
        self.run_id: str | None = None
        self._logged: set[tuple[str, int]] = set()  # (key, step) points the run already has
        self._sending: list = []  # MLflow's futures for batches still in its asynchronous queue
        self._checkpoints: CheckpointUploader | None = None

    # -- run lifecycle -----------------------------------------------------------------------------
    def _recorded_run_id(self, model_dir: Path, exp_id: str) -> str | None:
        """The run of `model_dir`: the one its run id file names, or the one tagged with its key (a
        process that died between creating the run and writing the file)."""
        path = model_dir / RUN_ID_FILE
        if path.exists():
            run_id = path.read_text().strip()
            try:
                self.client.get_run(run_id)
                return run_id
            except mlflow.exceptions.MlflowException:
                log.warning("model_dir names MLflow run %s, which this tracking store does not have; "
                            "starting a new run", run_id)
                return None
        key_path = model_dir / RUN_KEY_FILE
        if not key_path.exists():
            return None
        runs = self.client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{key_path.read_text().strip()}'")
        return runs[0].info.run_id if runs else None

    def begin(self, trainer):
        model_dir = Path(self.cfg.trainer.model_dir)
        exp_id = experiment_id(self.client, self.cfg.tracking.experiment_name)
        run_id = self._recorded_run_id(model_dir, exp_id)
        tags = {**self.tags, "model_dir": str(model_dir.resolve())}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if run_id is None:
            model_dir.mkdir(parents=True, exist_ok=True)
            key = uuid.uuid4().hex
            _write_atomically(model_dir / RUN_KEY_FILE, key)
            # Not MLflow's generated name: it draws from `random`, which the trainer has just seeded.
            run_name = self.cfg.tracking.run_name or Path(self.cfg.paths.output_dir).name
            run_id = self.client.create_run(exp_id, run_name=run_name, tags={**tags, RUN_KEY_TAG: key}).info.run_id
            crashpoint("tracking.after_run_created")
            _write_atomically(model_dir / RUN_ID_FILE, run_id)
            crashpoint("tracking.after_run_id_written")
        else:
            log.info("continuing MLflow run %s", run_id)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id
        self._checkpoints = CheckpointUploader(self.client, run_id, self.cfg.tracking.log_checkpoints
                                               and uploads_while_training(self.cfg.tracking.uri))
        run = self.client.get_run(run_id)
        self._logged = {(key, point.step) for key in run.data.metrics
                        for point in self.client.get_metric_history(run_id, key)}
        shown = redacted_config(self.cfg)
        params = {k: str(v)[:6000] for k, v in flatten(shown).items()}
        logged_params = run.data.params
        changed = sorted(k for k in params if k in logged_params and logged_params[k] != params[k])
        if changed:
            log.warning("resuming with changed settings %s: MLflow keeps the first values of params; "
                        "the new ones are in config.yaml", ", ".join(changed))
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in logged_params],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.log_text(run_id, OmegaConf.to_yaml(shown), "config.yaml")
        log.info("MLflow run %s in experiment %r at %s", run_id, self.cfg.tracking.experiment_name,
                 shown.tracking.uri)

    def _log(self, step: int, values: dict[str, float]) -> None:
        """Queue the points the run does not have yet; MLflow sends them off the training loop."""
        now = int(time.time() * 1000)
        new = [Metric(key, float(value), now, step) for key, value in values.items()
               if (key, step) not in self._logged]
        if new:
            self._sending.append(self.client.log_batch(self.run_id, metrics=new, synchronous=False))
            self._logged.update((metric.key, step) for metric in new)

    def after_log(self, trainer, step, logs):
        self._log(step, logs)

    def after_eval(self, trainer, step, split, metrics):
        self._log(step, metrics)

    def before_checkpoint(self, trainer, step):
        # The points up to a checkpoint are stored before it exists: a resumed run recomputes only
        # the steps after it, so points still queued at a kill would otherwise be lost for good.
        self._wait_for_queue()
        self._checkpoints.wait()  # the manager deletes an old checkpoint while it saves

    def after_checkpoint(self, trainer, step, path):
        self._checkpoints.saved(trainer.model_dir, path)

    def _wait_for_queue(self) -> None:
        for operation in self._sending:
            operation.wait()
        self._sending = []

    def end(self, trainer, error):
        if self.run_id is None:
            return
        crashpoint("tracking.before_flush")
        self._wait_for_queue()
        if error is None:
            if self.cfg.tracking.log_checkpoints:
                self._checkpoints.finish(trainer.model_dir, trainer.manager.checkpoints)
            if self.cfg.tracking.log_model:
                log_model(self.cfg.tracking.uri, self.run_id, trainer)
            if trainer.stop_reason:
                self.client.set_tag(self.run_id, "stopped_early", trainer.stop_reason)
            crashpoint("tracking.before_terminated")
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            self._checkpoints.close()  # the last checkpoint a retry may start from
            status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def log_model(uri: str, run_id: str, trainer) -> None:
    """Log the trained network as an MLflow pyfunc model that maps 28x28 images to digit classes.

    Once per run: a run that has a model keeps it, and a model left unfinished by a killed process is
    replaced.
    """
    from keras import __version__ as keras_version
    from tensorflow import __version__ as tf_version

    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    if any(model.status == LoggedModelStatus.READY for model in models):
        log.info("MLflow run %s already has its model", run_id)
        return
    for model in models:
        client.delete_logged_model(model.model_id)
    sample = trainer.splits.test_images[:5].astype("float32") / 255.0
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests type hints on predict(); NumPy arrays in and out need none.
        warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)
        network_path = Path(tmp) / "network.keras"
        trainer.network.save(network_path)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            pending = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run_id)
            crashpoint("tracking.during_model_upload")
            mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                model_id=pending.model_id,
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"network": str(network_path)},
                input_example=sample,
                pip_requirements=[f"tensorflow-cpu=={tf_version}", f"keras=={keras_version}",
                                  f"mlflow=={mlflow.__version__}"],
            )
