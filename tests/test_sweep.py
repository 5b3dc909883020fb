"""The sweep on a tiny synthetic data set, checked through Optuna's and MLflow's own clients."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf, open_dict
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from optuna_dashboard import get_note

from sweep_fixtures import PROJECT_DIR, journal_trials, run_sweep_command, sweep_command, sweep_env, tiny_overrides
from tfsweep import study as studies
from tfsweep.errors import UserError
from tfsweep.journal import DamagedJournalError, check_journal
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import ParamSpec, SweepConfig, build, check, compose_sweep

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


@pytest.mark.parametrize("definition", sorted(p.stem for p in (PROJECT_DIR / "sweeps").glob("*.yaml")))
@pytest.mark.parametrize("sampler", sorted(p.stem for p in (PROJECT_DIR / "sweeps" / "sampler").glob("*.yaml")))
def test_every_sweep_definition_builds_with_every_sampler(definition, sampler):
    # A sweep file that set a TPE-only key under sweep.sampler broke `sweeps/sampler=random` with it.
    cfg = compose_sweep([f"sweeps={definition}", f"sweeps/sampler={sampler}"])
    sweep = check(cfg)
    built = build("sampler", sweep.sampler, seed=sweep.seed)
    assert type(built).__name__.lower().startswith(sampler)


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
    assert study.metric_names == ["val/accuracy"]  # the dashboard's axis name
    for trial in study.trials:
        child = by_number[trial.number]
        assert child.info.run_name == f"trial-{trial.number:04d}"
        # The dashboard links each trial to its run, on the server `mlflow ui` starts by default.
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert trial.user_attrs["mlflow_run_url"] == (
            f"http://127.0.0.1:5000/#/experiments/{child.info.experiment_id}/runs/{child.info.run_id}")
        assert get_note(optuna.Trial(study, trial._trial_id)) == f"MLflow run [{child.info.run_name}]({trial.user_attrs['mlflow_run_url']})"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["optuna.state"] == "complete"
        assert {k: child.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        curve = client.get_metric_history(child.info.run_id, "val/accuracy")
        # Every validation evaluation was reported to Optuna, and the objective is the last one.
        assert {m.step: m.value for m in curve} == trial.intermediate_values
        assert trial.value == max(curve, key=lambda m: m.step).value
        assert not any(key.startswith("test/") for key in child.data.metrics)  # trials never see the test split

    parent = client.get_run(parent.info.run_id)
    # Few, readable params: the settings, and each searched key's range (a timeout of None is no param).
    assert set(parent.data.params) == {"n_trials", "n_workers", "objective", "seed", "sampler", "pruner", "storage",
                                       *(f"space.{name}" for name in study.best_params)}
    assert parent.data.params["objective"] == "maximize val/accuracy"
    assert parent.data.params["pruner"] == "NopPruner()"
    assert all(parent.data.params[f"space.{name}"].split()[0] in ("float", "int", "one")
               for name in study.best_params)
    assert parent.data.metrics["best_value"] == study.best_value
    assert parent.data.tags["best.trial_number"] == str(studies.best_trial(study).number)
    assert {k: parent.data.tags[f"best.{k}"] for k in study.best_params} == {
        k: str(v) for k, v in study.best_params.items()}
    assert parent.data.metrics["best_test_accuracy"] == result["best_test_accuracy"]
    # The run page opens on the answer: its description names the best trial and its test accuracy.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Best: trial {studies.best_trial(study).number}**, val/accuracy {study.best_value:.4f}, "
                           f"test accuracy {result['best_test_accuracy']:.4f}")
    assert "3 trials (3 complete); all of sweep.n_trials done." in note and "drawn from 5 complete trials on" in note
    assert "best_trial.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/optimization_history.png", "plots/intermediate_values.png"}  # 3 complete trials

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
    assert [len(client.get_metric_history(parent.info.run_id, key)) for key in
            ("best_value", "best_test_accuracy", "n_complete")] == [1, 1, 1]
    assert again["best_test_accuracy"] == result["best_test_accuracy"] and not again["published"]

    # Where the best trial's folder is missing (it ran on another machine), its logged checkpoints are used.
    shutil.rmtree(study.best_trial.user_attrs["trial_dir"])
    client.delete_tag(parent.info.run_id, "best.test_trial_number")
    assert run_sweep(cfg)["best_test_accuracy"] == result["best_test_accuracy"]


def test_a_trial_retried_on_a_machine_without_its_folder_resumes_from_the_checkpoint_its_run_logged(
        tmp_path, monkeypatch):
    """Uploads while training, as to a tracking server; the first attempt stops after its first
    checkpoint, and its folder is gone when the study is resumed (the retry runs elsewhere)."""
    from tfsweep import checkpoint_artifacts, trainer, tracking

    cfg = sweep_cfg(tmp_path, "sweep.n_trials=1", "tracking.log_checkpoints=true")
    uploaded = []
    real_saved = checkpoint_artifacts.CheckpointUploader.saved

    def saved(self, model_dir, path):
        uploaded.append(Path(path).name)
        real_saved(self, model_dir, path)

    def stop_after_first_checkpoint(name):
        if name == "trainer.after_checkpoint":
            raise KeyboardInterrupt  # the worker is stopped; the trial is interrupted, not failed

    monkeypatch.setattr(tracking, "uploads_while_training", lambda uri: True)
    monkeypatch.setattr(checkpoint_artifacts.CheckpointUploader, "saved", saved)
    with monkeypatch.context() as patched:
        patched.setattr(trainer, "crashpoint", stop_after_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(cfg)
    assert uploaded == ["ckpt-10"]
    [first] = runs(tmp_path, "trial")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert {a.path for a in client.list_artifacts(first.info.run_id, "checkpoints")} >= {
        "checkpoints/checkpoint", "checkpoints/ckpt-10.index"}

    shutil.rmtree(tmp_path / "tiny" / "trials")
    from tfsweep import sweep_trial

    restored = []
    real_restore = sweep_trial.restore_first_attempt
    monkeypatch.setattr(sweep_trial, "restore_first_attempt",
                        lambda *args: restored.append(real_restore(*args)) or restored[-1])
    result = run_sweep(cfg)

    assert result["n_complete"] == 1 and [t.state for t in load(cfg).trials] == [TrialState.FAIL,
                                                                                 TrialState.COMPLETE]
    [child] = runs(tmp_path, "trial")  # the retry continued the first attempt's run
    assert child.info.run_id == first.info.run_id and child.info.status == "FINISHED"
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [5, 10, 15, 20, 25, 30]  # each step once
    assert restored == [10]  # the retry started from the logged checkpoint, not from step 0
    assert uploaded == ["ckpt-10", "ckpt-20", "ckpt-30"]


def test_a_trial_note_of_several_chunks_reads_back_in_the_dashboard():
    from tfsweep.sweep_trial import NOTE_CHUNK, save_trial_note

    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    body = "".join(chr(ord("a") + i % 26) for i in range(2 * NOTE_CHUNK + 7))
    save_trial_note(first, body)
    save_trial_note(second, "[run](http://127.0.0.1:5000/#/experiments/1/runs/abc)")
    assert get_note(first) == body and get_note(second).endswith("runs/abc)")


def test_run_url_never_carries_credentials():
    from tfsweep.sweep_trial import run_url

    assert run_url("https://user:secret@mlflow.example:8443/base/", "3", "abc") == (
        "https://mlflow.example:8443/base/#/experiments/3/runs/abc")
    assert run_url("postgresql://tfsweep@db/mlflow", "1", "r") == "http://127.0.0.1:5000/#/experiments/1/runs/r"


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
        # Told apart in the runs table by its name, which says where its metrics stop.
        assert child.info.run_name == f"trial-{trial.number:04d} pruned@{max(trial.intermediate_values)}"
    complete = [children[t.number] for t in load(cfg).trials if t.state == TrialState.COMPLETE]
    assert all("pruned" not in run.info.run_name for run in complete)


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
    [parent] = runs(tmp_path, "study")
    children = runs(tmp_path, "trial")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in complete)
    # Only the worker that finished the study published it: one final summary, one best value.
    assert sum("best trial" in output for output in outputs) == 1, outputs
    assert parent.info.status == "FINISHED"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(parent.info.run_id, "best_value")
    assert len(history) == 1


# -- the journal and dead workers, through Optuna alone (no training) -------------------------------
def finished_study(tmp: Path, n: int = 2) -> tuple[Path, optuna.Study]:
    path = tmp / "journal.log"
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(path))),
                                direction="maximize")
    for value in range(n):
        study.add_trial(optuna.create_trial(value=value, params={"model.dropout": 0.1 * value},
                                            distributions={"model.dropout": FloatDistribution(0, 0.7)}))
    return path, study


def test_a_journal_cut_in_its_last_line_is_repaired_with_a_backup_and_keeps_every_finished_trial(tmp_path):
    path, _ = finished_study(tmp_path)
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"op_code": 6, "worker_id": "x", "tri')  # a crash in the middle of an append
    check_journal(path)
    assert path.read_bytes() == intact
    [backup] = tmp_path.glob("journal.log.damaged-*")
    assert backup.read_bytes() == intact + b'{"op_code": 6, "worker_id": "x", "tri'
    assert [t.value for t in journal_trials(path, "tiny")] == [0, 1]
    # The study takes new records again (Optuna would otherwise glue the next one onto the torn line).
    optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(path)))).ask()
    assert len(journal_trials(path, "tiny")) == 3


def test_a_journal_whose_last_record_lacks_only_its_newline_keeps_that_record(tmp_path):
    path, _ = finished_study(tmp_path)
    path.write_bytes(path.read_bytes().removesuffix(b"\n"))
    check_journal(path)
    assert [t.value for t in journal_trials(path, "tiny")] == [0, 1]


def test_a_journal_damaged_before_its_end_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    path, _ = finished_study(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:10]
    path.write_bytes(b"\n".join(lines))
    damaged = path.read_bytes()
    with pytest.raises(DamagedJournalError, match=r"journal.log is damaged at line 2 .*left as it was") as error:
        check_journal(path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == damaged and not list(tmp_path.glob("journal.log.damaged-*"))


def sweep_settings(tmp: Path) -> SweepConfig:
    return OmegaConf.to_object(sweep_cfg(tmp).sweep)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("owner", ["none", "worker only", "dead", "claimed for another trial"])
def test_a_trial_left_running_by_a_dead_worker_is_failed_and_queued_again_whenever_it_died(tmp_path, owner):
    sweep = sweep_settings(tmp_path)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    trial = study.ask()
    trial.suggest_float("model.dropout", 0.0, 0.7)
    me = f"{socket.gethostname()}:{dead_pid()}"
    if owner != "none":
        trial.set_user_attr("worker", me)
    if owner in ("dead", "claimed for another trial"):
        trial.set_user_attr("claimed_trial", trial.number + (owner != "dead"))
    with studies.study_lock(sweep):
        studies.recover(study, sweep)
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL and "fail_reason" not in first.user_attrs
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert studies.retry_history(retry) == [first.number]
    with studies.study_lock(sweep):  # recovering twice queues nothing more
        studies.recover(study, sweep)
    assert len(study.get_trials()) == 2


def test_the_queue_holds_what_the_budget_lacks_and_a_killed_trial_keeps_its_place_until_its_retry(tmp_path):
    sweep = sweep_settings(tmp_path)
    sweep.n_trials = 3
    study = studies.load_study(sweep, studies.open_storage(sweep))
    with studies.study_lock(sweep):
        assert studies.queue_budget(study, sweep) == 3
        assert studies.queue_budget(study, sweep) == 3  # nothing more
    with studies.study_lock(sweep, shared=True):
        first, second = studies.next_trial(study, sweep), studies.next_trial(study, sweep)
    assert (first.number, second.number) == (0, 1) and first.user_attrs["claimed_trial"] == 0
    study.tell(first, 0.5)
    study.tell(second, state=TrialState.FAIL)  # interrupted, its retry not queued yet
    with studies.study_lock(sweep):
        assert studies.queue_budget(study, sweep) == 1  # trial 2 only: trial 1's place waits for its retry
        studies.recover(study, sweep)
        assert studies.queue_budget(study, sweep) == 2  # trial 2 and the retry of trial 1
    with studies.study_lock(sweep, shared=True):
        taken = [studies.next_trial(study, sweep) for _ in range(3)]
    assert [t.number for t in taken[:2]] == [2, 3] and taken[2] is None
    assert studies.retry_history(study.trials[3]) == [1]


def test_the_queue_stays_short_and_grows_with_the_running_trials_until_the_budget_is_queued(tmp_path):
    sweep = sweep_settings(tmp_path)
    sweep.n_trials = 300
    study = studies.load_study(sweep, studies.open_storage(sweep))
    running = []
    for _ in range(2):
        with studies.study_lock(sweep):
            assert studies.queue_budget(study, sweep) == studies.QUEUE_MIN
        with studies.study_lock(sweep, shared=True):
            running += [studies.next_trial(study, sweep) for _ in range(studies.QUEUE_MIN)]
    with studies.study_lock(sweep):
        assert studies.queue_budget(study, sweep) == 2 * studies.QUEUE_MIN  # one per running trial
        assert studies.queue_budget(study, sweep) == 2 * studies.QUEUE_MIN
    for trial in running:
        study.tell(trial, 0.5)
    while True:  # drained and refilled as workers would, it ends at exactly the budget
        with studies.study_lock(sweep):
            if not studies.queue_budget(study, sweep):
                break
        with studies.study_lock(sweep, shared=True):
            while (trial := studies.next_trial(study, sweep)) is not None:
                study.tell(trial, 0.5)
    assert len(study.trials) == 300 and all(t.state is TrialState.COMPLETE for t in study.trials)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_askers_taking_trials_at_once_never_take_the_same_one(tmp_path, monkeypatch, storage):
    """Two workers asking together, each with its own storage: SQLite does not lock the row a pop reads,
    so there the askers must take turns, or both could run one trial and the second's tell fails."""
    sweep = sweep_settings(tmp_path)
    if storage == "sqlite":
        sweep.storage = f"sqlite:///{tmp_path}/optuna.db"
    sweep.n_trials = 80  # unlocked, about 1 in 20 pops on SQLite took a trial another asker took too
    monkeypatch.setattr(studies, "QUEUE_MIN", sweep.n_trials)  # all of them queued at once
    studies_ = [studies.load_study(sweep, studies.open_storage(sweep)) for _ in range(2)]
    with studies.study_lock(sweep):
        studies.queue_budget(studies_[0], sweep)
    start, taken = threading.Barrier(2), [[], []]

    def ask(index: int) -> None:
        start.wait()
        while True:
            with studies.study_lock(sweep, shared=True):
                trial = studies.next_trial(studies_[index], sweep)
            if trial is None:
                return
            taken[index].append(trial.number)

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert sorted(taken[0] + taken[1]) == list(range(sweep.n_trials))


