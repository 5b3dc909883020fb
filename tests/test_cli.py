"""`python src/train.py ...` as a user runs it: success on synthetic data, and every bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY_TRAINING
from tfsweep import runs_view

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
    # Named by what the command line changed (where files go left out), not by a timestamp.
    assert runs[0].info.run_name.startswith("validation_size=40 batch_size=20 eval_batch_size=32 filters=[4,8]")
    assert runs[0].info.run_name.endswith(" optimizer=adam learning_rate=0.01 dropout=0.25")
    # The runs table's saved view shows those that are params, a group by its name.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    view = client.get_experiment(runs[0].info.experiment_id).tags[runs_view.VIEW_TAG]
    shown = [c for c in runs_view.view_columns(view) if c.startswith("params.")]
    assert {"params.`data.batch_size`", "params.`optimizer.name`", "params.`optimizer.learning_rate`",
            "params.`model.dropout`"} <= set(shown), shown
    assert {c[len("params.`"):-1] for c in shown} <= set(runs[0].data.params), shown  # not validation_size


def unwritable_folder(tmp_path: Path) -> str:
    """A folder no file can be created in: permission bits stop other users, a pseudo file system root."""
    if os.geteuid() == 0:
        return "/sys/tfsweep-data"
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return str(folder / "mnist")


# Refused before Hydra writes anything: one line naming the key, no run folder, no .hydra/, no train.log.
@pytest.mark.parametrize("override, expected", [
    ("+model.dropoutt=0.3", "model.dropoutt is not a config key"),  # the form Hydra's own message suggests
    ("model.dropout=1.0", "model.dropout=1.0 is invalid"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate=-1.0 is invalid"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate=inf is invalid"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate=nan is invalid"),
    ("data.batch_size=0", "data.batch_size=0 is invalid"),
    ("data.validation_size=0", "data.validation_size=0 is invalid"),
    ("trainer.steps=0", "trainer.steps=0 is invalid"),
    ("model.pool_size=30", "model.pool_size=30 shrinks the 28x28 images to nothing"),
    ("model.filters=[8,8,8,8,8]", "model.filters=[8, 8, 8, 8, 8] with model.pool_size=2 shrinks"),
    ("data.root={file}", "is a file: point data.root at a folder"),
    ("data.root={unwritable}", "cannot take the data files"),
    ("tracking.uri=mysql://user:s3cret-pw@127.0.0.1/mlflow", "carries a password that would be recorded"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, synthetic_data, override,
                                                                     expected):
    (tmp_path / "a-file").write_text("not a folder")
    override = override.format(file=tmp_path / "a-file", unwritable=unwritable_folder(tmp_path))
    result = run_train(tmp_path, synthetic_data, override)
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert "s3cret-pw" not in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


# Refused by Hydra's composition (its own few lines) or during the run, with the model_dir untouched.
@pytest.mark.parametrize("override, expected", [
    ("model.dropuot=0.3", "dropuot"),
    ("optimizer=adamw", "adamw"),
    ("model.dropout=abc", "model.dropout"),
    ("trainer.precision=float16", "expected one of [float32, mixed_bfloat16]"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri='http://127.0.0.1:9' cannot be reached"),
    ("data.validation_size=100000", "data.validation_size=100000"),
])
def test_bad_input_gives_a_clear_message_and_a_nonzero_exit(tmp_path, synthetic_data, override, expected):
    result = run_train(tmp_path, synthetic_data, override)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert expected in output, output[-2000:]
    assert "Traceback" not in output
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "mlflow.db").exists() or override.startswith("data.")


def test_sweep_refuses_bad_input_before_anything_is_written(tmp_path):
    from sweep_fixtures import run_sweep_command, tiny_overrides

    result = run_sweep_command(tiny_overrides(tmp_path) + ["+model.dropoutt=0.3"])
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "model.dropoutt is not a config key" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no outputs/, study folder or mlflow.db


def test_help_lists_the_real_options_and_no_schemas():
    result = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0
    assert "MNIST CNN" in result.stdout and "optimizer: adam, momentum, sgd" in result.stdout
    assert "schema" not in result.stdout


def test_cfg_job_resolve_shows_the_run_folder(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "src" / "train.py"), "--cfg", "job", "--resolve",
                             f"hydra.run.dir={tmp_path / 'planned'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"model_dir: {tmp_path / 'planned' / 'model'}" in result.stdout
    assert not (tmp_path / "planned").exists()


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
