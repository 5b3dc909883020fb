"""MLflow for a sweep: one parent run per study (its children are the trials' training runs), and the
results of its finished trials on it: best value, params, test accuracy, plots and best_trial.yaml; the best
trial's model in the Model Registry with the alias `champion`.

Publishing is written to be repeated after a crash at any point without logging anything twice: the
metrics and tags go in one batch that is skipped once the parent has it for the same finished trials,
artifacts overwrite their own paths, and the parent's status is set last.
"""

from __future__ import annotations

import enum
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking.context.registry import resolve_tags

from tfsweep.crashpoints import crashpoint
from tfsweep.study import best_trial
from tfsweep.tracking_store import experiment_id

log = logging.getLogger(__name__)

STUDY_TAG = "sweep.study_name"
ROLE_TAG = "sweep.role"  # "study" on the parent run, "trial" on each child
STATE_TAG = "optuna.state"  # an Outcome value, on each child
NUMBER_TAG = "optuna.trial_number"
TESTED_TAG = "best.test_trial_number"  # on the parent: the trial whose test accuracy it holds
PUBLISHED_TAG = "sweep.published_trials"  # on the parent: how many finished trials its results cover
NOTE_TAG = "mlflow.note.content"  # MLflow's run description
ENDED_TAG = "sweep.ended_by"  # on the parent: n_trials, timeout or interrupted (an Ending value)
PARENT_ATTR = "mlflow_parent_run_id"  # in the study's user attributes
CHAMPION = "champion"  # the registered model's alias for the best trial of the last published study
PLOTS = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate",
         "plot_intermediate_values")
# Importances and parallel coordinates of fewer complete trials look like findings and are none.
COMPARISON_PLOTS, COMPARISON_TRIALS = ("plot_param_importances", "plot_parallel_coordinate"), 5
PLOT_SIZE = (10, 6)  # inches at 100 dpi: room for the axis names of four or five searched params


def study_params(sweep, storage: str) -> dict[str, str]:
    """The parent run's params, few and readable: the budget, the objective, the sampler and pruner with
    their settings, and each searched key's range (`space.model.dropout`: `float 0.0..0.7`)."""
    def method(node) -> str:
        settings = {k: v for k, v in node.items() if k != "_target_" and v is not None}
        return f"{node['_target_'].rsplit('.', 1)[-1]}({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def space(spec) -> str:
        if spec.type.value == "categorical":
            return f"one of {list(spec.choices)}"
        cast = int if spec.type.value == "int" else float
        step = f" step {cast(spec.step)}" if spec.step else ""
        return f"{spec.type.value} {cast(spec.low)}..{cast(spec.high)}{' log' if spec.log else ''}{step}"

    params = {"n_trials": sweep.n_trials, "timeout": sweep.timeout, "n_workers": sweep.n_workers,
              "objective": f"{sweep.direction.value} {sweep.metric}", "seed": sweep.seed,
              "sampler": method(sweep.sampler), "pruner": method(sweep.pruner), "storage": storage}
    return {**params, **{f"space.{name}": space(spec) for name, spec in sweep.params.items()}}


def parent_run(client: MlflowClient, experiment: str, study, params: dict[str, Any]) -> str:
    """The study's parent run: the one recorded in the study, else the oldest tagged one, else a new one.

    Two commands starting a new study at once may both create a run; both then keep the oldest and the
    other is deleted, so the study ends up with one parent. Params a crash kept from it are added;
    unset settings (None, such as the options of a pruner not in use) are not params.
    """
    exp_id = experiment_id(client, experiment)
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not (run_id and _usable(client, run_id)):
        mine = None
        if not _parents(client, exp_id, study.study_name):
            # MLflow's context tags (user, source, git commit), as `mlflow.start_run` would set them.
            tags = resolve_tags({STUDY_TAG: study.study_name, ROLE_TAG: "study"})
            mine = client.create_run(exp_id, run_name=study.study_name, tags=tags).info.run_id
            crashpoint("sweep.after_parent_run_created")
        run_id = _parents(client, exp_id, study.study_name)[0].info.run_id
        if mine is not None and run_id != mine:
            client.delete_run(mine)
        study.set_user_attr(PARENT_ATTR, run_id)
    logged = client.get_run(run_id).data.params
    if missing := [Param(k, str(v.value if isinstance(v, enum.Enum) else v)[:6000]) for k, v in params.items()
                   if k not in logged and v is not None]:  # `maximize`, not `Direction.maximize`
        client.log_batch(run_id, params=missing)
    return run_id


