"""Kill the real `src/sweep.py` at each named point of a sweep, rerun it until it exits 0, and check that
the record is the one an uninterrupted sweep leaves: exact trials, each step once, one run per trial,
nothing left running, the same best value and test accuracy.

Each case is a list of kills: the first run dies at the first point, the rerun at the second (if any),
and so on; the last rerun runs clean. `point:n` dies at the n-th time the point is reached.

The cases share nothing but the code: each has its own folder, journal and MLflow store. So they run two
at a time, like the uninterrupted reference beside them; each process still pays its own imports.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweep_fixtures import journal_trials, sweep_command, sweep_env, tiny_overrides
from tfsweep import tracking_store
from tfsweep.crashpoints import ENV

pytestmark = pytest.mark.slow

N_TRIALS = 2  # enough for every point below: each names an occurrence within two trials
MAX_RERUNS = 3  # clean reruns a case may need before one exits 0
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


def output(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-3000:]  # the sweep logs its errors to stdout


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


def reference(tmp: Path) -> dict:
    """The uninterrupted sweep, then the same command once more."""
    first = sweep(tmp)
    return {"first": first, "before_again": record(tmp) if first.returncode == 0 else None, "again": sweep(tmp)}


def interrupted(tmp: Path, kills: list[str]) -> dict:
    """The command killed at each point in turn (stopping at a point it does not reach), then rerun clean
    until it exits 0, at most MAX_RERUNS times."""
    killed = []
    for point in kills:
        killed.append(sweep(tmp, crash_at=point))
        if killed[-1].returncode != -9:
            return {"killed": killed, "reruns": []}
    reruns = [sweep(tmp)]
    while reruns[-1].returncode != 0 and len(reruns) < MAX_RERUNS:
        reruns.append(sweep(tmp))
    return {"killed": killed, "reruns": reruns}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict:
    """The reference and every selected case (all, unless `-k` chose some), two sweep commands at a time,
    each in its own folder."""
    selected = {item.callspec.params["case"] for item in request.session.items
                if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    jobs = {None: (reference, tmp_path_factory.mktemp("uninterrupted"))}
    jobs.update({case: (lambda tmp, kills=kills: interrupted(tmp, kills), tmp_path_factory.mktemp(case))
                 for case, kills in CASES.items() if case in selected})
    # MLflow's tables, created once (~10 s of migrations) and copied: every sweep meets an existing, empty
    # store. No point below lies in the store's creation; the fast sweep tests start from no store.
    empty_store = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    tracking_store.connect(f"sqlite:///{empty_store}")
    for _, tmp in jobs.values():
        shutil.copyfile(empty_store, tmp / "mlflow.db")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case: pool.submit(job, tmp) for case, (job, tmp) in jobs.items()}
        return {case: {"tmp": jobs[case][1], **future.result()} for case, future in futures.items()}


@pytest.fixture(scope="module")
def uninterrupted(outcomes) -> dict[str, float]:
    result = outcomes[None]["first"]
    assert result.returncode == 0, output(result)
    [parent] = outcomes[None]["before_again"]["parents"]
    return {key: parent.data.metrics[key] for key in ("best_value", "best_test_accuracy")}


def test_the_finished_sweep_run_again_changes_nothing_and_says_so(outcomes, uninterrupted):
    before, again, now = outcomes[None]["before_again"], outcomes[None]["again"], record(outcomes[None]["tmp"])
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert len(now["trials"]) == len(before["trials"])
    [parent] = now["parents"]
    assert [len(now["client"].get_metric_history(parent.info.run_id, key)) for key in
            ("best_value", "best_test_accuracy")] == [1, 1]
    assert {key: parent.data.metrics[key] for key in uninterrupted} == uninterrupted


@pytest.mark.parametrize("case", list(CASES))
def test_a_sweep_killed_at_a_named_point_and_rerun_leaves_the_uninterrupted_record(outcomes, case, uninterrupted):
    got = outcomes[case]
    for point, killed in zip(CASES[case], got["killed"]):
        assert killed.returncode == -9, f"{point} was never reached: {output(killed)}"
    assert len(got["killed"]) == len(CASES[case])
    assert got["reruns"][-1].returncode == 0, output(got["reruns"][-1])

    seen = record(got["tmp"])
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
