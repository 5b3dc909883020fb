"""One trial of a sweep: its values, its config, its training run, and what Optuna and MLflow are told.

A retried trial continues its first attempt's folder, so its checkpoints and its MLflow run.
"""

from __future__ import annotations

import logging
import signal
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from omegaconf import DictConfig
from optuna.storages._heartbeat import get_heartbeat_thread  # what Study.optimize runs around a trial
from optuna.trial import TrialState

from tfsweep import checkpoint_artifacts
from tfsweep import study as studies
from tfsweep import sweep_tracking
from tfsweep.crashpoints import crashpoint
from tfsweep.errors import UserError, first_line
from tfsweep.hooks import Hook, TrainingTimer
from tfsweep.study import Outcome
from tfsweep.sweep_config import ParamType, SweepContext, trial_config
from tfsweep.processes import write_atomically
from tfsweep.tracking import RUN_ID_FILE, recorded_run_id, run_params
from tfsweep.tracking_store import experiment_id
from tfsweep.training import train

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"  # trial user attributes, set as soon as the trial's MLflow run exists
RUN_URL_ATTR = "mlflow_run_url"
RESTORED_ATTR = "restored_step"  # a retry that resumed from a checkpoint its run logged on another machine
NOTE_CHUNK = 2045  # optuna-dashboard's longest system attribute of a note

_interrupted = threading.Event()  # Ctrl-C or SIGTERM reached this process


def catch_interrupts() -> dict[int, Any]:
    """Make Ctrl-C and SIGTERM end the sweep (trial retried, results published); return the handlers
    replaced. The request is remembered, because the KeyboardInterrupt raised may land inside a
    library's cleanup and come out as another error (OmegaConf's does)."""
    _interrupted.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _on_interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}


