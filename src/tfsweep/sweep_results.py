"""What a sweep leaves, however it ended: its summary, the best trial's config for `src/train.py`, that
trial's test accuracy and its model in the Model Registry (alias `champion`), and all of it on the study's
MLflow parent run, published by the last worker to leave."""

from __future__ import annotations

import enum
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from tfsweep import checkpoint_artifacts
from tfsweep import study as studies
from tfsweep import logged_model, sweep_tracking, training
from tfsweep.config import CONFIG_DIR
from tfsweep.crashpoints import crashpoint
from tfsweep.study import Outcome
from tfsweep.sweep_config import SweepConfig, SweepContext, trial_config

BEST_CONFIG = "best_trial.yaml"


class Ending(enum.Enum):
    """What ended a sweep command, as the parent run's `sweep.ended_by` tag says."""

    budget = "n_trials"
    timeout = "timeout"
    interrupted = "interrupted"  # Ctrl-C or SIGTERM

    @classmethod
    def of(cls, study: optuna.Study, n_trials: int, interrupted: bool) -> Ending:
        if studies.is_finished(study, n_trials):
            return cls.budget
        return cls.interrupted if interrupted else cls.timeout

    @property
    def run_status(self) -> RunStatus:
        return RunStatus.KILLED if self is Ending.interrupted else RunStatus.FINISHED


def is_publisher(study: optuna.Study, sweep: SweepConfig, already_finished: bool) -> bool:
    """Whether this command publishes the results of the trials finished so far: none runs any more (its
    workers were the last to leave) and no live worker that left at the same moment claimed them first. A
    study already finished when the command started is published again (a rerun after a crash while
    publishing: publishing repeats safely)."""
    with studies.study_lock(sweep):
        studies.recover(study, sweep)  # a trial whose worker died with this command runs no more
        if studies.any_running(study):
            return False
        if already_finished:
            return True
        claim = {"worker": studies.worker_id(), "finished": studies.finished_trials(study)}
        claimed = study.user_attrs.get(studies.PUBLISHER_ATTR) or {}
        if (claimed.get("finished") == claim["finished"] and claimed.get("worker") != claim["worker"]
                and (claimed.get("done") or studies.worker_alive(claimed["worker"]))):
            return False  # another worker publishes these trials, or has published them and left
        study.set_user_attr(studies.PUBLISHER_ATTR, claim)
        return True


def mark_published(study: optuna.Study, sweep: SweepConfig) -> None:
    """Record that this worker's claim is published, so a worker that leaves after it has exited, with no
    trial finished since, does not publish the same trials again."""
    with studies.study_lock(sweep):
        claimed = study.user_attrs.get(studies.PUBLISHER_ATTR) or {}
        if claimed.get("worker") == studies.worker_id():
            study.set_user_attr(studies.PUBLISHER_ATTR, {**claimed, "done": True})


def summarize(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    outcomes = [studies.outcome(t) for t in trials]
    rows = [{"number": t.number, "state": o.value, "value": t.value, "params": t.params,
             "seconds": t.duration.total_seconds() if t.duration else None,
             "training_seconds": t.user_attrs.get("training_seconds")} for t, o in zip(trials, outcomes)]
    ended = (Outcome.complete, Outcome.pruned, Outcome.failed)  # ran to an end of their own
    ran = [r for r, o in zip(rows, outcomes) if o in ended and r["seconds"] is not None
           and r["training_seconds"] is not None]
    counts = Counter(outcomes)
    best = studies.best_trial(study)
    return {
        "study_name": study.study_name,
        **{f"n_{o.value}": counts[o] for o in (*ended, Outcome.interrupted)},
        "best_trial": best.number if best else None,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_test_accuracy": None,
        "best_config": None,
        "trials": rows,
        "mean_overhead_seconds": (sum(r["seconds"] - r["training_seconds"] for r in ran) / len(ran)) if ran else None,
    }


def publish_results(cfg: DictConfig, ctx: SweepContext, study: optuna.Study, client,
                    result: dict[str, Any], ended: Ending) -> dict[str, Any]:
    """Write the best trial's config for `src/train.py`, test it once, log and register its model (only the
    best trial's: trials log none), and put the results on the parent. Every step is skipped when a
    previous attempt (a crash while publishing) already did it; the caller sets the parent's status last."""
    if result["best_trial"] is None:
        return {}
    best = studies.best_trial(study)
    trial_cfg = trial_config(ctx.overrides, best.params, best.user_attrs["trial_dir"],
                             experiment_name=ctx.experiment)
    path = write_best_config(trial_cfg, cfg, Path(ctx.sweep.dir) / BEST_CONFIG, study.study_name, best.number)
    test_accuracy = (None if client is None
                     else sweep_tracking.recorded_test_accuracy(client, ctx.parent_run_id, best.number))
    register_as = cfg.tracking.registered_model_name if client is not None else None
    run_id = best.user_attrs.get("mlflow_run_id")
    model_id = logged_model.ready_model(client, run_id) if register_as else None
    needs_network = bool(register_as) and model_id is None
    model_dir = Path(trial_cfg.trainer.model_dir)
    if (test_accuracy is None or needs_network) and client is not None:
        # The best trial may have ended on another machine: its latest checkpoint is in its MLflow run.
        checkpoint_artifacts.restore(client, run_id, model_dir)
    trainer = training.restore_checkpoint(trial_cfg) if needs_network else None
    if test_accuracy is None:
        tested = trainer.evaluate("test") if trainer else training.evaluate_checkpoint(trial_cfg, "test")
        test_accuracy = tested["test/accuracy"]
        crashpoint("sweep.during_best_test")
    model_uri = None
    if register_as:
        if model_id is None:
            model_id = logged_model.log_model(ctx.tracking_uri, run_id, trainer)
        model_uri = sweep_tracking.register_champion(ctx.tracking_uri, model_id, register_as, study, test_accuracy)
    if client is not None:
        counts = {key: result[key] for key in ("n_complete", "n_pruned", "n_failed")}
        sweep_tracking.publish(client, ctx.parent_run_id, study, ctx.sweep.metric, counts, test_accuracy, path,
                               model_uri, ended.value)
    return {"best_test_accuracy": test_accuracy, "best_config": str(path), "best_model_uri": model_uri}


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
