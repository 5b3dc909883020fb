"""MLflow for a sweep: one parent run per study (its children are the trials' training runs), the best
trial's value, params and test accuracy, and the study's plots."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from tfsweep.tracking import RUN_ID_FILE, experiment_id

log = logging.getLogger(__name__)

STUDY_TAG = "sweep.study_name"
ROLE_TAG = "sweep.role"  # "study" on the parent run, "trial" on each child
STATE_TAG = "optuna.state"  # complete | pruned | failed | interrupted, on each child
NUMBER_TAG = "optuna.trial_number"
PARENT_ATTR = "mlflow_parent_run_id"  # in the study's user attributes
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate",
         "plot_intermediate_values")


def parent_run(client: MlflowClient, experiment: str, study, params: dict[str, Any]) -> str:
    """The study's parent run: the one recorded in the study, else the oldest tagged one, else a new one.

    Two commands starting a new study at once may both create a run; both then keep the oldest and the
    other is deleted, so the study ends up with one parent.
    """
    exp_id = experiment_id(client, experiment)
    known = study.user_attrs.get(PARENT_ATTR)
    if known and _usable(client, known):
        run_id = known
    else:
        runs = _parents(client, exp_id, study.study_name)
        if runs:
            run_id = runs[0].info.run_id
        else:
            mine = client.create_run(exp_id, run_name=study.study_name,
                                     tags={STUDY_TAG: study.study_name, ROLE_TAG: "study"}).info.run_id
            client.log_batch(mine, params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()])
            run_id = _parents(client, exp_id, study.study_name)[0].info.run_id
            if run_id != mine:
                client.delete_run(mine)
        study.set_user_attr(PARENT_ATTR, run_id)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
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


def log_best(client: MlflowClient, run_id: str, study, metric: str, config_path: Path) -> None:
    best = study.best_trial
    client.log_metric(run_id, "best_value", best.value, step=len(study.trials))
    client.set_tag(run_id, "best.metric", metric)
    client.set_tag(run_id, "best.trial_number", str(best.number))
    for name, value in best.params.items():
        client.set_tag(run_id, f"best.{name}", str(value))
    client.log_dict(run_id, {"trial": best.number, metric: best.value, "params": best.params}, "best_params.json")
    client.log_artifact(run_id, str(config_path))


def log_plots(client: MlflowClient, run_id: str, study) -> None:
    """Optuna's matplotlib plots as images (the plotly ones would need a browser to export)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib's legend notes on one-trial studies
                axes = getattr(plots, name)(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            client.log_figure(run_id, figure, f"plots/{name.removeprefix('plot_')}.png",
                              save_kwargs={"bbox_inches": "tight"})  # keep the legends inside the image
        except Exception as exc:  # e.g. importances need two complete trials; a plot is never worth a crash
            log.warning("skipped the %s plot: %s", name.removeprefix("plot_"), exc)
        finally:
            plt.close("all")


def finish(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status)
