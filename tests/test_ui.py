"""`make ui` (src/ui.py): the printed addresses open each experiment's runs table, and the server it
starts reads the same store as training with one worker and no job runner."""

import json
import os
import sys

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import ui
from tfsweep import runs_view


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    for name in ("older", "newer"):
        client.set_terminated(client.create_run(client.create_experiment(name)).info.run_id)
    client.create_experiment("nothing-yet")
    return uri


def test_one_runs_table_address_per_experiment_with_runs_newest_first(store):
    client = MlflowClient(store)
    ids = {name: client.get_experiment_by_name(name).experiment_id for name in ("older", "newer")}
    assert ui.runs_table_urls(store, "http://127.0.0.1:5050/") == {
        name: f"http://127.0.0.1:5050/#/experiments/{ids[name]}/runs?workflowType=machine_learning"
        for name in ("newer", "older")}
    assert list(ui.runs_table_urls(store, "http://h:1")) == ["newer", "older"]


def test_an_experiment_with_the_saved_view_is_opened_in_it(store):
    client = MlflowClient(store)
    newer = client.get_experiment_by_name("newer").experiment_id
    runs_view.save_view(client, newer, ["model.dropout"])
    urls = ui.runs_table_urls(store, "http://h:1")
    assert urls["newer"].endswith("/runs?workflowType=machine_learning&viewStateShareKey=tfsweep")
    assert "viewStateShareKey" not in urls["older"]


def test_the_saved_view_adds_each_writers_params_after_the_objective(store):
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("newer").experiment_id

    def stored():
        tag = client.get_experiment(experiment).tags[runs_view.VIEW_TAG]
        return json.loads(tag)["name"], runs_view.view_columns(tag)

    runs_view.save_view(client, experiment, ["data.batch_size", "model.dropout"])
    runs_view.save_view(client, experiment, ["model.dropout", "optimizer.name"])
    name, columns = stored()
    assert name == runs_view.VIEW_NAME
    assert columns == ["attributes.`Source`", "attributes.`Models`", "attributes.`Dataset`",
                       "metrics.`val/accuracy`", "metrics.`test/accuracy`", "tags.`optuna.state`",
                       "params.`data.batch_size`", "params.`model.dropout`", "params.`optimizer.name`"]
    writes = []
    client.set_experiment_tag = lambda *args: writes.append(args)
    runs_view.save_view(client, experiment, ["model.dropout"])  # nothing new: not written again
    assert writes == []


def test_a_writer_that_loses_the_race_to_create_the_view_adds_its_columns_to_the_winners(store):
    """Four commands starting together on PostgreSQL: MLflow's tag insert fails for all but one."""
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("newer").experiment_id
    set_tag = client.set_experiment_tag

    def lose_the_race(*args):
        client.set_experiment_tag = set_tag
        runs_view.save_view(MlflowClient(store), experiment, ["model.dropout"])  # the winner, just before
        raise MlflowException("duplicate key value violates unique constraint \"experiment_tag_pk\"")

    client.set_experiment_tag = lose_the_race
    runs_view.save_view(client, experiment, ["data.batch_size"])
    columns = runs_view.view_columns(client.get_experiment(experiment).tags[runs_view.VIEW_TAG])
    assert columns[-2:] == ["params.`model.dropout`", "params.`data.batch_size`"]


def test_the_default_store_is_trainings(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ui.default_store() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u@db/mlflow")
    assert ui.default_store() == "postgresql://u@db/mlflow"


def test_prints_the_addresses_then_becomes_mlflow_ui_with_one_worker_and_no_job_runner(store, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    ui.main(["--port", "5123", "--host", "0.0.0.0", "--backend-store-uri", store])
    out = capsys.readouterr().out
    assert "newer: http://127.0.0.1:5123/#/experiments/" in out and "nothing-yet" not in out
    [(path, argv, env)] = calls
    assert path == sys.executable and argv[1:4] == ["-m", "mlflow", "ui"]
    options = dict(zip(argv[4::2], argv[5::2]))
    assert options == {"--workers": "1", "--host": "0.0.0.0", "--port": "5123", "--backend-store-uri": store,
                       "--uvicorn-opts": "--no-access-log"}  # quiet: no line per HTTP request
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    ui.main(["--access-log", "--backend-store-uri", store])
    assert "--uvicorn-opts" not in calls[-1][1]


def test_a_database_password_goes_to_the_environment_not_the_command_line(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    monkeypatch.setattr(ui, "runs_table_urls", lambda store, base: {"e": f"{base}/#/experiments/1/runs"})
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://tfsweep:s3cret@127.0.0.1:5432/mlflow")
    ui.main([])
    [(argv, env)] = calls
    assert "s3cret" not in " ".join(argv) + capsys.readouterr().out
    assert argv[-1] == "postgresql://tfsweep@127.0.0.1:5432/mlflow" and env["PGPASSWORD"] == "s3cret"


def test_an_unreadable_store_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        ui.main(["--backend-store-uri", f"sqlite:///{tmp_path}/a-file/mlflow.db"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ui: cannot read the tracking store sqlite:///") and len(err.splitlines()) == 1