def runs_filter(study_name: str, role: str) -> str:
    """The search filter for a study's parent run (`role` "study") or its trials' runs ("trial")."""
    return f"tags.`{STUDY_TAG}` = '{study_name}' and tags.`{ROLE_TAG}` = '{role}'"


def _usable(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def _parents(client: MlflowClient, exp_id: str, study_name: str):
    runs = client.search_runs([exp_id], filter_string=runs_filter(study_name, "study"), max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def recorded_test_accuracy(client: MlflowClient, run_id: str, trial_number: int) -> float | None:
    """The best trial's test accuracy if the parent already holds it for that trial."""
    run = client.get_run(run_id)
    if run.data.tags.get(TESTED_TAG) == str(trial_number):
        return run.data.metrics.get("best_test_accuracy")
    return None


def is_published(client: MlflowClient, run_id: str, finished_trials: int, best_trial: int) -> bool:
    """Whether the parent holds the results of this many finished trials, the best one's test accuracy
    among them, and was marked FINISHED after."""
    tags, status = (run := client.get_run(run_id)).data.tags, run.info.status
    return status == "FINISHED" and (tags.get(PUBLISHED_TAG), tags.get(TESTED_TAG)) == (
        str(finished_trials), str(best_trial))


def register_champion(uri: str, model_id: str, name: str, study, test_accuracy: float) -> str:
    """Register the best trial's LoggedModel as a version of the registered model `name`, point the alias
    `champion` at it, and return that version's URI (`models:/<name>/<version>`).

    Safe to repeat after a crash at any point: a version of this model is reused, never added twice.
    """
    mlflow.set_tracking_uri(uri)  # the registry lives in the tracking store
    client = MlflowClient(uri)
    # The SQL registry keeps a version's LoggedModel in its source, `models:/<model_id>`.
    versions = [v for v in client.search_model_versions(f"name = '{name}'")
                if model_id in (v.model_id, v.source.removeprefix("models:/"))]
    if versions:
        version = versions[0]
    else:
        best = best_trial(study)
        description = (f"Trial {best.number} of study {study.study_name}: validation {best.value:.4f}, "
                       f"test accuracy {test_accuracy:.4f}")
        version = mlflow.register_model(f"models:/{model_id}", name, tags={STUDY_TAG: study.study_name,
                                                                             NUMBER_TAG: str(best.number)})
        client.update_model_version(name, version.version, description=description)
    crashpoint("sweep.after_model_registered")
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return f"models:/{name}/{version.version}"


def publish(client: MlflowClient, run_id: str, study, metric: str, counts: dict[str, int],
            test_accuracy: float, config_path: Path, model_uri: str | None, ended: str) -> None:
    """Put the results of the trials finished so far on the study's parent run; safe to repeat. The caller
    sets the run's status last."""
    best = best_trial(study)
    step = sum(counts.values())  # the finished trials: a continued study logs at a new step
    tags = client.get_run(run_id).data.tags
    if tags.get(PUBLISHED_TAG) != str(step) or tags.get(TESTED_TAG) != str(best.number):
        metrics = {"best_value": best.value, "best_test_accuracy": test_accuracy, **counts}
        tags = {"best.metric": metric, "best.trial_number": str(best.number), TESTED_TAG: str(best.number),
                PUBLISHED_TAG: str(step), ENDED_TAG: ended,
                **{f"best.{name}": str(value) for name, value in best.params.items()}}
        if model_uri:
            tags["best.model_uri"] = model_uri
        tags[NOTE_TAG] = description(best, metric, counts, test_accuracy, model_uri, ended)
        # One request, so a crash leaves all of it or none of it.
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
    crashpoint("sweep.during_publishing")
    client.log_dict(run_id, {"trial": best.number, metric: best.value, "params": best.params}, "best_params.json")
    client.log_artifact(run_id, str(config_path))
    log_plots(client, run_id, study, metric)


ENDINGS = {"n_trials": "all of sweep.n_trials done", "timeout": "stopped by sweep.timeout",
           "interrupted": "interrupted; the same command continues it"}


def description(best, metric: str, counts: dict[str, int], test_accuracy: float, model_uri: str | None,
                ended: str) -> str:
    """The parent run's description (MLflow shows it atop the run page): the answer, in Markdown."""
    params = ", ".join(f"`{name}={value:.4g}`" if isinstance(value, float) else f"`{name}={value}`"
                       for name, value in best.params.items())
    finished = ", ".join(f"{n} {key.removeprefix('n_')}" for key, n in counts.items() if n)
    lines = [f"**Best: trial {best.number}**, {metric} {best.value:.4f}, test accuracy {test_accuracy:.4f}",
             f"with {params}", f"{sum(counts.values())} trials ({finished}); {ENDINGS.get(ended, ended)}."]
    if model_uri:
        lines.append(f"Its model: `{model_uri}`, alias `{CHAMPION}`.")
    if counts.get("n_complete", 0) < COMPARISON_TRIALS:
        lines.append(f"The importance and parallel-coordinate plots are drawn from {COMPARISON_TRIALS} complete "
                     "trials on.")
    return "\n\n".join(lines)


def log_plots(client: MlflowClient, run_id: str, study, metric: str) -> None:
    """Optuna's matplotlib plots as images (the plotly ones would need a browser to export), with the
    objective called by its metric's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    names = [n for n in PLOTS if complete >= COMPARISON_TRIALS or n not in COMPARISON_PLOTS]
    if len(names) < len(PLOTS):
        log.info("importance and parallel-coordinate plots wait for %d complete trials (%d so far)",
                 COMPARISON_TRIALS, complete)
    for name in names:
        try:
            with warnings.catch_warnings(action="ignore"):  # experimental plots; one-trial legends warn
                named = {} if name == "plot_intermediate_values" else {"target_name": metric}
                axes = getattr(plots, name)(study, **named)
            axes = axes.flat[0] if hasattr(axes, "flat") else axes
            legible(axes, study, metric)
            client.log_figure(run_id, axes.figure, f"plots/{name.removeprefix('plot_')}.png",
                              save_kwargs={"bbox_inches": "tight", "pad_inches": 0.2})  # legends stay inside
        except Exception as exc:  # e.g. importances need two complete trials; a plot is never worth a crash
            log.warning("skipped the %s plot: %s", name.removeprefix("plot_"), exc)
        finally:
            plt.close("all")
        crashpoint("sweep.during_plotting")


def legible(axes, study, metric: str) -> None:
    """A figure large enough for its labels, the searched params by their whole names (Optuna cuts them
    at 20 characters), slanted names that start under their axis, and the metric on the y axis."""
    figure = axes.figure
    figure.set_size_inches(*PLOT_SIZE)
    names = sorted({name for trial in study.get_trials(deepcopy=False) for name in trial.params})
    labels = [label.get_text() for label in axes.get_xticklabels()]
    if any(label.endswith("...") for label in labels):  # the parallel coordinates' axis names
        whole = [next((n for n in names if label.endswith("...") and n.startswith(label[:-3])), label)
                 for label in labels]
        axes.set_xticks(axes.get_xticks(), whole, rotation=-25, ha="left", rotation_mode="anchor")
    if axes.get_ylabel() == "Intermediate Value":
        axes.set_ylabel(f"{metric} (reported during training)")
    elif not axes.get_ylabel() and axes.get_xlabel() != "Hyperparameter Importance":
        axes.set_ylabel(metric)  # the parallel coordinates' leftmost axis
    axes.set_title(axes.get_title(), pad=14)  # clear of the top tick labels
    figure.tight_layout()


def set_status(client: MlflowClient, run_id: str, status: RunStatus) -> None:
    if status == RunStatus.RUNNING:
        client.update_run(run_id, status=RunStatus.to_string(status))
    else:
        client.set_terminated(run_id, RunStatus.to_string(status))
