"""MLflow tracking of one training run: context tags, params, data set inputs, metric curves,
checkpoints and the final model (`logged_model`), in a store `tracking_store.connect` opened.

The record is exactly once: a `model_dir` has one MLflow run, a metric point is keyed by
(run, key, step) and a step the run already has is never logged again, the data set is an input of the
run once, and a run has one model. A process killed anywhere and run again completes the same run
instead of adding to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from omegaconf import DictConfig, OmegaConf

from tfsweep import logged_model, runs_view
from tfsweep.checkpoint_artifacts import CheckpointUploader, uploads_while_training
from tfsweep.config import changed_settings, flatten
from tfsweep.crashpoints import crashpoint
from tfsweep.data import METRIC_PREFIXES
from tfsweep.credentials import redact_url
from tfsweep.hooks import Hook
from tfsweep.processes import write_atomically
from tfsweep.tracking_store import experiment_id

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"  # in model_dir: resuming the model_dir continues this MLflow run
RUN_KEY_FILE = "mlflow_run_key"  # in model_dir, written before the run is created, and tagged on it
RUN_KEY_TAG = "tfsweep.model_dir_key"
SEND_EVERY_SECONDS = 5.0  # metric points go out together at most this often, and before each checkpoint and the end
MAX_BATCH = 1000  # metrics per log_batch, MLflow's limit


def recorded_run_id(model_dir: str | Path) -> str | None:
    """The MLflow run that `model_dir` continues, as its run id file names it."""
    path = Path(model_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def redacted_config(cfg: DictConfig) -> DictConfig:
    """`cfg` resolved, with `tracking.uri` as it may be shown and recorded."""
    shown = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    shown.tracking.uri = redact_url(cfg.tracking.uri)
    return shown


def run_params(cfg: DictConfig) -> dict[str, str]:
    """The run's MLflow params: the keys and groups `tracking.params` names, with their resolved values.

    A group stands for each of its keys; its class path `_target_` is left out where the group names
    itself with a `name` (`optimizer.name=adam` says more than `keras.optimizers.Adam`, and is what the
    sweep's search space chooses). A key or group the config lacks is skipped, as is a null value.
    """
    flat = flatten(cfg)

    def named_group_target(key: str) -> bool:
        group, _, leaf = key.rpartition(".")
        return leaf == "_target_" and f"{group}.name" in flat

    return {key: str(value)[:6000] for wanted in cfg.tracking.params for key, value in flat.items()
            if (key == wanted or key.startswith(f"{wanted}.")) and value is not None and not named_group_target(key)}


def varied_params(params: dict[str, str]) -> list[str]:
    """The params the command line changed (`model.dropout=0.4`; `optimizer=sgd` as `optimizer.name`)."""
    keys = [key for setting, _ in changed_settings() for key in (setting, f"{setting}.name")]
    return [key for key in keys if key in params]


def dataset_inputs(cfg: DictConfig, splits) -> list[DatasetInput]:
    """The data set as MLflow dataset inputs: one per split the run uses, named after `data.name`, with
    the split as its context (`train`, `val`, `test`), its size, files and rows in the profile, and a
    digest of the files' checksums and the rows, so that the same split always has the same digest."""
    from mlflow.data.schema import TensorDatasetSchema
    from mlflow.types import Schema, TensorSpec

    data = cfg.data
    schema = TensorDatasetSchema(
        features=Schema([TensorSpec(splits.test_images.dtype, (-1, *splits.test_images.shape[1:]), "images")]),
        targets=Schema([TensorSpec(splits.test_labels.dtype, (-1,), "labels")]))
    n_train = len(splits.train_images)
    rows = {"train": (data.train_images, data.train_labels, 0, n_train),
            "validation": (data.train_images, data.train_labels, n_train, n_train + len(splits.validation_images)),
            "test": (data.test_images, data.test_labels, 0, len(splits.test_images))}
    if not cfg.trainer.evaluate_test:
        del rows["test"]  # a sweep trial never sees the test split
    inputs = []
    for split, (images, labels, start, stop) in rows.items():
        identity = f"{data.name}:{images.sha256}:{labels.sha256}:{start}:{stop}"
        profile = {"num_rows": stop - start, "rows": [start, stop], "files": [images.name, labels.name]}
        dataset = Dataset(name=data.name, digest=hashlib.sha256(identity.encode()).hexdigest()[:8],
                          source_type="local", source=json.dumps({"uri": str(Path(data.root).resolve())}),
                          schema=json.dumps(schema.to_dict()), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, METRIC_PREFIXES[split])]))
    return inputs


