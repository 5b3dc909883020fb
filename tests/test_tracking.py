import getpass
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from conftest import N_TEST, N_TRAIN, N_VALIDATION, TINY_TRAINING

from tfsweep import logged_model, stack, sweep_tracking, tracking, tracking_store
from tfsweep.config import CONFIG_DIR
from tfsweep.data import load_splits
from tfsweep.errors import NonFiniteLossError, TrackingError
from tfsweep.hooks import Hook, LoggingHook
from tfsweep.sweep_config import Direction
from tfsweep.trainer import Trainer
from tfsweep.training import train

PROJECT_DIR = CONFIG_DIR.parent


def only_run(cfg):
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def models_of(client, run):
    return client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")


# What a person compares between runs, written out by hand: the run-defining settings only.
EXPECTED_PARAMS = {
    "model.name": "cnn", "model.filters": "[4, 8]", "model.kernel_size": "5", "model.pool_size": "2",
    "model.dense_units": "32", "model.dropout": "0.3", "model.num_classes": "10",
    "optimizer.name": "adam", "optimizer.learning_rate": "0.01", "optimizer.beta_1": "0.9",
    "optimizer.beta_2": "0.999", "optimizer.epsilon": "1e-07",
    "data.name": "mnist", "data.batch_size": "20",
    "trainer.steps": "20", "trainer.precision": "float32", "trainer.seed": "0",
}