def test_a_killed_trial_with_no_retry_left_gives_its_place_to_a_new_trial(tmp_path):
    sweep = sweep_settings(tmp_path)
    sweep.n_trials, sweep.max_retry = 3, 0
    study = studies.load_study(sweep, studies.open_storage(sweep))
    study.tell(study.ask(), state=TrialState.FAIL)
    with studies.study_lock(sweep):
        studies.recover(study, sweep)
        assert studies.queue_budget(study, sweep) == 3


def test_a_waiting_worker_sees_cheaply_when_a_watched_trial_lost_its_worker(tmp_path):
    sweep = sweep_settings(tmp_path)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    live, dead = study.ask(), study.ask()
    for trial, pid in ((live, os.getppid()), (dead, dead_pid())):
        trial.set_user_attr("worker", f"{socket.gethostname()}:{pid}")
        trial.set_user_attr("claimed_trial", trial.number)
    watched = studies.running_trials(study)
    assert studies.may_need_recovery(study, watched[:1]) is False
    assert studies.may_need_recovery(study, watched) is True  # its owner is gone
    study.tell(live, 0.9)
    assert studies.may_need_recovery(study, watched[:1]) is False  # ended by itself
    other = study.ask()
    study.tell(other, state=TrialState.FAIL)  # interrupted (no reason): its retry is due
    assert studies.may_need_recovery(study, [study.trials[other.number]]) is True


