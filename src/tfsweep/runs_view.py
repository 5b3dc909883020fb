"""The runs table's saved view: the objective, the test accuracy, each trial's outcome and the settings
that were varied as columns, so that the address `make ui` prints shows the answer without adding any.

MLflow (3.16 on) keeps a saved view as an experiment tag `mlflow.sharedViewState.<id>`, a JSON envelope
of a name and the page state; the runs page lists it under "Views" and opens it from
`?viewStateShareKey=<id>`. Each writer adds its columns to the ones already there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

VIEW_ID = "tfsweep"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
VIEW_NAME = "Objective and varied settings"
MLFLOW_COLUMNS = ("attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`")  # the page's own default
METRICS = ("val/accuracy", "test/accuracy")
TAGS = ("optuna.state",)  # a trial's outcome: COMPLETE, PRUNED or FAIL (sweep_tracking.STATE_TAG)


def column(kind: str, key: str) -> str:
    """A runs-table column as MLflow names it: metrics.`val/accuracy`, params.`model.dropout`."""
    return f"{kind}.`{key}`"


def view_columns(tag_value: str | None) -> list[str]:
    """The selected columns of a stored view; [] when there is none, or it is not one this module wrote."""
    try:
        return list(json.loads(json.loads(tag_value)["state"])["selectedColumns"])
    except (TypeError, ValueError, KeyError):
        return []


def save_view(client: MlflowClient, experiment_id: str, params: Iterable[str], attempts: int = 3) -> None:
    """Show `params` (MLflow param names) beside the objective in the experiment's saved view.

    Commands started together race to create the tag: MLflow's store reads, then inserts it, and the
    second insert fails. The loser reads the winner's view and adds its columns to that.
    """
    wanted = [*MLFLOW_COLUMNS, *(column("metrics", m) for m in METRICS), *(column("tags", t) for t in TAGS)]
    params = [column("params", p) for p in params]
    for attempt in range(attempts):
        shown = view_columns(client.get_experiment(experiment_id).tags.get(VIEW_TAG))
        columns = [*wanted, *(c for c in shown if c not in wanted), *(c for c in params if c not in shown)]
        if columns == shown:
            return
        state = {"selectedColumns": columns}
        envelope = {"name": VIEW_NAME, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        try:
            client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope))
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise


def has_view(tags: dict[str, str]) -> bool:
    return VIEW_TAG in tags
