from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tfsweep.config import flatten
from tfsweep.data import load_splits
from tfsweep.errors import NonFiniteLossError, TrackingError
from tfsweep.training import train


def only_run(cfg):
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_run_records_params_curves_checkpoints_and_a_loadable_model(make_cfg):
    cfg = make_cfg(**{"model.dropout": "0.3"})
    metrics = train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == Path(cfg.paths.output_dir).name  # unique per run, not a seeded draw
    params = run.data.params
    assert params["model.dropout"] == "0.3"
    assert params == {k: str(v) for k, v in flatten(cfg).items()}
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


def test_resuming_the_model_dir_continues_the_same_run(make_cfg):
    train(make_cfg(**{"tracking.log_model": "false"}))
    cfg = make_cfg(**{"tracking.log_model": "false", "trainer.steps": "30"})
    train(cfg)
    client, run = only_run(cfg)
    assert run.info.status == "FINISHED"
    assert steps(client, run.info.run_id, "train/loss") == [5, 10, 15, 20, 25, 30]
    assert steps(client, run.info.run_id, "val/accuracy") == [10, 20, 30]


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