def test_a_trial_of_a_live_worker_is_left_alone(tmp_path):
    sweep = sweep_settings(tmp_path)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")
    trial.set_user_attr("claimed_trial", trial.number)
    with studies.study_lock(sweep):
        studies.recover(study, sweep)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


def test_a_trial_whose_end_was_torn_off_the_journal_is_retried_not_dropped(tmp_path):
    sweep = sweep_settings(tmp_path)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    trial = study.ask()
    trial.suggest_float("model.dropout", 0.0, 0.7)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid()}")
    trial.set_user_attr("claimed_trial", trial.number)
    journal = Path(sweep.storage)
    before_tell = journal.stat().st_size
    study.tell(trial, 0.5)
    with open(journal, "r+b") as file:  # the crash cut the record that completed the trial
        file.truncate(before_tell + 20)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    with studies.study_lock(sweep):
        studies.recover(study, sweep)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]


class FigureClient:
    """Records the figures `log_plots` logs."""

    def __init__(self):
        self.paths = []

    def log_figure(self, run_id, figure, path, save_kwargs=None):
        self.paths.append(path)


@pytest.mark.parametrize("n_complete, drawn", [
    (4, {"optimization_history", "intermediate_values"}),
    (5, {"optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"}),
])
def test_importances_and_parallel_coordinates_wait_for_five_complete_trials(n_complete, drawn):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from tfsweep.sweep_tracking import log_plots

    study = optuna.create_study(direction="maximize")
    space = {"model.dropout": FloatDistribution(0, 0.7), "optimizer.learning_rate": FloatDistribution(1e-3, 1e-2)}
    for i in range(n_complete + 3):  # pruned trials tell nothing of importance
        state = TrialState.COMPLETE if i < n_complete else TrialState.PRUNED
        study.add_trial(create_trial(
            params={"model.dropout": 0.05 * i, "optimizer.learning_rate": 1e-3 * (i + 1)}, distributions=space,
            value=0.9 + 0.01 * i if state == TrialState.COMPLETE else None, state=state,
            intermediate_values={200: 0.8 + 0.01 * i}))
    client = FigureClient()
    log_plots(client, "run", study, "val/accuracy")
    assert {p.removeprefix("plots/").removesuffix(".png") for p in client.paths} == drawn


@pytest.mark.parametrize("direction, values, best", [("maximize", [0.5, 1.0, 1.0, 0.7], 1),
                                                      ("minimize", [0.3, 0.1, 0.2, 0.1], 1)])
def test_best_trial_is_the_earliest_of_equal_ones_on_a_database_too(tmp_path, direction, values, best):
    """A database's own best-trial query returns any of equal trials; the published best must not depend on it."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", direction=direction)
    assert studies.best_trial(study) is None
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))
    for value in values:
        study.add_trial(optuna.trial.create_trial(value=value))
    assert studies.best_trial(study).number == best + 1  # the pruned trial is number 0
