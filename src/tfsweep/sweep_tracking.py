"""MLflow for a sweep: one parent run per study (its children are the trials' training runs), and the
finished study's results on it: best value, params, test accuracy, plots and best_trial.yaml.

Publishing is written to be repeated after a crash at any point without logging anything twice: the
metrics and tags go in one batch that is skipped once the parent has it, artifacts overwrite their
own paths, and the parent is marked FINISHED last.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

from tfsweep.crashpoints import crashpoint
from tfsweep.tracking import RUN_ID_FILE, experiment_id

log = logging.getLogger(__name__)

STUDY_TAG = "sweep.study_name"
ROLE_TAG = "sweep.role"  # "study" on the parent run, "trial" on each child
STATE_TAG = "optuna.state"  # an Outcome value, on each child
NUMBER_TAG = "optuna.trial_number"
TESTED_TAG = "best.test_trial_number"  # on the parent: the trial whose test accuracy it holds
PARENT_ATTR = "mlflow_parent_run_id"  # in the study's user attributes
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate",
         "plot_intermediate_values")


def parent_run(client: MlflowClient, experiment: str, study, params: dict[str, Any]) -> str:
    """The study's parent run: the one recorded in the study, else the oldest tagged one, else a new one.

    Two commands starting a new study at once may both create a run; both then keep the oldest and the
    other is deleted, so the study ends up with one parent. Params a crash kept from it are added.
    """
    exp_id = experiment_id(client, experiment)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not (run_id and _usable(client, run_id)):
        mine = None
        if not _parents(client, exp_id, study.study_name):
            mine = client.create_run(exp_id, run_name=study.study_name,
                                     tags={STUDY_TAG: study.study_name, ROLE_TAG: "study"}).info.run_id
            crashpoint("sweep.after_parent_run_created")
        run_id = _parents(client, exp_id, study.study_name)[0].info.run_id
        if mine is not None and run_id != mine:
            client.delete_run(mine)
        study.set_user_attr(PARENT_ATTR, run_id)
    logged = client.get_run(run_id).data.params
    if missing := [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]:
        client.log_batch(run_id, params=missing)
    return run_id


def _usable(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _parents(client: MlflowClient, exp_id: str, study_name: str):
    runs = client.search_runs([exp_id], filter_string=f"tags.`{STUDY_TAG}` = '{study_name}' and "
                              f"tags.`{ROLE_TAG}` = 'study'", max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def child_run_id(model_dir: str | Path) -> str | None:
    path = Path(model_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def recorded_test_accuracy(client: MlflowClient, run_id: str, trial_number: int) -> float | None:
    """The best trial's test accuracy if the parent already holds it for that trial."""
    run = client.get_run(run_id)
    if run.data.tags.get(TESTED_TAG) == str(trial_number):
        return run.data.metrics.get("best_test_accuracy")
    return None


def is_published(client: MlflowClient, run_id: str, trial_number: int) -> bool:
    run = client.get_run(run_id)
    return run.info.status == "FINISHED" and run.data.tags.get(TESTED_TAG) == str(trial_number)


def publish(client: MlflowClient, run_id: str, study, metric: str, counts: dict[str, int],
            test_accuracy: float, config_path: Path) -> None:
    """Put the finished study's results on its parent run and mark it FINISHED; safe to repeat."""
    best = study.best_trial
    if client.get_run(run_id).data.tags.get(TESTED_TAG) != str(best.number):
        now, step = int(time.time() * 1000), sum(counts.values())  # an extended study logs at a new step
        metrics = {"best_value": best.value, "best_test_accuracy": test_accuracy, **counts}
        tags = {"best.metric": metric, "best.trial_number": str(best.number), TESTED_TAG: str(best.number),
                **{f"best.{name}": str(value) for name, value in best.params.items()}}
        # One request, so a crash leaves all of it or none of it.
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    crashpoint("sweep.during_publishing")
    client.log_dict(run_id, {"trial": best.number, metric: best.value, "params": best.params}, "best_params.json")
    client.log_artifact(run_id, str(config_path))
    log_plots(client, run_id, study)
    set_status(client, run_id, RunStatus.FINISHED)


def log_plots(client: MlflowClient, run_id: str, study) -> None:
    """Optuna's matplotlib plots as images (the plotly ones would need a browser to export)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the plots are experimental; legends warn on one-trial studies
                axes = getattr(plots, name)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            client.log_figure(run_id, figure, f"plots/{name.removeprefix('plot_')}.png",
                              save_kwargs={"bbox_inches": "tight"})  # keep the legends inside the image
        except Exception as exc:  # e.g. importances need two complete trials; a plot is never worth a crash
            log.warning("skipped the %s plot: %s", name.removeprefix("plot_"), exc)
        finally:
            plt.close("all")
        crashpoint("sweep.during_plotting")


def set_status(client: MlflowClient, run_id: str, status: RunStatus) -> None:
    if status == RunStatus.RUNNING:
        client.update_run(run_id, status=RunStatus.to_string(status))
    else:
        client.set_terminated(run_id, RunStatus.to_string(status))
