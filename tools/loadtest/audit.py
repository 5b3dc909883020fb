"""Counting a finished load level's trials: duplicated and lost, in the study and in the MLflow runs."""

from __future__ import annotations

from typing import Any


def audit_study(study, n_trials: int, client, experiment: str, study_name: str) -> dict[str, Any]:
    """Duplicated and lost trials, by the study's trial numbers and by the MLflow child runs."""
    from optuna.trial import TrialState

    from tfsweep import sweep_tracking

    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    runs = []
    if client is not None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], sweep_tracking.runs_filter(study_name, "trial"),
                                  max_results=50000)
    run_numbers = [int(r.data.tags.get(sweep_tracking.NUMBER_TAG, -1)) for r in runs]
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    return {
        "study_trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": [{"number": t.number, "reason": t.user_attrs.get("fail_reason")}
                   for t in trials if t.state == TrialState.FAIL],
        "left_running": sum(not t.state.is_finished() for t in trials),
        "duplicated_trials": (len(numbers) - len(set(numbers))) + max(0, len(trials) - n_trials),
        "lost_trials": len(set(range(n_trials)) - {t.number for t in finished}),
        "mlflow_runs": len(runs),
        "duplicated_runs": len(run_numbers) - len(set(run_numbers)),
        "lost_runs": len(set(range(n_trials)) - set(run_numbers)),
        "runs_not_finished": sum(r.info.status != "FINISHED" for r in runs),
    }
