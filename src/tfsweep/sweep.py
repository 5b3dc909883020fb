"""`run_sweep(cfg)`: an Optuna study over the training config, one `train()` call per trial.

The story of a sweep command:
1. `check` the sweep config (typed `SweepConfig`) and the search space; open the storage and the
   study's MLflow parent run; everything a worker needs goes into one `SweepContext`.
2. Each worker (`n_workers` processes) loops: under the study's lock it recovers trials of dead
   workers, stops when the budget is met, asks Optuna for a trial and records itself as its owner;
   then it trains the trial (`run_trial`) and tells Optuna the result.
3. The worker that finds every trial of the budget finished publishes the results (`publish_results`):
   the best trial's config, its test accuracy, and the parent run's metrics, tags and plots. Others
   just stop. A rerun of a finished, published study says so in one line and logs nothing.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf
from optuna.storages._heartbeat import get_heartbeat_thread  # what Study.optimize runs around a trial
from optuna.trial import TrialState
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tfsweep import study as studies
from tfsweep import sweep_tracking
from tfsweep.config import CONFIG_DIR, flatten
from tfsweep.credentials import redact_url
from tfsweep.crashpoints import crashpoint
from tfsweep.errors import UserError, first_line
from tfsweep.hooks import Hook, TrainingTimer
from tfsweep.study import Outcome
from tfsweep.sweep_config import ParamType, SweepConfig, check, command_overrides, trial_config
from tfsweep.training import evaluate_checkpoint, train

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("tfsweep.hooks", "tfsweep.trainer", "tfsweep.tracking", "absl")  # per-step lines; MLflow has them
BEST_CONFIG = "best_trial.yaml"


@dataclass
class SweepContext:
    """Everything a worker needs, picklable for the spawned worker processes."""

    sweep: SweepConfig
    overrides: list[str]  # the command line; a trial's config is composed from it plus the trial's values
    experiment: str  # MLflow experiment of the parent and its children
    tracking_uri: str | None  # None when tracking is off
    parent_run_id: str | None = None

    def client(self):
        from tfsweep.tracking import connect

        return None if self.tracking_uri is None else connect(self.tracking_uri)


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


class TrialParamsHook(Hook):
    """Logs the trial's params that the training config does not show (config group choices)."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def begin(self, trainer):
        import mlflow

        run_id = sweep_tracking.child_run_id(trainer.model_dir)
        if run_id is None:
            return
        client = mlflow.MlflowClient(trainer.cfg.tracking.uri)
        shown = flatten(trainer.cfg)
        logged = client.get_run(run_id).data.params
        for name, value in self.params.items():
            if name not in shown and name not in logged:
                client.log_param(run_id, name, str(value))


def suggest(trial: optuna.Trial, name: str, spec) -> Any:
    """The trial's value for one entry of `sweep.params` (a retried trial gets its first attempt's)."""
    if spec.type is ParamType.categorical:
        return trial.suggest_categorical(name, spec.choices)
    if spec.type is ParamType.int:
        return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
    return trial.suggest_float(name, spec.low, spec.high, log=spec.log, step=spec.step)


# -- one trial -------------------------------------------------------------------------------------
def run_trial(ctx: SweepContext, study: optuna.Study, trial: optuna.Trial) -> None:
    """Train one trial and tell Optuna how it ended; a retry continues its first attempt's folder and run."""
    sweep = ctx.sweep
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    history = studies.retry_history(frozen)
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
            cfg = trial_config(ctx.overrides, params, str(folder), experiment_name=ctx.experiment,
                               run_name=f"{sweep.study_name}-trial-{folder.name}")
            metrics = train(cfg, hooks=[TrialParamsHook(params), pruning, timer],
                            parent_run_id=ctx.parent_run_id, run_tags=tags)
        result = Outcome.pruned if pruning.pruned_at is not None else Outcome.complete
    except Exception as exc:  # a trial that raises is failed with its reason, and the sweep goes on
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {first_line(exc)}"
    except BaseException:  # Ctrl-C: failed without a reason, so it is retried when the sweep runs again
        trial.set_user_attr("training_seconds", round(timer.training_seconds, 3))
        study.tell(trial, state=TrialState.FAIL)
        raise
    finally:
        _clear_keras()
    trial.set_user_attr("training_seconds", round(timer.training_seconds, 3))
    if cfg is not None:
        trial.set_user_attr("trial_dir", cfg.paths.output_dir)
        _tag_child(cfg, trial, result, reason)
    if result is Outcome.complete:
        study.tell(trial, metrics[sweep.metric])
    elif result is Outcome.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        trial.set_user_attr(studies.FAIL_ATTR, reason[:1000])
        study.tell(trial, state=TrialState.FAIL)
    crashpoint("sweep.after_tell")


