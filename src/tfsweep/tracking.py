"""MLflow tracking of one training run: params, metric curves, checkpoints and the final model."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest.mock import patch

import mlflow
from keras import __version__ as keras_version
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from omegaconf import DictConfig, OmegaConf
from tensorflow import __version__ as tf_version

from tfsweep.config import flatten
from tfsweep.errors import TrackingError
from tfsweep.hooks import Hook

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # in model_dir: resuming the model_dir continues this MLflow run
MLFLOW_BATCH_LIMITS = {"params": 100, "tags": 100, "metrics": 1000}  # per log_batch request


def _fail_fast():
    """Make an unreachable HTTP store fail in seconds rather than after minutes of retries."""
    return patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})


@contextmanager
def _creating_sqlite_store(uri: str) -> Iterator[None]:
    """Serialize first use of a SQLite store: MLflow creates its tables then, and two processes doing
    it at once collide (sweep workers, or two training runs started together)."""
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
    """A client for `uri`, checked to answer; raise TrackingError naming the URI otherwise."""
    try:
        with _fail_fast(), _creating_sqlite_store(uri):
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many types here (MlflowException, OSError, SQLAlchemy errors)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"tracking.uri={uri!r} cannot be reached ({reason[:200]}); start the MLflow "
                            "server, fix the URI, or unset MLFLOW_TRACKING_URI to use ./mlflow.db") from exc
    return client


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MlflowHook(Hook):
    """Logs one training run to MLflow; a resumed `model_dir` continues the same run."""

    def __init__(self, cfg: DictConfig, client: MlflowClient, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.cfg, self.client = cfg, client
        self.parent_run_id, self.tags = parent_run_id, dict(tags or {})
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        self._logs_since_flush = 0

    # -- run lifecycle -----------------------------------------------------------------------------
    def _existing_run_id(self, model_dir: Path) -> str | None:
        path = model_dir / RUN_ID_FILE
        if not path.exists():
            return None
        run_id = path.read_text().strip()
        try:
            self.client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("model_dir names MLflow run %s, which this tracking store does not have; "
                        "starting a new run", run_id)
            return None
        return run_id

    def begin(self, trainer):
        model_dir = Path(self.cfg.trainer.model_dir)
        run_id = self._existing_run_id(model_dir)
        tags = {**self.tags, "model_dir": str(model_dir.resolve())}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if run_id is None:
            exp_id = experiment_id(self.client, self.cfg.tracking.experiment_name)
            # Not MLflow's generated name: it draws from `random`, which the trainer has just seeded.
            run_name = self.cfg.tracking.run_name or Path(self.cfg.paths.output_dir).name
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
            model_dir.mkdir(parents=True, exist_ok=True)
            (model_dir / RUN_ID_FILE).write_text(run_id)
            logged_params: dict[str, str] = {}
        else:
            log.info("continuing MLflow run %s", run_id)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            logged_params = self.client.get_run(run_id).data.params
        self.run_id = run_id
        params = {k: str(v)[:6000] for k, v in flatten(self.cfg).items()}
        changed = sorted(k for k in params if k in logged_params and logged_params[k] != params[k])
        if changed:
            log.warning("resuming with changed settings %s: MLflow keeps the first values of params; "
                        "the new ones are in config.yaml", ", ".join(changed))
        new_params = [Param(k, v) for k, v in params.items() if k not in logged_params]
        for chunk in _chunks(new_params, MLFLOW_BATCH_LIMITS["params"]):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, str(v)) for k, v in tags.items()], MLFLOW_BATCH_LIMITS["tags"]):
            self.client.log_batch(run_id, tags=chunk)
        self.client.log_text(run_id, OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
        log.info("MLflow run %s in experiment %r at %s", run_id, self.cfg.tracking.experiment_name,
                 self.cfg.tracking.uri)

    def _add(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(Metric(key, float(value), now, step) for key, value in values.items())

    def flush(self, synchronous: bool = False) -> None:
        """Send buffered metrics in batches; asynchronously by default, off the training loop."""
        for chunk in _chunks(self._pending, MLFLOW_BATCH_LIMITS["metrics"]):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=synchronous)
        self._pending, self._logs_since_flush = [], 0

    def after_log(self, trainer, step, logs):
        self._add(step, logs)
        self._logs_since_flush += 1
        if self._logs_since_flush >= self.cfg.tracking.flush_every:
            self.flush()

    def after_eval(self, trainer, step, split, metrics):
        self._add(step, metrics)
        self.flush()

    def end(self, trainer, error):
        if self.run_id is None:
            return
        self.flush(synchronous=True)
        mlflow.flush_async_logging()
        if error is None:
            if self.cfg.tracking.log_checkpoints:
                self.client.log_artifacts(self.run_id, str(trainer.model_dir), "checkpoints")
            if self.cfg.tracking.log_model:
                log_model(self.cfg.tracking.uri, self.run_id, trainer)
            status = RunStatus.FINISHED
            if trainer.stop_reason:
                self.client.set_tag(self.run_id, "stopped_early", trainer.stop_reason)
        else:
            status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(self.run_id, RunStatus.to_string(status))


def log_model(uri: str, run_id: str, trainer) -> None:
    """Log the trained network as an MLflow pyfunc model that maps 28x28 images to digit classes."""
    sample = trainer.splits.test_images[:5].astype("float32") / 255.0
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow suggests type hints on predict(); NumPy arrays in and out need none.
        warnings.filterwarnings("ignore", message=".*Add type hints", category=UserWarning)
        network_path = Path(tmp) / "network.keras"
        trainer.network.save(network_path)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"network": str(network_path)},
                input_example=sample,
                pip_requirements=[f"tensorflow-cpu=={tf_version}", f"keras=={keras_version}",
                                  f"mlflow=={mlflow.__version__}"],
            )
