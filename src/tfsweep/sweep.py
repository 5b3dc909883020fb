"""`run_sweep(cfg)`: an Optuna study over the training config, one `train()` call per trial.

Each trial is the sweep's training config with the trial's values applied as overrides; it trains with
the same `tfsweep.training.train` that `src/train.py` calls, in its own folder under `sweep.dir/trials/`,
reports every validation evaluation to the pruner, and is logged as an MLflow child run of the study's
parent run. Stopping and rerunning continues the study (see `tfsweep.study` for the budget rule).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tfsweep import study as studies
from tfsweep import sweep_tracking
from tfsweep.config import CONFIG_DIR, flatten
from tfsweep.errors import NonFiniteLossError
from tfsweep.hooks import Hook
from tfsweep.sweep_config import check, training_part, trial_config
from tfsweep.training import evaluate_checkpoint, train

log = logging.getLogger(__name__)

QUIET_LOGGERS = ("tfsweep.hooks", "tfsweep.trainer", "tfsweep.tracking", "absl")  # per-step lines; MLflow has them
BEST_CONFIG = "best_trial.yaml"


class PruningHook(Hook):
    """Reports each validation evaluation to Optuna and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def after_eval(self, trainer, step, split, metrics):
        if split != "val":
            return
        self.trial.report(metrics[self.metric], step)
        if step < trainer.steps and self.trial.should_prune():
            self.pruned_at = step
            trainer.request_stop(f"pruned by Optuna at step {step}")


class TrialTimer(Hook):
    """Seconds spent in training steps: the time before each log point since the previous hook call.

    Evaluation and checkpointing happen at log points and end in a hook call, so they are excluded.
    """

    def __init__(self) -> None:
        self.training_seconds, self._mark = 0.0, 0.0

    def begin(self, trainer):
        self._mark = time.perf_counter()

    def after_log(self, trainer, step, logs):
        now = time.perf_counter()
        self.training_seconds += now - self._mark
        self._mark = now

    def after_eval(self, trainer, step, split, metrics):
        self._mark = time.perf_counter()

    def after_checkpoint(self, trainer, step, path):
        self._mark = time.perf_counter()


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


class Objective:
    """One trial: build its config, train, report; the return value is the validation metric."""

    def __init__(self, sweep: dict[str, Any], train_cfg: DictConfig, options: dict, parent_run_id: str | None,
                 experiment: str) -> None:
        self.sweep, self.train_cfg, self.options = sweep, train_cfg, options
        self.parent_run_id, self.experiment = parent_run_id, experiment

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        if not studies.claim(trial.study, trial, self.sweep["n_trials"]):
            trial.study.stop()
            raise Surplus(f"trial {trial.number} is beyond the study's {self.sweep['n_trials']} trials")
        timer, pruning = TrialTimer(), PruningHook(trial, self.sweep["metric"])
        state, reason, cfg = "failed", None, None
        try:
            params = {name: suggest(trial, name, spec) for name, spec in self.sweep["params"].items()}
            frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
            cfg = self.config(frozen, params, trial.study.study_name)
            tags = {sweep_tracking.STUDY_TAG: trial.study.study_name, sweep_tracking.ROLE_TAG: "trial",
                    sweep_tracking.NUMBER_TAG: str(trial.number)}
            if history := studies.retry_history(frozen):
                tags["optuna.retry_of"] = ",".join(map(str, history))
            metrics = train(cfg, hooks=[TrialParamsHook(params), pruning, timer],
                            parent_run_id=self.parent_run_id, run_tags=tags)
            state = "pruned" if pruning.pruned_at is not None else "complete"
        except NonFiniteLossError as exc:
            reason = str(exc)
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        except BaseException:
            state = "interrupted"  # no fail reason: the trial is retried when the sweep runs again
            raise
        finally:
            seconds = time.perf_counter() - started
            trial.set_user_attr("seconds", round(seconds, 3))
            trial.set_user_attr("training_seconds", round(timer.training_seconds, 3))
            if reason is not None:
                trial.set_user_attr(studies.FAIL_ATTR, reason[:1000])
            if cfg is not None:
                trial.set_user_attr("trial_dir", cfg.paths.output_dir)
                self._tag_child(cfg, trial, state, reason)
            _clear_keras()
        if state == "pruned":
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        return metrics[self.sweep["metric"]]

    def config(self, trial: optuna.trial.FrozenTrial, params: dict[str, Any], study_name: str) -> DictConfig:
        """The trial's training config; a retry reuses its first attempt's folder and so its checkpoints."""
        history = studies.retry_history(trial)
        first = history[0] if history else None
        folder = Path(self.sweep["dir"]) / "trials" / f"{trial.number if first is None else first:04d}"
        cfg = trial_config(self.train_cfg, params, self.options, str(folder))
        OmegaConf.update(cfg, "tracking.experiment_name", self.experiment)  # children sit with their parent
        OmegaConf.update(cfg, "tracking.run_name", f"{study_name}-trial-{folder.name}")
        return cfg

    def _tag_child(self, cfg: DictConfig, trial: optuna.Trial, state: str, reason: str | None) -> None:
        run_id = sweep_tracking.child_run_id(cfg.trainer.model_dir) if cfg.tracking.enabled else None
        if run_id is None:
            return
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            import mlflow

            client = mlflow.MlflowClient(cfg.tracking.uri)
            client.set_tag(run_id, sweep_tracking.STATE_TAG, state)
            if reason:
                client.set_tag(run_id, "optuna.fail_reason", reason[:5000])
        except Exception as exc:  # the trial's own outcome matters more than its tag
            log.warning("could not tag MLflow run %s: %s", run_id, exc)


