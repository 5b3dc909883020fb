"""Every sweep ends with an answer: whatever stops it (its budget, its timeout, SIGTERM), the trials finished
so far are published with the best one's test accuracy and its `champion` model, and no pruner of
sweeps/pruner/ can stop every trial of a study."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweep_fixtures import PROJECT_DIR, journal_trials, sweep_command, sweep_env, tiny_overrides
from tfsweep import study as studies
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import build, check, compose_sweep

PRUNERS = sorted(p.stem for p in (PROJECT_DIR / "sweeps" / "pruner").glob("*.yaml"))


def overrides(tmp: Path, *extra: str, steps: int = 40) -> list[str]:
    """The tiny sweep with the default sweep's own pruner (tiny_overrides turns pruning off)."""
    return [o for o in tiny_overrides(tmp, steps=steps) if o != "sweeps/pruner=none"] + list(extra)


def parent(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("mnist-cnn").experiment_id],
                               "tags.`sweep.role` = 'study'")
    return client, run


def assert_published(tmp: Path, result: dict, ended_by: str, status: str):
    client, run = parent(tmp)
    assert run.info.status == status and run.data.tags["sweep.ended_by"] == ended_by
    assert run.data.tags["best.trial_number"] == str(result["best_trial"])
    assert 0 <= run.data.metrics["best_test_accuracy"] <= 1
    assert "best_trial.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert run.data.tags["best.model_uri"] == f"models:/mnist-cnn/{champion.version}"
    best_run = client.get_run(champion.run_id)
    assert best_run.data.tags["optuna.trial_number"] == str(result["best_trial"])
    return client, run


# -- pruners, through Optuna alone -----------------------------------------------------------------
def simulate(pruner: optuna.pruners.BasePruner, curves: list[list[float]], eval_every: int) -> list[TrialState]:
    """Each curve is one trial's validation metric at its evaluations; the trial reports them as the
    sweep's PruningHook does and stops where the pruner says."""
    study = optuna.create_study(direction="maximize", pruner=pruner, study_name="simulated")
    for curve in curves:
        trial = study.ask()
        for index, value in enumerate(curve):
            step = (index + 1) * eval_every
            trial.report(value, step)
            if index + 1 < len(curve) and trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, curve[-1])
    return [t.state for t in study.trials]


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("steps, eval_every", [(800, 200), (1000, 200), (200, 50)])
def test_no_pruner_stops_the_leader_at_a_rung(name, steps, eval_every):
    sweep = check(compose_sweep([f"sweeps/pruner={name}", f"trainer.steps={steps}", f"trainer.eval_every={eval_every}"]))
    evaluations = steps // eval_every
    # A study whose first trial is the best at every step: it finishes, whatever comes after it.
    falling = [[0.9 - 0.01 * n + 0.001 * e for e in range(evaluations)] for n in range(10)]
    states = simulate(build("pruner", sweep.pruner), falling, eval_every)
    assert states[0] == TrialState.COMPLETE, states
    # Each trial better than all before it at every step: every one leads, so none is stopped.
    rising = [[0.5 + 0.01 * n + 0.001 * e for e in range(evaluations)] for n in range(10)]
    assert simulate(build("pruner", sweep.pruner), rising, eval_every) == [TrialState.COMPLETE] * 10


# -- sweeps ----------------------------------------------------------------------------------------
def test_a_three_trial_sweep_with_the_default_pruner_ends_with_its_champion(tmp_path):
    cfg = compose_sweep(overrides(tmp_path, "sweep.n_trials=3"))
    assert cfg.sweep.pruner._target_ == "optuna.pruners.SuccessiveHalvingPruner"  # the default sweep's
    result = run_sweep(cfg)
    assert result["published"] and result["n_complete"] >= 1
    assert_published(tmp_path, result, "n_trials", "FINISHED")