class MlflowHook(Hook):
    """Logs one training run to MLflow; a resumed `model_dir` continues the same run."""

    def __init__(self, cfg: DictConfig, client: MlflowClient, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.cfg, self.client = cfg, client
        self.parent_run_id, self.tags = parent_run_id, dict(tags or {})
        self.run_id: str | None = None
        self._logged: set[tuple[str, int]] = set()  # (key, step) points the run already has
        # Metric points go out on this thread, in order, off the training loop, the points of several
        # steps in one request (the tracking server's cost is per request). Not MLflow's own asynchronous
        # queue: ending a run stops that queue's thread, which polls once a second, so every run's end
        # waited up to a second for it.
        self._sender: ThreadPoolExecutor | None = None
        self._sending: list[Future] = []  # batches not yet known to be stored
        self._pending: list[Metric] = []  # points the next batch carries
        self._batch: Future | None = None  # that batch, submitted and waiting for its time
        self._pending_lock, self._hurry, self._last_sent = threading.Lock(), threading.Event(), 0.0
        self._checkpoints: CheckpointUploader | None = None
        self._system_metrics: SystemMetrics | None = None  # CPU and memory samples, while the run trains

    # -- run lifecycle -----------------------------------------------------------------------------
    def _recorded_run_id(self, model_dir: Path, exp_id: str) -> str | None:
        """The run of `model_dir`: the one its run id file names, or the one tagged with its key (a
        process that died between creating the run and writing the file)."""
        if (run_id := recorded_run_id(model_dir)) is not None:
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
        params = run_params(self.cfg)
        if self.parent_run_id is None:  # a sweep shows its searched params itself
            runs_view.save_view(self.client, exp_id, varied_params(params))
        if run_id is None:
            key = uuid.uuid4().hex
            write_atomically(model_dir / RUN_KEY_FILE, key)
            # Not MLflow's generated name: it draws from `random`, which the trainer has just seeded.
            # MLflow's context tags (user, source, git commit), as `mlflow.start_run` would set them.
            run_name = self.cfg.tracking.run_name or Path(self.cfg.paths.output_dir).name
            run_id = self.client.create_run(exp_id, run_name=run_name,
                                            tags=resolve_tags({**tags, RUN_KEY_TAG: key})).info.run_id
            crashpoint("tracking.after_run_created")
            write_atomically(model_dir / RUN_ID_FILE, run_id)
            crashpoint("tracking.after_run_id_written")
            logged_params, has_inputs, new_tags = {}, False, {}  # a new run: its tags are set
        else:
            log.info("continuing MLflow run %s", run_id)
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            run = self.client.get_run(run_id)
            self._logged = {(key, point.step) for key in run.data.metrics
                            for point in self.client.get_metric_history(run_id, key)}
            logged_params, has_inputs = run.data.params, bool(run.inputs and run.inputs.dataset_inputs)
            new_tags = {k: v for k, v in tags.items() if run.data.tags.get(k) != v}
            changed = sorted(k for k in params if k in logged_params and logged_params[k] != params[k])
            if changed:
                log.warning("resuming with changed settings %s: MLflow keeps the first values of params; "
                            "the new ones are in config.yaml", ", ".join(changed))
        self.run_id = run_id
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        if (every := self.cfg.tracking.system_metrics_every) is not None:
            try:  # a resumed run's samples go on after its last one
                first = 1 + max((step for key, step in self._logged if key.startswith(SYSTEM_METRICS)), default=-1)
                self._system_metrics = SystemMetrics(every, first, self._send)
            except ImportError as exc:  # psutil
                log.info("no system metrics: %s", exc)
        self._checkpoints = CheckpointUploader(self.client, run_id, self.cfg.tracking.log_checkpoints
                                               and uploads_while_training(self.cfg.tracking.uri))
        missing = [Param(k, v) for k, v in params.items() if k not in logged_params]
        if missing or new_tags:
            self.client.log_batch(run_id, params=missing, tags=[RunTag(k, str(v)) for k, v in new_tags.items()])
        if not has_inputs and trainer.splits is not None:  # None: a stand-in trainer without data
            inputs = dataset_inputs(self.cfg, trainer.splits)
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except mlflow.exceptions.MlflowException:
                # Workers started together: another run stored the data set between the SQL store's lookup
                # and its insert. The call is idempotent, so the second one links the stored data set.
                self.client.log_inputs(run_id, datasets=inputs)
        shown = redacted_config(self.cfg)
        self.client.log_text(run_id, OmegaConf.to_yaml(shown), "config.yaml")
        log.info("MLflow run %s in experiment %r at %s", run_id, self.cfg.tracking.experiment_name,
                 shown.tracking.uri)

    def _log(self, step: int, values: dict[str, float]) -> None:
        """Queue the points the run does not have yet; they are sent off the training loop."""
        new = {key: value for key, value in values.items() if (key, step) not in self._logged}
        if new:
            self._sending.append(self._send(step, new))
            self._logged.update((key, step) for key in new)

    def _send(self, step: int, values: dict[str, float]) -> Future:
        """Add points at `step` to the next batch and return that batch; the system metrics' sampler sends
        straight here, outside the training points' bookkeeping."""
        now = int(time.time() * 1000)
        with self._pending_lock:
            self._pending.extend(Metric(key, float(value), now, step) for key, value in values.items())
            if self._batch is None:
                self._batch = self._sender.submit(self._send_pending)
            return self._batch

    def _send_pending(self) -> None:
        """On the sender thread: wait until SEND_EVERY_SECONDS after the last batch (or a hurry), then
        send every pending point."""
        self._hurry.wait(self._last_sent + SEND_EVERY_SECONDS - time.monotonic())
        with self._pending_lock:
            metrics, self._pending, self._batch = self._pending, [], None
        for start in range(0, len(metrics), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_BATCH])
        self._last_sent = time.monotonic()

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
        """Send the pending points now and wait until every batch is stored."""
        self._hurry.set()
        try:
            with self._pending_lock:
                last = self._batch  # may carry only the system metrics' points
            for operation in [*self._sending, *([last] if last else [])]:
                operation.result()  # raises what the batch raised
        finally:
            self._hurry.clear()
        self._sending = []

    def end(self, trainer, error):
        if self.run_id is None:
            return
        crashpoint("tracking.before_flush")
        if self._system_metrics is not None:
            self._system_metrics.stop()
        try:
            self._wait_for_queue()
        finally:
            self._sender.shutdown()  # after the system metrics' last batch
        if error is None:
            if self.cfg.tracking.log_checkpoints:
                self._checkpoints.finish(trainer.model_dir, trainer.manager.checkpoints)
            if self.cfg.tracking.log_curves:
                log_curves(self.client, self.run_id)
            if self.cfg.tracking.log_model:
                logged_model.log_model(self.cfg.tracking.uri, self.run_id, trainer)
            if trainer.stop_reason:
                self.client.set_tag(self.run_id, "stopped_early", trainer.stop_reason)
            crashpoint("tracking.before_terminated")
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            self._checkpoints.close()  # the last checkpoint a retry may start from
            status = RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
            self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(self.run_id, RunStatus.to_string(status))