def test_run_records_params_curves_checkpoints_and_a_loadable_model(make_cfg, caplog):
    cfg = make_cfg(**{"model.dropout": "0.3", "tracking.system_metrics_every": "0.2"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(cfg)
    assert not [w for w in caught if "type hints" in str(w.message)]  # predict's type hint is one MLflow takes
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == Path(cfg.paths.output_dir).name  # unique per run, not a seeded draw
    params = run.data.params
    schedule = {key: value for key, value in params.items() if key.startswith("schedule.")}
    assert {key: value for key, value in params.items() if key not in schedule} == EXPECTED_PARAMS
    # The schedule (constant by default) is there by its own keys; plumbing is only in config.yaml.
    assert schedule["schedule.decay_steps"] == "20" and schedule["schedule.initial_learning_rate"] == "0.01"
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "train/accuracy") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "global_step_per_sec") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20]
    assert steps(client, run.info.run_id, "val/loss") == [10, 20]
    assert steps(client, run.info.run_id, "test/accuracy") == [20]
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])

    # MLflow's system metrics, sampled every 0.2 s of this run of a second or more
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    samples = steps(client, run.info.run_id, "system/cpu_utilization_percentage")
    assert samples == list(range(len(samples)))

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "curves.png"} <= artifacts
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoint", "ckpt-20.index", "ckpt-10.index"} <= checkpoints
    assert tracking.RUN_ID_FILE not in checkpoints  # only the checkpoints, not the model_dir's records
    downloaded = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                     tracking_uri=cfg.tracking.uri)
    recorded = Path(downloaded).read_text()
    assert "dropout: 0.3" in recorded and cfg.data.train_images.sha256 in recorded  # the whole config

    # The model: a LoggedModel named after the run, an output of the run at its last step, whose
    # metrics are the run's at that step.
    [model] = models_of(client, run)
    assert model.name == run.info.run_name and model.status == LoggedModelStatus.READY
    assert [(output.model_id, output.step) for output in run.outputs.model_outputs] == [(model.model_id, 20)]
    linked = {metric.key: (metric.step, metric.value) for metric in model.metrics}
    assert linked["val/accuracy"] == (20, pytest.approx(metrics["val/accuracy"]))
    assert linked["test/accuracy"] == (20, pytest.approx(metrics["test/accuracy"]))
    assert model.params == params

    mlflow.set_tracking_uri(cfg.tracking.uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    signature = loaded.metadata.signature  # the model page lists its input, and requests are not held to it
    assert [(spec.type, spec.shape) for spec in signature.inputs.inputs] == [(np.dtype(np.float32), (-1, 28, 28))]
    splits = load_splits(cfg.data)
    classes = np.asarray(loaded.predict(splits.test_images))  # uint8 pixels, as the IDX files hold them
    assert classes.shape == (len(splits.test_images),) and set(np.unique(classes)) <= set(range(10))
    assert np.mean(classes == splits.test_labels) == pytest.approx(metrics["test/accuracy"], abs=0.02)
    for same in (splits.test_images.astype(np.float32) / 255.0, splits.test_images.astype(np.float32),
                 splits.test_images.reshape(-1, 784), splits.test_images[..., np.newaxis]):
        np.testing.assert_array_equal(np.asarray(loaded.predict(same)), classes)
    with pytest.raises(Exception) as wrong:
        loaded.predict(splits.test_images[:, :27])
    assert str(wrong.value) == ("expected images of shape [n, 28, 28], [n, 28, 28, 1] or [n, 784], "
                                f"got an array of shape [{len(splits.test_images)}, 27, 28]")

    # The same command again: nothing is evaluated, logged or uploaded, and the metrics come back.
    history = {key: steps(client, run.info.run_id, key) for key in run.data.metrics}
    with caplog.at_level("INFO"):
        assert train(cfg) == metrics
    assert any("nothing to do" in r.getMessage() for r in caplog.records)
    _, again = only_run(cfg)
    assert {key: steps(client, run.info.run_id, key) for key in again.data.metrics} == history
    assert again.info.end_time == run.info.end_time and len(models_of(client, again)) == 1


def test_runs_carry_mlflows_context_tags_with_the_git_commit(make_cfg, synthetic_data, tmp_path):
    cfg = make_cfg(**{"tracking.log_model": "false"})  # what the command below composes
    overrides = {**synthetic_data, **TINY_TRAINING, "trainer.steps": "10", "paths.output_dir": cfg.paths.output_dir,
                 "tracking.uri": cfg.tracking.uri, "tracking.log_model": "false"}
    trained = subprocess.run([sys.executable, "src/train.py", *(f"{k}={v}" for k, v in overrides.items())],
                             cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    _, run = only_run(cfg)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["mlflow.source.name"] == "src/train.py"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.user"] == getpass.getuser()


def test_the_data_set_is_an_input_of_the_run_once_per_split(make_cfg):
    cfg = make_cfg(**{"tracking.log_model": "false"})
    train(cfg)
    client, run = only_run(cfg)
    inputs = {tag.value: entry.dataset for entry in run.inputs.dataset_inputs for tag in entry.tags
              if tag.key == "mlflow.data.context"}
    assert sorted(inputs) == ["test", "train", "val"]
    assert {dataset.name for dataset in inputs.values()} == {"mnist"}
    sizes = {split: json.loads(dataset.profile)["num_rows"] for split, dataset in inputs.items()}
    assert sizes == {"train": N_TRAIN - N_VALIDATION, "val": N_VALIDATION, "test": N_TEST}
    assert len({dataset.digest for dataset in inputs.values()}) == 3

    train(make_cfg(**{"tracking.log_model": "false", "trainer.steps": "30"}))  # resumed: no second input
    _, resumed = only_run(cfg)
    assert sorted((e.dataset.name, e.dataset.digest) for e in resumed.inputs.dataset_inputs) == sorted(
        (d.name, d.digest) for d in inputs.values())

    # Another data set's files get other digests; a run that never evaluates the test split lists none.
    other = make_cfg(**{"tracking.log_model": "false", "trainer.evaluate_test": "false",
                        "data.validation_size": "20", "paths.output_dir": str(Path(cfg.paths.output_dir) / "other")})
    train(other)
    [second] = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    digests = {tag.value: entry.dataset.digest for entry in second.inputs.dataset_inputs for tag in entry.tags}
    assert sorted(digests) == ["train", "val"]
    assert digests["train"] != inputs["train"].digest and digests["val"] != inputs["val"].digest


def test_a_run_that_loses_the_race_to_store_the_data_set_links_the_stored_one(make_cfg, monkeypatch):
    """Sweep workers starting trials together: another run stores the data set between this run's lookup
    and its insert (MLflow's SQL store does one, then the other), so the insert breaks the unique key."""
    from sqlalchemy.orm import Query

    from mlflow.store.tracking.dbmodels.models import SqlDataset

    first = make_cfg(**{"tracking.log_model": "false"})
    train(first)
    client, winner = only_run(first)
    all_rows, missed = Query.all, []

    def lookup_before_the_other_insert(query):
        if not missed and query.column_descriptions[0]["entity"] is SqlDataset:
            missed.append(True)
            return []  # as seen before the other run's commit
        return all_rows(query)

    monkeypatch.setattr(Query, "all", lookup_before_the_other_insert)
    second = make_cfg(**{"tracking.log_model": "false", "paths.output_dir": str(Path(first.paths.output_dir) / "b")})
    train(second)
    assert missed
    [loser] = [r for r in client.search_runs([winner.info.experiment_id]) if r.info.run_id != winner.info.run_id]
    assert loser.info.status == "FINISHED"
    assert sorted((e.dataset.name, e.dataset.digest) for e in loser.inputs.dataset_inputs) == sorted(
        (e.dataset.name, e.dataset.digest) for e in winner.inputs.dataset_inputs)


def test_resuming_the_model_dir_continues_the_same_run(make_cfg):
    train(make_cfg(**{"tracking.log_model": "false"}))
    cfg = make_cfg(**{"tracking.log_model": "false", "trainer.steps": "30"})
    train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20, 30]


def test_points_of_several_steps_go_out_in_one_request(make_cfg, monkeypatch):
    """The tracking server's cost is per request: between checkpoints, points wait for each other."""
    batches, log_batch = [], MlflowClient.log_batch

    def counted(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            batches.append(sorted({m.step for m in metrics}))
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    monkeypatch.setattr(tracking, "SEND_EVERY_SECONDS", 60.0)
    cfg = make_cfg(**{"tracking.log_model": "false", "trainer.checkpoint_every": "20"})
    train(cfg)
    # The first point at once, the rest before the checkpoint at 20, then the test split's point.
    assert batches == [[5], [10, 15, 20], [20]]
    client, run = only_run(cfg)
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20]


def test_an_interrupted_run_rerun_logs_each_step_once(make_cfg):
    class Interrupt(Hook):  # Ctrl-C after step 15 was logged, past the checkpoint at 10
        def after_log(self, trainer, step, logs):
            if step == 15:
                raise KeyboardInterrupt

    cfg = make_cfg(**{"tracking.log_model": "false"})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, hooks=[Interrupt()])
    client, run = only_run(cfg)
    assert run.info.status == "KILLED" and steps(client, run.info.run_id, "train/loss") == [5, 10, 15]
    train(cfg)  # resumes at 10 and computes step 15 again
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/accuracy", "global_step_per_sec"):
        assert steps(client, run.info.run_id, key) == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "val/loss") == [10, 20]