def _on_interrupt(signum: int, frame: Any) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def interrupted() -> bool:
    return _interrupted.is_set()


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` ends the sweep: Ctrl-C, SIGTERM, or any error raised after either."""
    return isinstance(exc, KeyboardInterrupt) or interrupted()


class PruningHook(Hook):
    """Reports each validation evaluation to Optuna and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def after_eval(self, trainer, step, split, metrics):
        if split != "val":
            return
        self.trial.report(metrics[self.metric], step)
        crashpoint("sweep.after_report")
        if step < trainer.steps and self.trial.should_prune():
            self.pruned_at = step
            trainer.request_stop(f"pruned by Optuna at step {step}")


class TrialRunHook(Hook):
    """Links the trial and its MLflow run as soon as the run exists: the run's id and URL as user
    attributes of the trial (the Optuna dashboard shows them), and the trial's searched values that the
    run's params (`tracking.params`) lack, such as config group choices, as params of the run."""

    def __init__(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        self.trial, self.params = trial, params

    def begin(self, trainer):
        import mlflow

        run_id = recorded_run_id(trainer.model_dir)
        if run_id is None:
            return
        cfg = trainer.cfg
        client = mlflow.MlflowClient(cfg.tracking.uri)
        url = run_url(cfg.tracking.uri, experiment_id(client, cfg.tracking.experiment_name), run_id)
        self.trial.set_user_attr(RUN_ID_ATTR, run_id)
        self.trial.set_user_attr(RUN_URL_ATTR, url)
        save_trial_note(self.trial, f"MLflow run [{cfg.tracking.run_name}]({url})")  # a link on its dashboard page
        shown = run_params(cfg)
        missing = [Param(name, str(value)) for name, value in self.params.items() if name not in shown]
        if missing:  # a retry logs the same values again, which MLflow accepts
            client.log_batch(run_id, params=missing)


def save_trial_note(trial: optuna.Trial, body: str) -> None:
    """The trial's first note on the Optuna dashboard, stored as optuna-dashboard's `save_note` stores it.

    Not `save_note` itself: it reads all the study's system attributes (every trial's note among them)
    to find the note's version, and importing optuna_dashboard loads scikit-learn and SciPy (~1 CPU s,
    80 MB) into each worker. A trial's note is written once, so its version is 1.
    """
    storage, study_id, prefix = trial.storage, trial.study._study_id, f"dashboard:{trial._trial_id}"  # noqa: SLF001
    storage.set_study_system_attr(study_id, f"{prefix}:note_ver", 1)
    for i in range(0, len(body), NOTE_CHUNK):
        storage.set_study_system_attr(study_id, f"{prefix}:note_str:{i // NOTE_CHUNK}", body[i:i + NOTE_CHUNK])


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the tracking server itself, or for a database store where `mlflow ui` serves it
    by default (http://127.0.0.1:5000). Never with a user name or password."""
    parts = urllib.parse.urlsplit(tracking_uri)
    base = "http://127.0.0.1:5000"
    if parts.scheme in ("http", "https"):
        port = f":{parts.port}" if parts.port else ""
        base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def restore_first_attempt(ctx: SweepContext, cfg: DictConfig, attempts: list[int]) -> int | None:
    """Continue a retried trial from where its earlier attempts got, on whichever machine they ran.

    Its MLflow run is found by the study and trial-number tags (a killed worker never wrote the run id
    into the trial), and is continued rather than duplicated; its latest logged checkpoint is brought
    into the trial's folder unless the folder holds one as recent. Returns the step restored, if any.
    """
    import mlflow

    model_dir = Path(cfg.trainer.model_dir)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(ctx.experiment)
    if experiment is None:
        return None
    trials = sweep_tracking.runs_filter(ctx.sweep.study_name, "trial")
    for number in reversed(attempts):  # a retry continues the same run and tags it with its own number
        runs = client.search_runs([experiment.experiment_id],
                                  f"{trials} and tags.`{sweep_tracking.NUMBER_TAG}` = '{number}'", max_results=1)
        if runs:
            break
    else:
        return None
    run_id = runs[0].info.run_id
    step = checkpoint_artifacts.restore(client, run_id, model_dir)
    if recorded_run_id(model_dir) != run_id:
        write_atomically(model_dir / RUN_ID_FILE, run_id)  # the training run continues this run
    return step


def suggest(trial: optuna.Trial, name: str, spec) -> Any:
    """The trial's value for one entry of `sweep.params` (a retried trial gets its first attempt's).

    Sampled here, after the trial was asked and outside the study lock, not by
    `study.ask(fixed_distributions=...)`, which would sample under the lock the load test found busiest.
    """
    if spec.type is ParamType.categorical:
        return trial.suggest_categorical(name, spec.choices)
    if spec.type is ParamType.int:
        return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)


def run_trial(ctx: SweepContext, study: optuna.Study, trial: optuna.Trial) -> None:
    """Train one trial and tell Optuna how it ended; a retry continues its first attempt's folder and run."""
    sweep = ctx.sweep
    history = studies.retry_history(trial.storage.get_trial(trial._trial_id))  # noqa: SLF001 - one trial, not the study
    folder = Path(sweep.dir) / "trials" / f"{(history[0] if history else trial.number):04d}"
    timer, pruning = TrainingTimer(), PruningHook(trial, sweep.metric)
    result, reason, cfg = Outcome.failed, None, None
    tags = {sweep_tracking.STUDY_TAG: sweep.study_name, sweep_tracking.ROLE_TAG: "trial",
            sweep_tracking.NUMBER_TAG: str(trial.number)}
    if history:
        tags["optuna.retry_of"] = ",".join(map(str, history))
    try:
        with get_heartbeat_thread(trial._trial_id, study._storage):  # noqa: SLF001 - as Study.optimize does
            params = {name: suggest(trial, name, spec) for name, spec in sweep.params.items()}
            # Short and sortable in the runs table, under a parent named after the study.
            cfg = trial_config(ctx.overrides, params, str(folder), experiment_name=ctx.experiment,
                               run_name=f"trial-{folder.name}")
            if history and cfg.tracking.enabled:
                if (step := restore_first_attempt(ctx, cfg, history)) is not None:
                    trial.set_user_attr(RESTORED_ATTR, step)
            metrics = train(cfg, hooks=[TrialRunHook(trial, params), pruning, timer],
                            parent_run_id=ctx.parent_run_id, run_tags=tags)
        result = Outcome.pruned if pruning.pruned_at is not None else Outcome.complete
    except BaseException as exc:
        if isinstance(exc, Exception) and not is_interrupt(exc):  # failed with its reason; the sweep goes on
            reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"
        else:  # Ctrl-C or SIGTERM: failed without a reason, so it is retried when the sweep runs again
            trial.set_user_attr("training_seconds", round(timer.training_seconds, 3))
            study.tell(trial, state=TrialState.FAIL)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from exc
    finally:
        _clear_keras()
    trial.set_user_attr("training_seconds", round(timer.training_seconds, 3))
    if cfg is not None:
        trial.set_user_attr("trial_dir", cfg.paths.output_dir)
        _tag_child(cfg, trial, result, reason, pruning.pruned_at)
    if result is Outcome.complete:
        study.tell(trial, metrics[sweep.metric])
    elif result is Outcome.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr(studies.FAIL_ATTR, reason[:1000])
        study.tell(trial, state=TrialState.FAIL)
    crashpoint("sweep.after_tell")


def _tag_child(cfg: DictConfig, trial: optuna.Trial, result: Outcome, reason: str | None,
               pruned_at: int | None) -> None:
    """The trial's outcome on its run; a pruned run's name says so, and at which step its metrics stop."""
    run_id = recorded_run_id(cfg.trainer.model_dir) if cfg.tracking.enabled else None
    if run_id is None:
        return
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    try:
        import mlflow

        tags = {sweep_tracking.STATE_TAG: result.value}
        if pruned_at is not None:  # the tracking server renames a run whose name tag is set
            tags[MLFLOW_RUN_NAME] = f"{cfg.tracking.run_name} pruned@{pruned_at}"
        if reason:
            tags["optuna.fail_reason"] = reason[:5000]
        mlflow.MlflowClient(cfg.tracking.uri).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as exc:  # the trial's own outcome matters more than its tag
        log.warning("could not tag MLflow run %s: %s", run_id, first_line(exc))


def _clear_keras() -> None:
    import keras

    keras.backend.clear_session()


def summary_line(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    params = " ".join(f"{k}={short(v)}" for k, v in trial.params.items())
    value = f"{metric}={trial.value:.4f}" if trial.value is not None else ""
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{metric}={trial.intermediate_values[step]:.4f} at step {step}"
    seconds = f"({trial.duration.total_seconds():.1f} s)" if trial.duration else ""
    return " ".join(p for p in (f"trial {trial.number} {studies.outcome(trial).value}", value, params,
                                trial.user_attrs.get(studies.FAIL_ATTR, ""), seconds) if p)


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