SYSTEM_METRICS = "system/"  # the prefix MLflow's "System metrics" tab shows


class SystemMetrics:
    """CPU and memory use, sampled every `every` seconds on a thread and sent with `send(step, metrics)`,
    under the names MLflow's own monitor uses.

    Not MLflow's SystemMetricsMonitor: it opens a client of its own from the URI (a password in it goes
    into its warnings), asks the server for the run at every sample, and its finish waits out its retries.
    """

    def __init__(self, every: float, first_step: int, send) -> None:
        import psutil

        self._psutil, self._stop = psutil, threading.Event()
        psutil.cpu_percent()  # the first call only sets the baseline the next one measures from
        self._thread = threading.Thread(target=self._sample, args=(every, first_step, send),
                                        name="system-metrics", daemon=True)
        self._thread.start()

    def _sample(self, every: float, step: int, send) -> None:
        while not self._stop.wait(every):
            memory = self._psutil.virtual_memory()
            send(step, {f"{SYSTEM_METRICS}cpu_utilization_percentage": self._psutil.cpu_percent(),
                        f"{SYSTEM_METRICS}system_memory_usage_megabytes": memory.used / 1e6,
                        f"{SYSTEM_METRICS}system_memory_usage_percentage": memory.percent})
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


CURVES = ("loss", "accuracy")  # each a chart of its train/ and val/ curves


def log_curves(client: MlflowClient, run_id: str) -> None:
    """curves.png: the train and validation curve of each metric on one chart (MLflow's own charts show
    one metric each)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    for axes, name in zip(figure.subplots(1, len(CURVES)), CURVES):
        for split in ("train", "validation"):
            key = f"{METRIC_PREFIXES[split]}/{name}"
            points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if points:
                axes.plot(*zip(*points), label=key, marker="o" if split == "validation" else None, markersize=3)
        axes.set(title=name, xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
    client.log_figure(run_id, figure, "curves.png")