def test_a_sweep_stopped_by_its_timeout_publishes_and_its_rerun_continues_and_publishes_again(tmp_path):
    cfg = compose_sweep(tiny_overrides(tmp_path) + ["sweep.n_trials=50", "sweep.timeout=1"])
    first = run_sweep(cfg)  # the timeout lets the first trial finish, then stops the command
    assert first["published"] and 1 <= first["n_complete"] < 50
    client, run = assert_published(tmp_path, first, "timeout", "FINISHED")
    assert run.data.tags["sweep.published_trials"] == str(first["n_complete"])

    second = run_sweep(cfg)
    assert second["published"] and second["mlflow_parent_run_id"] == run.info.run_id
    assert first["n_complete"] < second["n_complete"] < 50
    client, run = assert_published(tmp_path, second, "timeout", "FINISHED")  # the same, one parent run
    assert run.data.tags["sweep.published_trials"] == str(second["n_complete"])
    counts = client.get_metric_history(run.info.run_id, "n_complete")
    assert sorted((m.step, m.value) for m in counts) == [(n, float(n)) for n in (first["n_complete"],
                                                                                 second["n_complete"])]


def test_sigterm_that_a_library_turns_into_another_error_still_ends_the_sweep(tmp_path, monkeypatch):
    """OmegaConf's cleanup replaces a KeyboardInterrupt landing inside it by a ConfigKeyError: the trial
    must still count as interrupted (retried later) and the sweep end, not go on."""
    from tfsweep import sweep_trial

    real, calls = sweep_trial.trial_config, []

    def trial_config(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt:
                raise ValueError("'NoneType' object has no attribute '_invalidate_flags_cache'") from None
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_trial, "trial_config", trial_config)
    cfg = compose_sweep(tiny_overrides(tmp_path, steps=20) + ["sweep.n_trials=3"])
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg)
    trials = journal_trials(tmp_path / "tiny" / "journal.log", "tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert "fail_reason" not in trials[1].user_attrs  # not counted: queued again, for the next run
    assert [studies.retry_history(t) for t in trials[2:]] == [[], [1]]  # the budget's third trial, and the retry
    assert_published(tmp_path, {"best_trial": 0}, "interrupted", "KILLED")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_sweep_ended_by_sigterm_publishes_what_it_finished_and_its_trial_is_retried_later(tmp_path):
    command = sweep_command(tiny_overrides(tmp_path, steps=400) + ["sweep.n_trials=5"])
    process = subprocess.Popen(command, env=sweep_env(), cwd=PROJECT_DIR, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    journal, deadline = tmp_path / "tiny" / "journal.log", time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        trials = journal_trials(journal, "tiny")
        if any(t.state == TrialState.COMPLETE for t in trials) and any(
                t.state == TrialState.RUNNING and t.user_attrs.get("claimed_trial") == t.number for t in trials):
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=180)[0]
    assert process.returncode == 130, output[-3000:]
    trials = journal_trials(journal, "tiny")
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 1 and "fail_reason" not in interrupted[0].user_attrs  # retried, not counted
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert_published(tmp_path, {"best_trial": best.number}, "interrupted", "KILLED")
    assert "run the same command again to continue" in output


# -- who publishes ---------------------------------------------------------------------------------
def test_one_worker_publishes_trials_that_several_workers_leave_even_after_the_first_has_exited(tmp_path, monkeypatch):
    """Workers on a database wait for each other's trials and leave seconds apart: the first to leave
    publishes, and a later one with no trial finished since does not publish again, whether the first is
    still at it or has exited; it does if the first died before it was done."""
    from tfsweep.sweep_results import is_publisher, mark_published

    sweep = check(compose_sweep(tiny_overrides(tmp_path) + [f"sweep.storage=sqlite:///{tmp_path}/optuna.db"]))
    study = studies.load_study(sweep, studies.open_storage(sweep))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.9))
    me, alive = {"worker": "a:1"}, {"a:1", "b:2", "c:3"}
    monkeypatch.setattr(studies, "worker_id", lambda: me["worker"])
    monkeypatch.setattr(studies, "worker_alive", lambda worker: worker in alive)

    assert is_publisher(study, sweep, already_finished=False)  # a leaves first
    me["worker"] = "b:2"
    assert not is_publisher(study, sweep, already_finished=False)  # a is publishing
    me["worker"] = "a:1"
    mark_published(study, sweep)
    alive.discard("a:1")  # a published and exited
    me["worker"] = "b:2"
    assert not is_publisher(study, sweep, already_finished=False)

    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.8))  # a retry finished since
    assert is_publisher(study, sweep, already_finished=False)
    alive.discard("b:2")  # b died while publishing it
    me["worker"] = "c:3"
    assert is_publisher(study, sweep, already_finished=False)
