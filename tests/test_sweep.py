"""The sweep on a tiny synthetic data set, checked through Optuna's and MLflow's own clients."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf, open_dict
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from sweep_fixtures import PROJECT_DIR, journal_trials, run_sweep_command, sweep_command, sweep_env, tiny_overrides
from tfsweep.errors import UserError
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import ParamSpec, compose_sweep

EXPERIMENT = "mnist-cnn"  # tracking.experiment_name for data=mnist, model=cnn


def sweep_cfg(tmp: Path, *extra: str, params: dict | None = None, study: str = "tiny", steps: int = 30):
    cfg = compose_sweep(tiny_overrides(tmp, study=study, steps=steps) + list(extra))
    if params is not None:
        with open_dict(cfg):
            cfg.sweep.params = {name: ParamSpec(**spec) for name, spec in params.items()}
    return cfg


def load(cfg) -> optuna.Study:
    return optuna.load_study(study_name=cfg.sweep.study_name,
                             storage=JournalStorage(JournalFileBackend(cfg.sweep.storage)))


def runs(tmp: Path, role: str, study: str = "tiny") -> list:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.`sweep.role` = '{role}' and "
                              f"tags.`sweep.study_name` = '{study}'", max_results=1000)


def test_tiny_sweep_records_each_trial_as_a_child_run_with_its_params_and_validation_curve(tmp_path):
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=3", "tracking.log_checkpoints=true")
    result = run_sweep(cfg)

    study = load(cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert result["n_complete"] == 3 and result["n_pruned"] == result["n_failed"] == 0
    assert result["best_value"] == study.best_value and result["best_params"] == study.best_params
    assert all(row["seconds"] > row["training_seconds"] > 0 for row in result["trials"])

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [parent] = runs(tmp_path, "study")
    children = runs(tmp_path, "trial")
    assert len(children) == 3
    by_number = {int(run.data.tags["optuna.trial_number"]): run for run in children}
    assert sorted(by_number) == [0, 1, 2]
    for trial in study.trials:
        child = by_number[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.state"] == "complete"
        assert {k: child.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        curve = client.get_metric_history(child.info.run_id, "val/accuracy")
        # Every validation evaluation was reported to Optuna, and the objective is the last one.
        assert {m.step: m.value for m in curve} == trial.intermediate_values
        assert trial.value == max(curve, key=lambda m: m.step).value
        assert not any(key.startswith("test/") for key in child.data.metrics)  # trials never see the test split

    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["best_value"] == study.best_value
    assert parent.data.tags["best.trial_number"] == str(study.best_trial.number)
    assert {k: parent.data.tags[f"best.{k}"] for k in study.best_params} == {
        k: str(v) for k, v in study.best_params.items()}
    assert parent.data.metrics["best_test_accuracy"] == result["best_test_accuracy"]
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{name}.png" for name in
                     ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")}

    # The written best config is a config src/train.py takes, with the best trial's values.
    best_file = Path(result["best_config"])
    shown = subprocess.run([*sweep_command([])[:1], str(PROJECT_DIR / "src" / "train.py"), "--config-dir",
                            str(best_file.parent), "--config-name", best_file.stem, "--cfg", "job"],
                           env=sweep_env(), cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    best = OmegaConf.create(shown.stdout)
    for name, value in study.best_params.items():
        if name == "optimizer":
            assert ("beta_1" in best.optimizer) == (value == "adam")
        else:
            assert OmegaConf.select(best, name) == value
    assert best.trainer.evaluate_test is True

    # Running the finished study again adds nothing, keeps the parent run, and does not re-test.
    again = run_sweep(cfg)
    assert len(load(cfg).trials) == 3 and again["mlflow_parent_run_id"] == parent.info.run_id
    assert len(runs(tmp_path, "study")) == 1
    assert len(client.get_metric_history(parent.info.run_id, "best_test_accuracy")) == 1

    # Where the best trial's folder is missing (it ran on another machine), its logged checkpoints are used.
    shutil.rmtree(study.best_trial.user_attrs["trial_dir"])
    client.delete_tag(parent.info.run_id, "best.test_trial_number")
    assert run_sweep(cfg)["best_test_accuracy"] == result["best_test_accuracy"]


def test_aggressive_pruner_prunes_and_pruned_trials_keep_their_curves(tmp_path):
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=5", "sweeps/sampler=random", "sweeps/pruner=median",
                    "sweep.pruner.n_startup_trials=1", "sweep.pruner.n_warmup_steps=0",
                    steps=40, params={"optimizer.learning_rate": {"type": "float", "low": 1e-5, "high": 0.3,
                                                                  "log": True}})
    result = run_sweep(cfg)
    pruned = [t for t in load(cfg).trials if t.state == TrialState.PRUNED]
    assert result["n_pruned"] == len(pruned) >= 1
    assert result["n_complete"] + result["n_pruned"] == 5
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    children = {int(r.data.tags["optuna.trial_number"]): r for r in runs(tmp_path, "trial")}
    for trial in pruned:
        child = children[trial.number]
        assert child.data.tags["optuna.state"] == "pruned" and child.info.status == "FINISHED"
        curve = client.get_metric_history(child.info.run_id, "val/accuracy")
        assert curve and max(m.step for m in curve) < 40  # stopped early, curve kept


def test_a_diverging_trial_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path):
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=2", params={
        "optimizer.learning_rate": {"type": "categorical", "choices": [1.0e12]}})
    result = run_sweep(cfg)
    trials = load(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("loss" in t.user_attrs["fail_reason"] for t in trials)
    assert result["n_failed"] == 2 and result["best_value"] is None
    assert {r.data.tags["optuna.state"] for r in runs(tmp_path, "trial")} == {"failed"}


@pytest.mark.parametrize("change, message", [
    ({"params.model.dropot": {"type": "float", "low": 0.0, "high": 0.5}}, "sweep.params.model.dropot"),
    ({"params.model.dropout": {"type": "float", "low": 0.5, "high": 0.1}}, "sweep.params.model.dropout.*low"),
    ({"params.optimizer.learning_rate": {"type": "float", "low": 0.0, "high": 0.1, "log": True}},
     "sweep.params.optimizer.learning_rate.*low"),
    ({"params.optimizer.learning_rate": {"type": "float", "low": 1e-4, "high": 0.1, "log": True, "step": 0.01}},
     "sweep.params.optimizer.learning_rate"),
    ({"params.optimizer": {"type": "categorical", "choices": ["adamw"]}}, "sweep.params.optimizer.*adamw"),
    ({"params.optimizer": {"type": "categorical", "choices": []}}, "sweep.params.optimizer.*choices"),
    ({"params.model.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "sweep.params.model.dropout.*1.5"),
    ({"params.data.batch_size": {"type": "int", "low": 0, "high": 64}}, "sweep.params.data.batch_size"),
    ({"sampler": {"_target_": "optuna.samplers.GridOfDreams"}}, "sweep.sampler"),
    ({"pruner": {"_target_": "optuna.pruners.MedianPruner", "patience": 3}}, "sweep.pruner"),
    ({"metric": "test/accuracy"}, "sweep.metric"),
    ({"n_trials": 0}, "sweep.n_trials"),
    ({"timeout": -1}, "sweep.timeout"),
    ({"storage": "mysql://nobody@127.0.0.1:1/none"}, "sweep.storage"),
    ({"storage": "postgresql://nobody@127.0.0.1:1/none"}, "sweep.storage"),
])
def test_bad_input_fails_in_one_sentence_before_any_trial_and_leaves_the_study_intact(tmp_path, change, message):
    cfg = sweep_cfg(tmp_path, "sweep.n_trials=1")
    Path(cfg.sweep.storage).parent.mkdir(parents=True)
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(cfg.sweep.storage)),
                                direction="maximize")
    study.add_trial(optuna.create_trial(value=0.5, params={"model.dropout": 0.2},
                                        distributions={"model.dropout": optuna.distributions.FloatDistribution(0, 0.7)}))
    journal_file, trials_dir = Path(cfg.sweep.storage), Path(cfg.sweep.dir) / "trials"
    journal = journal_file.read_bytes()
    (key, value), = change.items()
    with open_dict(cfg):
        if key.startswith("params."):
            cfg.sweep.params[key.removeprefix("params.")] = ParamSpec(**value)
        else:
            node, leaf = (cfg.sweep, key) if "." not in key else (cfg.sweep[key.split(".")[0]], key.split(".")[1])
            node[leaf] = value
    with pytest.raises(UserError, match=message) as error:
        run_sweep(cfg)
    assert "\n" not in str(error.value)
    assert journal_file.read_bytes() == journal
    assert not trials_dir.exists()


def test_command_line_errors_exit_non_zero_with_the_key_named(tmp_path):
    result = run_sweep_command(tiny_overrides(tmp_path) + ["sweeps/pruner=patient"])
    assert result.returncode == 1
    assert "Could not find 'sweeps/pruner/patient'" in result.stdout + result.stderr
    assert not journal_trials(tmp_path / "tiny" / "journal.log", "tiny")


def test_killed_sweep_resumes_with_exactly_the_requested_trials_and_no_duplicate_runs(tmp_path):
    overrides = tiny_overrides(tmp_path, steps=300) + ["sweep.n_trials=3"]
    journal = tmp_path / "tiny" / "journal.log"
    process = subprocess.Popen(sweep_command(overrides), env=sweep_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline, victim = time.monotonic() + 180, None
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        trials = journal_trials(journal, "tiny")
        for trial in trials:  # a claimed, running trial with a checkpoint, after a completed one
            model_dir = tmp_path / "tiny" / "trials" / f"{trial.number:04d}" / "model"
            if (trial.state == TrialState.RUNNING and trial.user_attrs.get("claimed_trial") == trial.number
                    and any(t.state == TrialState.COMPLETE for t in trials) and any(model_dir.glob("ckpt-*.index"))):
                victim = trial
        time.sleep(0.1)
    process.kill()
    killed_at_ms = time.time() * 1000
    process.wait()
    assert victim is not None, "the sweep never reached a second trial"

    result = run_sweep_command(overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = journal_trials(journal, "tiny")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) == 3 and [t.number for t in failed] == [victim.number]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params

    children = runs(tmp_path, "trial")
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in complete)
    # The retry continued the interrupted trial's run and checkpoints instead of starting over.
    [resumed] = [r for r in children if r.data.tags["optuna.trial_number"] == str(retry.number)]
    assert resumed.data.tags["model_dir"].endswith(f"trials/{victim.number:04d}/model")
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(resumed.info.run_id, "train/loss")
    assert {m.step for m in history} == set(range(5, 301, 5))
    assert min(m.step for m in history if m.timestamp > killed_at_ms) > 5


def test_two_workers_share_one_study_without_duplicates(tmp_path):
    overrides = tiny_overrides(tmp_path, steps=150) + ["sweep.n_trials=6"]
    workers = [subprocess.Popen(sweep_command(overrides), env=sweep_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    trials = journal_trials(tmp_path / "tiny" / "journal.log", "tiny")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers took trials
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("surplus") for t in trials)
    assert len(runs(tmp_path, "study")) == 1
    children = runs(tmp_path, "trial")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in complete)