def test_nan_loss_marks_the_run_failed(make_cfg):
    cfg = make_cfg(**{"optimizer": "sgd", "optimizer.learning_rate": "1e12"})
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    _, run = only_run(cfg)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["error"]


def test_unreachable_tracking_uri_fails_before_anything_is_written(make_cfg, tmp_path):
    cfg = make_cfg(**{"tracking.uri": "http://127.0.0.1:9"})
    with pytest.raises(TrackingError, match=r"tracking\.uri='http://127\.0\.0\.1:9' cannot be reached"):
        train(cfg)
    assert not Path(cfg.trainer.model_dir).exists()


def test_a_read_only_store_fails_before_anything_is_written(make_cfg, tmp_path):
    db = tmp_path / "mlflow.db"
    tracking_store.connect(f"sqlite:///{db}")  # a store with its tables
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"  # read-only even for root, unlike chmod
    cfg = make_cfg(**{"tracking.uri": f"'{read_only}'"})
    with pytest.raises(TrackingError, match=r"cannot be written \(.*readonly database\); make .*writable"):
        train(cfg)
    assert not Path(cfg.trainer.model_dir).exists()
    assert MlflowClient(f"sqlite:///{db}").search_runs(["0"]) == []


def test_a_password_in_the_tracking_uri_is_recorded_nowhere(make_cfg, tmp_path, caplog):
    secret = "S3CRET-pw"
    cfg = make_cfg(**{"tracking.uri": f"http://user:{secret}@127.0.0.1:9", "tracking.log_model": "false",
                      "trainer.steps": "10"})
    with pytest.raises(TrackingError) as unreachable:
        tracking_store.connect(cfg.tracking.uri)
    assert secret not in str(unreachable.value) and "user:***@127.0.0.1:9" in str(unreachable.value)

    store = f"sqlite:///{tmp_path / 'store.db'}"  # the hook records into a local store instead
    client = tracking_store.connect(store)
    hook = tracking.MlflowHook(cfg, client)
    with caplog.at_level("DEBUG"):
        Trainer(cfg, load_splits(cfg.data), [LoggingHook(), hook]).train()
    run = client.get_run(hook.run_id)
    config_yaml = Path(mlflow.artifacts.download_artifacts(run_id=hook.run_id, artifact_path="config.yaml",
                                                           tracking_uri=store)).read_text()
    assert "uri: http://user:***@127.0.0.1:9" in config_yaml
    recorded = [*run.data.params.values(), *run.data.tags.values(), caplog.text, config_yaml]
    assert not [text for text in recorded if secret in text]
    assert secret.encode() not in (tmp_path / "store.db").read_bytes()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


