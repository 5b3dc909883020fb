import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from tfsweep import tracking
from tfsweep.data import load_splits
from tfsweep.errors import NonFiniteLossError, TrackingError
from tfsweep.hooks import Hook, LoggingHook
from tfsweep.trainer import Trainer
from tfsweep.training import train


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


def test_run_records_params_curves_checkpoints_and_a_loadable_model(make_cfg, caplog):
    cfg = make_cfg(**{"model.dropout": "0.3"})
    metrics = train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == Path(cfg.paths.output_dir).name  # unique per run, not a seeded draw
    params = run.data.params
    assert {"model.dropout": "0.3", "model.filters": "[4, 8]", "optimizer.learning_rate": "0.01",
            "data.batch_size": "20", "trainer.steps": "20", "tracking.uri": cfg.tracking.uri}.items() <= params.items()
    assert {"paths.output_dir", "trainer.model_dir", "data.train_images.sha256"} <= params.keys()
    for key, value in params.items():  # every param is the resolved config value at its dotted key
        assert str(OmegaConf.select(cfg, key)) == value, key
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "train/accuracy") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "global_step_per_sec") == [5, 10, 15, 20]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20]
    assert steps(client, run.info.run_id, "val/loss") == [10, 20]
    assert steps(client, run.info.run_id, "test/accuracy") == [20]
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["test/accuracy"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoint", "ckpt-20.index", "ckpt-10.index"} <= checkpoints
    assert tracking.RUN_ID_FILE not in checkpoints  # only the checkpoints, not the model_dir's records
    downloaded = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                     tracking_uri=cfg.tracking.uri)
    assert "dropout: 0.3" in Path(downloaded).read_text()

    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    splits = load_splits(cfg.data)
    classes = np.asarray(model.predict(splits.test_images.astype(np.float32) / 255.0))
    assert classes.shape == (len(splits.test_images),) and set(np.unique(classes)) <= set(range(10))
    assert np.mean(classes == splits.test_labels) == pytest.approx(metrics["test/accuracy"], abs=0.02)
    raw_pixels = np.asarray(model.predict(splits.test_images.astype(np.float32)))  # 0..255 works too
    np.testing.assert_array_equal(raw_pixels, classes)

    # The same command again: nothing is evaluated, logged or uploaded, and the metrics come back.
    history = {key: steps(client, run.info.run_id, key) for key in run.data.metrics}
    with caplog.at_level("INFO"):
        assert train(cfg) == metrics
    assert any("nothing to do" in r.getMessage() for r in caplog.records)
    _, again = only_run(cfg)
    assert {key: steps(client, run.info.run_id, key) for key in again.data.metrics} == history
    assert again.info.end_time == run.info.end_time and len(models_of(client, again)) == 1


def test_resuming_the_model_dir_continues_the_same_run(make_cfg):
    train(make_cfg(**{"tracking.log_model": "false"}))
    cfg = make_cfg(**{"tracking.log_model": "false", "trainer.steps": "30"})
    train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20, 30]


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
    tracking.connect(f"sqlite:///{db}")  # a store with its tables
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
        tracking.connect(cfg.tracking.uri)
    assert secret not in str(unreachable.value) and "user:***@127.0.0.1:9" in str(unreachable.value)

    store = f"sqlite:///{tmp_path / 'store.db'}"  # the hook records into a local store instead
    client = tracking.connect(store)
    hook = tracking.MlflowHook(cfg, client)
    with caplog.at_level("DEBUG"):
        Trainer(cfg, load_splits(cfg.data), [LoggingHook(), hook]).train()
    run = client.get_run(hook.run_id)
    assert run.data.params["tracking.uri"] == "http://user:***@127.0.0.1:9"
    recorded = [*run.data.params.values(), *run.data.tags.values(), caplog.text,
                Path(mlflow.artifacts.download_artifacts(run_id=hook.run_id, artifact_path="config.yaml",
                                                         tracking_uri=store)).read_text()]
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
    monkeypatch.setattr(tracking, "MlflowClient", RaceOnce)
    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert RaceOnce.raised == 2


FIRST_USE = """
import sys
from mlflow import MlflowClient
from tfsweep import tracking
print("ready", flush=True)
sys.stdin.readline()  # all processes start together
try:
    if sys.argv[2] == "ours":
        tracking.connect(sys.argv[1])
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