def _tag_child(cfg: DictConfig, trial: optuna.Trial, result: Outcome, reason: str | None) -> None:
    run_id = sweep_tracking.child_run_id(cfg.trainer.model_dir) if cfg.tracking.enabled else None
    if run_id is None:
        return
    trial.set_user_attr("mlflow_run_id", run_id)
    try:
        import mlflow

        client = mlflow.MlflowClient(cfg.tracking.uri)
        client.set_tag(run_id, sweep_tracking.STATE_TAG, result.value)
        if reason:
            client.set_tag(run_id, "optuna.fail_reason", reason[:5000])
    except Exception as exc:  # the trial's own outcome matters more than its tag
        log.warning("could not tag MLflow run %s: %s", run_id, first_line(exc))


def _clear_keras() -> None:
    import keras

    keras.backend.clear_session()


def _summary(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    value = f"{metric}={trial.value:.4f}" if trial.value is not None else ""
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{metric}={trial.intermediate_values[step]:.4f} at step {step}"
    seconds = f"({trial.duration.total_seconds():.1f} s)" if trial.duration else ""
    return " ".join(p for p in (f"trial {trial.number} {studies.outcome(trial).value}", value, params,
                                trial.user_attrs.get(studies.FAIL_ATTR, ""), seconds) if p)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- one worker ------------------------------------------------------------------------------------
def work(ctx: SweepContext, worker_index: int, show_progress: bool) -> None:
    """One worker: run trials until the study's budget is met (or this command's timeout)."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    # Our one line per trial, with the failure reason, replaces Optuna's lines and tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        _run_trials(ctx, show_progress)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run_trials(ctx: SweepContext, show_progress: bool) -> None:
    sweep, started = ctx.sweep, time.monotonic()
    study = studies.load_study(sweep, studies.open_storage(sweep))
    with tqdm(total=sweep.n_trials, initial=studies.finished_trials(study), unit="trial", desc=sweep.study_name, dynamic_ncols=True,
              disable=None if show_progress else True) as bar, logging_redirect_tqdm():
        # study.optimize is not used: its n_trials is per process and MaxTrialsCallback can overshoot by
        # n_workers-1, while the budget here is exact and a trial must be created and claimed under one lock.
        while sweep.timeout is None or time.monotonic() - started < sweep.timeout:
            with studies.study_lock(sweep):
                studies.recover(study, sweep)
                position = studies.counted_trials(study)
                if position >= sweep.n_trials:
                    return
                studies.use_sampler(study, sweep, position)
                trial = studies.ask(study)
                crashpoint("sweep.after_trial_created")
                studies.claim(study, trial)
                crashpoint("sweep.after_owner_recorded")
            run_trial(ctx, study, trial)
            log.info("%s", _summary(study.trials[trial.number], sweep.metric))
            bar.update(studies.finished_trials(study) - bar.n)


def _helper_worker(ctx: SweepContext, worker_index: int) -> None:
    """Entry of an extra worker process (spawned: TensorFlow does not survive a fork)."""
    logging.basicConfig(level=logging.INFO, format=f"[worker {worker_index}] %(message)s")
    work(ctx, worker_index, show_progress=False)


# -- the command -----------------------------------------------------------------------------------
def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) the study `cfg.sweep` describes; return its outcome.

    Everything is checked (search space, sampler, pruner, storage, MLflow) before the first trial; a
    problem raises a UserError and leaves an existing study as it was. Returns `wall_seconds` (this
    call), the study's `n_complete`, `n_pruned`, `n_failed`, `n_interrupted`, `best_value`,
    `best_params`, `best_trial`, `best_test_accuracy` and `best_config` (the yaml `src/train.py` takes;
    both None until the study is finished), `trials` (number, state, value, params, seconds,
    training_seconds), `mean_overhead_seconds` (a trial's seconds outside training steps, averaged over
    the trials that ran) and `published` (whether this command published the finished study's results).
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "Using an existing study" and the like
    sweep = check(cfg)
    storage = studies.open_storage(sweep)
    ctx = SweepContext(sweep, command_overrides(cfg), cfg.tracking.experiment_name,
                       cfg.tracking.uri if cfg.tracking.enabled else None)
    client = ctx.client()
    study = studies.load_study(sweep, storage)
    already_finished = studies.is_finished(study, sweep.n_trials)
    if client is not None:
        settings = {f"sweep.{k}": v for k, v in flatten(cfg.sweep).items()}
        settings["sweep.storage"] = redact_url(sweep.storage)  # no database password in MLflow
        ctx.parent_run_id = sweep_tracking.parent_run(client, ctx.experiment, study, settings)
    if already_finished and client is not None and study.best_trials and sweep_tracking.is_published(
            client, ctx.parent_run_id, study.best_trial.number):
        result = summarize(study)
        result.update(best_test_accuracy=sweep_tracking.recorded_test_accuracy(
            client, ctx.parent_run_id, study.best_trial.number), best_config=str(Path(sweep.dir) / BEST_CONFIG))
        log.info("study %s is finished (%d of %d trials) and its results are on MLflow run %s; nothing to do: "
                 "raise sweep.n_trials to extend it", study.study_name, studies.finished_trials(study),
                 sweep.n_trials, ctx.parent_run_id)
        return {**result, "wall_seconds": time.perf_counter() - started, "mlflow_parent_run_id": ctx.parent_run_id,
                "published": False}
    log.info("study %s in %s: %d of %d trials done", study.study_name, redact_url(sweep.storage),
             studies.finished_trials(study), sweep.n_trials)
    if client is not None:
        sweep_tracking.set_status(client, ctx.parent_run_id, RunStatus.RUNNING)

    status = None
    try:
        helpers = [multiprocessing.get_context("spawn").Process(
            target=_helper_worker, name=f"sweep-worker-{i}", args=(ctx, i)) for i in range(1, sweep.n_workers)]
        for process in helpers:
            process.start()
        try:
            work(ctx, 0, show_progress=True)
        finally:
            for process in helpers:
                process.join()
                if process.exitcode:
                    log.warning("%s exited with code %s; its trial, if any, is retried next time",
                                process.name, process.exitcode)
        study = studies.load_study(sweep, storage)
        result = summarize(study)
        result["published"] = _is_publisher(study, sweep, already_finished)
        if result["published"]:
            result.update(publish_results(cfg, ctx, study, client, result))
        elif not studies.is_finished(study, sweep.n_trials):
            status = None if studies.any_running(study) else RunStatus.KILLED  # stopped by sweep.timeout
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        if client is not None and status is not None:
            sweep_tracking.set_status(client, ctx.parent_run_id, status)
    result["wall_seconds"] = time.perf_counter() - started
    result["mlflow_parent_run_id"] = ctx.parent_run_id
    if not result["published"]:
        log.info("study %s: %d of %d trials done; %s", sweep.study_name, studies.finished_trials(study),
                 sweep.n_trials, "the worker that finishes the last one publishes the results"
                 if studies.any_running(study) else "run the same command again to continue")
        return result
    log.info("study %s: %d complete, %d pruned, %d failed, %d interrupted in %.0f s", sweep.study_name,
             result["n_complete"], result["n_pruned"], result["n_failed"], result["n_interrupted"],
             result["wall_seconds"])
    if result["best_trial"] is not None:
        log.info("best trial %d: %s=%.4f, test accuracy %.4f, %s", result["best_trial"], sweep.metric,
                 result["best_value"], result["best_test_accuracy"],
                 " ".join(f"{k}={_short(v)}" for k, v in result["best_params"].items()))
        log.info("retrain it: python src/train.py --config-dir %s --config-name %s",
                 Path(result["best_config"]).parent, Path(result["best_config"]).stem)
    return result


def _is_publisher(study: optuna.Study, sweep: SweepConfig, already_finished: bool) -> bool:
    """Whether this command publishes: its workers finished the study and it won the claim, or the study
    was already finished when it started (a rerun after a crash while publishing: publishing repeats safely)."""
    with studies.study_lock(sweep):
        if not studies.is_finished(study, sweep.n_trials):
            return False
        if already_finished:
            return True
        if study.user_attrs.get(studies.PUBLISHER_ATTR) not in (None, studies.worker_id()):
            return False  # two workers finished at once; the other one claimed it first
        study.set_user_attr(studies.PUBLISHER_ATTR, studies.worker_id())
        return True


def summarize(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    rows = [{"number": t.number, "state": studies.outcome(t).value, "value": t.value, "params": t.params,
             "seconds": t.duration.total_seconds() if t.duration else None,
             "training_seconds": t.user_attrs.get("training_seconds")} for t in trials]
    ran = [r for r in rows if r["state"] in ("complete", "pruned", "failed") and r["seconds"] is not None
           and r["training_seconds"] is not None]
    outcomes = [r["state"] for r in rows]
    best = study.best_trial if study.best_trials else None
    return {
        "study_name": study.study_name,
        "n_complete": outcomes.count(Outcome.complete.value),
        "n_pruned": outcomes.count(Outcome.pruned.value),
        "n_failed": outcomes.count(Outcome.failed.value),
        "n_interrupted": outcomes.count(Outcome.interrupted.value),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_test_accuracy": None,
        "best_config": None,
        "trials": rows,
        "mean_overhead_seconds": (sum(r["seconds"] - r["training_seconds"] for r in ran) / len(ran)) if ran else None,
    }


def publish_results(cfg: DictConfig, ctx: SweepContext, study: optuna.Study, client,
                    result: dict[str, Any]) -> dict[str, Any]:
    """Write the best trial's config for `src/train.py`, test it once, and put the results on the parent."""
    if result["best_trial"] is None:
        if client is not None:
            sweep_tracking.set_status(client, ctx.parent_run_id, RunStatus.FINISHED)
        return {}
    best = study.best_trial
    trial_cfg = trial_config(ctx.overrides, best.params, best.user_attrs["trial_dir"],
                             experiment_name=ctx.experiment)
    path = write_best_config(trial_cfg, cfg, Path(ctx.sweep.dir) / BEST_CONFIG, study.study_name, best.number)
    test_accuracy = None
    if client is not None:
        test_accuracy = sweep_tracking.recorded_test_accuracy(client, ctx.parent_run_id, best.number)
    model_dir = Path(trial_cfg.trainer.model_dir)
    if test_accuracy is None and not model_dir.exists() and client is not None:
        # The best trial ran on another machine: its checkpoints are in its MLflow run.
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        downloaded = client.download_artifacts(best.user_attrs["mlflow_run_id"], "checkpoints", str(model_dir.parent))
        Path(downloaded).rename(model_dir)
    if test_accuracy is None:
        test_accuracy = evaluate_checkpoint(trial_cfg, "test")["test/accuracy"]
        crashpoint("sweep.during_best_test")
    if client is not None:
        counts = {key: result[key] for key in ("n_complete", "n_pruned", "n_failed")}
        sweep_tracking.publish(client, ctx.parent_run_id, study, ctx.sweep.metric, counts, test_accuracy, path)
    return {"best_test_accuracy": test_accuracy, "best_config": str(path)}


def write_best_config(trial_cfg: DictConfig, cfg: DictConfig, path: Path, study_name: str, number: int) -> Path:
    """The trial's whole training config as a primary config for `src/train.py --config-name`.

    It keeps the interpolations, gets its own output folder again, evaluates the test split, and keeps
    the training entry point's Hydra settings (read from conf/train.yaml).
    """
    best = OmegaConf.to_container(trial_cfg, resolve=False)
    best["paths"]["output_dir"] = OmegaConf.to_container(cfg.paths, resolve=False)["output_dir"]
    best["trainer"]["evaluate_test"] = True
    best["tracking"]["run_name"] = f"{study_name}-trial-{number}"
    best["hydra"] = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml").hydra, resolve=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    retrain = f"python src/train.py --config-dir {path.parent} --config-name {path.stem}"
    path.write_text(f"# Trial {number} of study {study_name}, the best one. Retrain it:\n#   {retrain}\n"
                    + OmegaConf.to_yaml(OmegaConf.create(best)))
    return path