class RaceOnce:
    """An MlflowClient whose first use meets another process creating the tables."""

    raised = 0

    def __init__(self, tracking_uri):
        if RaceOnce.raised < 2:
            RaceOnce.raised += 1
            raise RuntimeError('(psycopg.errors.UniqueViolation) duplicate key value violates unique '
                               'constraint "pg_type_typname_nsp_index"')
        self.client = MlflowClient(tracking_uri)

    def search_experiments(self, **kwargs):
        return self.client.search_experiments(**kwargs)


def test_a_table_creation_race_is_retried_not_reported_as_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking_store, "MlflowClient", RaceOnce)
    monkeypatch.setattr(tracking_store.time, "sleep", lambda seconds: None)
    tracking_store.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert RaceOnce.raised == 2


FIRST_USE = """
import sys
from mlflow import MlflowClient
from tfsweep import tracking_store
from tfsweep.config import CONFIG_DIR
print("ready", flush=True)
sys.stdin.readline()  # all processes start together
try:
    if sys.argv[2] == "ours":
        tracking_store.connect(sys.argv[1])
    else:  # another program, e.g. `mlflow ui`, creating the store without our lock
        MlflowClient(sys.argv[1]).search_experiments()
    print("ok")
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


def test_processes_creating_a_fresh_store_at_once_all_connect(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workers = {name: subprocess.Popen([sys.executable, "-c", FIRST_USE, uri, name],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name in ("ours", "ui")}
    for worker in workers.values():
        assert worker.stdout.readline().strip() == "ready"
    outcomes = {name: worker.communicate("go\n", timeout=120)[0].strip().splitlines()[-1]
                for name, worker in workers.items()}
    assert outcomes["ours"] == "ok", outcomes


def test_the_parent_run_has_context_tags_and_no_unset_settings(tmp_path):
    client = tracking_store.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = optuna.create_study(study_name="study", direction="maximize")
    settings = {"sweep.n_trials": 2, "sweep.direction": Direction.maximize, "sweep.pruner.n_startup_trials": None}
    run = client.get_run(sweep_tracking.parent_run(client, "exp", study, settings))
    assert run.data.params == {"sweep.n_trials": "2", "sweep.direction": "maximize"}
    assert run.data.tags["mlflow.user"] == getpass.getuser() and run.data.tags["mlflow.source.type"] == "LOCAL"


def test_the_best_model_is_logged_once_registered_once_and_is_the_champion(tmp_path):
    import keras

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking_store.connect(uri)
    run_id = client.create_run(tracking_store.experiment_id(client, "exp"), run_name="trial-0003").info.run_id
    client.set_terminated(run_id, "FINISHED")
    finished = client.get_run(run_id).info
    network = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(10)])
    images = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    trainer = SimpleNamespace(network=network, splits=SimpleNamespace(test_images=images),
                              global_step=SimpleNamespace(numpy=lambda: 70))
    study = optuna.create_study(study_name="study", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, value=0.9,
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 2)}))

    model_id = logged_model.log_model(uri, run_id, trainer)
    registered = [sweep_tracking.register_champion(uri, model_id, "digits", study, 0.95) for _ in range(2)]
    assert logged_model.log_model(uri, run_id, trainer) == model_id  # a second publication adds nothing

    assert registered == ["models:/digits/1"] * 2
    assert [str(v.version) for v in client.search_model_versions("name = 'digits'")] == ["1"]
    champion = client.get_model_version_by_alias("digits", "champion")
    assert champion.source == f"models:/{model_id}" and champion.run_id == run_id
    run = client.get_run(run_id)  # the trial's run keeps its end
    assert (run.info.status, run.info.end_time) == ("FINISHED", finished.end_time)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model_id, 70)]
    assert client.get_logged_model(model_id).name == "trial-0003"
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/digits@champion").predict(images)
    np.testing.assert_array_equal(served, np.argmax(network.predict(images / 255.0, verbose=0), axis=1))


@pytest.mark.parametrize("user_setting, expected", [(None, "true"), ("false", "false")])
def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on(tmp_path, user_setting, expected):
    """MLflow's telemetry thread deletes a variable from os.environ while other threads iterate it (a metric
    batch failed with KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in the load test): no client, no thread."""
    code = ("import tfsweep, os, mlflow\n"
            "from mlflow.telemetry.client import get_telemetry_client\n"
            f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')\n"
            "with mlflow.start_run(): mlflow.log_metric('m', 1.0)\n"
            "print(os.environ['MLFLOW_DISABLE_TELEMETRY'], get_telemetry_client() is None)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    if user_setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = user_setting
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    setting, no_client = result.stdout.split()[-2:]
    assert setting == expected
    assert no_client == "True" or expected == "false"


def test_the_stacks_mlflow_pool_lets_every_request_thread_create_a_run_at_once(tmp_path, monkeypatch):
    """Each of the server's request threads creating a run holds two database connections at the peak."""
    for key, value in {**stack.mlflow_pool_env(), "MLFLOW_SQLALCHEMYSTORE_POOL_TIMEOUT": "3"}.items():
        monkeypatch.setenv(key, value)
    store = SqlAlchemyStore(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    experiment = store.create_experiment("e")
    all_inside, read_experiment = threading.Barrier(stack.MLFLOW_THREADS, timeout=30), store.get_experiment

    def get_experiment(experiment_id):  # every thread holds its first connection before any asks again
        all_inside.wait()
        return read_experiment(experiment_id)

    monkeypatch.setattr(store, "get_experiment", get_experiment)
    errors = []

    def create_run():
        try:
            store.create_run(experiment, "u", 0, [], "r")
        except Exception as exc:  # the pool's timeout, when it is too small
            errors.append(exc)

    threads = [threading.Thread(target=create_run) for _ in range(stack.MLFLOW_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
