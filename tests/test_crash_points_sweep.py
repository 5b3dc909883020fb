"""Kill the real `src/sweep.py` at each named point of a sweep, rerun it until it exits 0, and check that
the record is the one an uninterrupted sweep leaves: exact trials, each step once, one run per trial,
nothing left running, the same best value and test accuracy.

Each case is a list of kills: the first run dies at the first point, the rerun at the second (if any),
and so on; the last rerun runs clean. `point:n` dies at the n-th time the point is reached.
"""

from __future__ import annotations

import collections
import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweep_fixtures import journal_trials, sweep_command, sweep_env, tiny_overrides
from tfsweep.crashpoints import ENV

pytestmark = pytest.mark.slow

N_TRIALS = 2  # enough for every point below: each names an occurrence within two trials
CASES = {  # id: the kills, in order
    "after_trial_created": ["sweep.after_trial_created:2"],
    "before_owner_recorded": ["sweep.before_owner_recorded:2"],
    "after_owner_recorded": ["sweep.after_owner_recorded:2"],
    "after_parent_run_created": ["sweep.after_parent_run_created"],
    "mid_trial_after_report": ["sweep.after_report:3"],
    "mid_trial_after_checkpoint": ["trainer.after_checkpoint:3"],
    "after_tell": ["sweep.after_tell:2"],
    "during_recovery": ["sweep.after_owner_recorded:2", "sweep.after_trial_failed"],
    "during_best_test": ["sweep.during_best_test"],
    "during_plotting": ["sweep.during_plotting:2"],
    "during_publishing": ["sweep.during_publishing"],
    "after_model_registered": ["sweep.after_model_registered"],
}


def overrides(tmp: Path) -> list[str]:
    return tiny_overrides(tmp, steps=20) + [f"sweep.n_trials={N_TRIALS}", "trainer.log_every=5"]


def sweep(tmp: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in sweep_env().items() if k != ENV}
    if crash_at:
        env[ENV] = crash_at
    return subprocess.run(sweep_command(overrides(tmp)), env=env, capture_output=True, text=True, timeout=600)


def record(tmp: Path) -> dict:
    """What the sweep left: Optuna's trials and MLflow's runs, read through their own clients."""
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id], "tags.`sweep.study_name` = 'tiny'", max_results=1000)
    by_role = collections.defaultdict(list)
    for run in runs:
        by_role[run.data.tags["sweep.role"]].append(run)
    return {"client": client, "trials": journal_trials(tmp / "tiny" / "journal.log", "tiny"),
            "parents": by_role["study"], "children": by_role["trial"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, float]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = sweep(tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    [parent] = record(tmp)["parents"]
    trials = record(tmp)["trials"]

    # Running the finished sweep again changes nothing and says so.
    again = sweep(tmp)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert len(record(tmp)["trials"]) == len(trials)
    assert [len(record(tmp)["client"].get_metric_history(parent.info.run_id, key)) for key in
            ("best_value", "best_test_accuracy")] == [1, 1]
    return {key: parent.data.metrics[key] for key in ("best_value", "best_test_accuracy")}


@pytest.mark.parametrize("kills", list(CASES.values()), ids=list(CASES))
def test_a_sweep_killed_at_a_named_point_and_rerun_leaves_the_uninterrupted_record(tmp_path, kills, uninterrupted):
    for point in kills:
        killed = sweep(tmp_path, crash_at=point)
        assert killed.returncode == -9, f"{point} was never reached: {killed.stderr[-3000:]}"
    reruns = 0
    while (result := sweep(tmp_path)).returncode != 0:
        reruns += 1
        assert reruns < 3, result.stderr[-3000:]

    seen = record(tmp_path)
    trials, children, client = seen["trials"], seen["children"], seen["client"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == N_TRIALS
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in trials)  # nothing running or waiting
    assert all("fail_reason" not in t.user_attrs for t in trials)  # a failed trial is an interrupted one

    # One child run per trial and one parent, all finished.
    [parent] = seen["parents"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in complete)
    assert {r.info.status for r in children + [parent]} == {"FINISHED"}
    # No metric step logged twice, in any child or in the parent.
    for run in children + [parent]:
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{key} of run {run.info.run_name} has steps {steps}"

    # The same outcome as a sweep that was never interrupted.
    assert {key: parent.data.metrics[key] for key in uninterrupted} == uninterrupted