class Surplus(Exception):
    """A trial started after other workers had already filled the study's budget."""


def _clear_keras() -> None:
    import keras

    keras.backend.clear_session()


def suggest(trial: optuna.Trial, name: str, spec: dict[str, Any]) -> Any:
    """The trial's value for one entry of `sweep.params` (a retried trial gets its first attempt's)."""
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec["log"],
                                 step=int(spec["step"] or 1))
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"], step=spec["step"])


def _summary(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    value = f"{metric}={trial.value:.4f}" if trial.value is not None else ""
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{metric}={trial.intermediate_values[step]:.4f} at step {step}"
    reason = trial.user_attrs.get(studies.FAIL_ATTR, "")
    state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
    if studies.SURPLUS_ATTR in trial.user_attrs:
        state, params = "skipped (budget met by other workers)", ""
    elif trial.state == TrialState.FAIL and not reason:
        state = "interrupted"
    return " ".join(p for p in (f"trial {trial.number} {state}", value, params, reason,
                                f"({trial.user_attrs.get('seconds', 0):.1f} s)") if p)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _work(sweep: dict[str, Any], train_cfg: DictConfig, options: dict, parent_run_id: str | None,
          experiment: str, worker_index: int, show_progress: bool) -> None:
    """One worker: run trials until the study's budget is met (or this command's timeout)."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        _run_trials(sweep, train_cfg, options, parent_run_id, experiment, worker_index, show_progress)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run_trials(sweep: dict[str, Any], train_cfg: DictConfig, options: dict, parent_run_id: str | None,
                experiment: str, worker_index: int, show_progress: bool) -> None:
    # Our one line per trial, with the failure reason, replaces Optuna's lines and tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = studies.open_storage(sweep)
    existing = len(studies.load_study(sweep, storage).get_trials(deepcopy=False))
    # A resumed study or a second worker must not replay the first worker's random draws.
    study = studies.load_study(sweep, storage, studies.build_sampler(sweep, worker_index + existing),
                               studies.build_pruner(sweep))
    studies.recover_interrupted(study, storage, sweep)
    n_trials = sweep["n_trials"]
    if studies.counted_trials(study) >= n_trials:
        return
    objective = Objective(sweep, train_cfg, options, parent_run_id, experiment)
    finished = lambda: sum(t.state.is_finished() and studies.counts(t) for t in study.get_trials(deepcopy=False))
    bar = tqdm(total=n_trials, initial=finished(), unit="trial", desc=sweep["study_name"], dynamic_ncols=True,
               disable=None if show_progress else True)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.info("%s", _summary(trial, sweep["metric"]))
        bar.update(finished() - bar.n)
        studies.recover_interrupted(study, storage, sweep)
        if studies.counted_trials(study) >= n_trials:
            study.stop()

    try:
        with logging_redirect_tqdm():
            study.optimize(objective, n_trials=None, timeout=sweep["timeout"], callbacks=[after_trial],
                           catch=(Exception,), gc_after_trial=True)
    finally:
        bar.close()


def _helper_worker(sweep, train_container, options, parent_run_id, experiment, worker_index) -> None:
    """Entry of an extra worker process (spawned: TensorFlow does not survive a fork)."""
    logging.basicConfig(level=logging.INFO, format=f"[worker {worker_index}] %(message)s")
    train_cfg = OmegaConf.create(train_container)
    OmegaConf.set_struct(train_cfg, True)
    _work(sweep, train_cfg, options, parent_run_id, experiment, worker_index, show_progress=False)


def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) the study `cfg.sweep` describes; return its outcome.

    Everything is checked (search space, sampler, pruner, storage, MLflow) before the first trial; a
    problem raises a UserError and leaves an existing study as it was. Returns `wall_seconds` (this
    call), the study's `n_complete`, `n_pruned`, `n_failed`, `n_interrupted`, `best_value`,
    `best_params`, `best_trial`, `best_test_accuracy`, `best_config` (the yaml `src/train.py` takes),
    `trials` (number, state, value, params, seconds, training_seconds) and
    `mean_overhead_seconds` (a trial's seconds outside training steps, averaged over finished trials).
    """
    started = time.perf_counter()
    sweep, options = check(cfg)
    studies.build_sampler(sweep)  # an unknown sampler or pruner fails here, before any trial
    studies.build_pruner(sweep)
    storage = studies.open_storage(sweep)
    train_cfg = training_part(cfg)
    experiment = cfg.tracking.experiment_name
    client = parent_run_id = None
    if cfg.tracking.enabled:
        from tfsweep.tracking import connect

        client = connect(cfg.tracking.uri)
    study = studies.load_study(sweep, storage)
    log.info("study %s in %s: %d of %d trials done", study.study_name, studies.redacted(str(sweep["storage"])),
             sum(t.state.is_finished() and studies.counts(t) for t in study.get_trials(deepcopy=False)),
             sweep["n_trials"])
    if client is not None:
        settings = {f"sweep.{k}": v for k, v in flatten(cfg.sweep).items()}
        settings["sweep.storage"] = studies.redacted(str(sweep["storage"]))  # no database password in MLflow
        parent_run_id = sweep_tracking.parent_run(client, experiment, study, settings)
    status = "FINISHED"
    try:
        helpers = [multiprocessing.get_context("spawn").Process(
            target=_helper_worker, name=f"sweep-worker-{i}",
            args=(sweep, OmegaConf.to_container(train_cfg, resolve=False), options, parent_run_id, experiment, i))
            for i in range(1, sweep["n_workers"])]
        for process in helpers:
            process.start()
        try:
            _work(sweep, train_cfg, options, parent_run_id, experiment, 0, show_progress=True)
        finally:
            for process in helpers:
                process.join()
                if process.exitcode:
                    log.warning("%s exited with code %s; its trial, if any, is retried next time",
                                process.name, process.exitcode)
        study = studies.load_study(sweep, storage)
        result = summarize(study, sweep)
        if result["best_trial"] is not None:
            result.update(report_best(cfg, sweep, study, train_cfg, options, client, parent_run_id, experiment))
        if client is not None:
            for key in ("n_complete", "n_pruned", "n_failed"):
                client.log_metric(parent_run_id, key, result[key])
            if result["best_trial"] is not None:
                sweep_tracking.log_plots(client, parent_run_id, study)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if client is not None:
            sweep_tracking.finish(client, parent_run_id, status)
    result["wall_seconds"] = time.perf_counter() - started
    result["mlflow_parent_run_id"] = parent_run_id
    log.info("study %s: %d complete, %d pruned, %d failed, %d interrupted in %.0f s", sweep["study_name"],
             result["n_complete"], result["n_pruned"], result["n_failed"], result["n_interrupted"],
             result["wall_seconds"])
    if result["best_trial"] is not None:
        log.info("best trial %d: %s=%.4f, test accuracy %.4f, %s", result["best_trial"], sweep["metric"],
                 result["best_value"], result["best_test_accuracy"],
                 " ".join(f"{k}={_short(v)}" for k, v in result["best_params"].items()))
        log.info("retrain it: python src/train.py --config-dir %s --config-name %s",
                 Path(result["best_config"]).parent, Path(result["best_config"]).stem)
    return result


def summarize(study: optuna.Study, sweep: dict[str, Any]) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    state = lambda t: ("surplus" if studies.SURPLUS_ATTR in t.user_attrs else
                       "interrupted" if t.state == TrialState.FAIL and studies.FAIL_ATTR not in t.user_attrs
                       else t.state.name.lower())
    rows = [{"number": t.number, "state": state(t), "value": t.value, "params": t.params,
             "seconds": t.user_attrs.get("seconds"), "training_seconds": t.user_attrs.get("training_seconds")}
            for t in trials]
    ran = [r for r in rows if r["state"] in ("complete", "pruned", "fail") and r["seconds"] is not None]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {
        "study_name": study.study_name,
        "n_complete": len(complete),
        "n_pruned": sum(r["state"] == "pruned" for r in rows),
        "n_failed": sum(r["state"] == "fail" for r in rows),
        "n_interrupted": sum(r["state"] == "interrupted" for r in rows),
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_test_accuracy": None,
        "best_config": None,
        "trials": rows,
        "mean_overhead_seconds": (sum(r["seconds"] - r["training_seconds"] for r in ran) / len(ran)) if ran else None,
    }


def report_best(cfg: DictConfig, sweep: dict[str, Any], study: optuna.Study, train_cfg: DictConfig,
                options: dict, client, parent_run_id: str | None, experiment: str) -> dict[str, Any]:
    """Write the best trial's config for `src/train.py`, and evaluate it on the test split once."""
    best = study.best_trial
    trial_cfg = trial_config(train_cfg, best.params, options, best.user_attrs["trial_dir"])
    OmegaConf.update(trial_cfg, "tracking.experiment_name", experiment)
    path = write_best_config(trial_cfg, train_cfg, Path(sweep["dir"]) / BEST_CONFIG, study.study_name, best.number)
    test_accuracy = None
    if client is not None:
        run = client.get_run(parent_run_id)
        if run.data.tags.get("best.test_trial_number") == str(best.number):
            test_accuracy = run.data.metrics.get("best_test_accuracy")
    model_dir = Path(trial_cfg.trainer.model_dir)
    if test_accuracy is None and not model_dir.exists() and client is not None:
        # The best trial ran on another machine: its checkpoints are in its MLflow run.
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        downloaded = client.download_artifacts(best.user_attrs["mlflow_run_id"], "checkpoints", str(model_dir.parent))
        Path(downloaded).rename(model_dir)
    if test_accuracy is None:
        test_accuracy = evaluate_checkpoint(trial_cfg, "test")["test/accuracy"]
        if client is not None:
            client.log_metric(parent_run_id, "best_test_accuracy", test_accuracy)
            client.set_tag(parent_run_id, "best.test_trial_number", str(best.number))
    if client is not None:
        sweep_tracking.log_best(client, parent_run_id, study, sweep["metric"], path)
    return {"best_test_accuracy": test_accuracy, "best_config": str(path)}


def write_best_config(trial_cfg: DictConfig, train_cfg: DictConfig, path: Path, study_name: str,
                      number: int) -> Path:
    """The trial's whole training config as a primary config for `src/train.py --config-name`.

    It keeps the interpolations, gets its own output folder again, evaluates the test split, and keeps
    the training entry point's Hydra settings (read from conf/train.yaml).
    """
    best = OmegaConf.to_container(trial_cfg, resolve=False)
    best["paths"]["output_dir"] = OmegaConf.to_container(train_cfg.paths, resolve=False)["output_dir"]
    best["trainer"]["evaluate_test"] = True
    best["tracking"]["run_name"] = f"{study_name}-trial-{number}"
    best["hydra"] = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "train.yaml").hydra, resolve=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    retrain = f"python src/train.py --config-dir {path.parent} --config-name {path.stem}"
    path.write_text(f"# Trial {number} of study {study_name}, the best one. Retrain it:\n#   {retrain}\n"
                    + OmegaConf.to_yaml(OmegaConf.create(best)))
    return path
