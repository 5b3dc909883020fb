"""`python src/train.py ...` as a user runs it: success on synthetic data, and every bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY_TRAINING

ROOT = Path(__file__).resolve().parents[1]


def run_train(tmp_path, synthetic_data, *overrides):
    args = {**synthetic_data, **TINY_TRAINING, "hydra.run.dir": str(tmp_path / "run"),
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.log_model": "false"}
    command = [sys.executable, str(ROOT / "src" / "train.py"), *(f"{k}={v}" for k, v in args.items()), *overrides]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_train_entry_point_trains_and_tracks(tmp_path, synthetic_data):
    result = run_train(tmp_path, synthetic_data, "model.dropout=0.25")
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "loss = " in output and ", step = 20" in output and "global_step/sec" in output
    assert (tmp_path / "run" / "model" / "ckpt-20.index").exists()
    runs = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()])
    assert [r.data.params["model.dropout"] for r in runs] == ["0.25"]


@pytest.mark.parametrize("override, expected", [
    ("model.dropuot=0.3", "dropuot"),
    ("optimizer=adamw", "adamw"),
    ("model.dropout=abc", "model.dropout"),
    ("model.dropout=1.0", "model.dropout=1.0 is invalid"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 is invalid"),
    ("data.batch_size=0", "data.batch_size=0 is invalid"),
    ("trainer.steps=0", "trainer.steps=0 is invalid"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri='http://127.0.0.1:9' cannot be reached"),
    ("data.validation_size=100000", "data.validation_size=100000"),
])
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(tmp_path, synthetic_data, override, expected):
    result = run_train(tmp_path, synthetic_data, override)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output, output[-2000:]
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "mlflow.db").exists() or override.startswith("data.")


def test_corrupt_data_file_is_reported_and_removed(tmp_path, synthetic_data):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for key, value in synthetic_data.items():
        if key.endswith(".name"):
            source = Path(synthetic_data["data.root"]) / value
            (data_dir / value).write_bytes(source.read_bytes())
    labels = data_dir / synthetic_data["data.train_labels.name"]
    labels.write_bytes(labels.read_bytes()[:-7])
    result = run_train(tmp_path, synthetic_data, f"data.root={data_dir}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "failed its checksum" in output and labels.name in output and "Traceback" not in output
    assert not labels.exists()
