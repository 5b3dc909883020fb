"""No password from a tracking URI or a storage URL reaches any record: MLflow, `.hydra/`, logs, console.

Passwords are planted in each form a user may write them, the entry points run for real, and every file
they wrote (outputs, `.hydra/`, the study's folder, the MLflow server's database and artifacts) and
everything they printed is searched for them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from conftest import TINY_TRAINING
from sweep_fixtures import run_sweep_command, sweep_env, tiny_overrides
from tfsweep.config import CONFIG_DIR
from tfsweep.credentials import move_secrets, redact_url
from tfsweep.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SECRET_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD")


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.fixture
def clean_environment(monkeypatch):
    for name in SECRET_VARIABLES:
        # Set, then deleted: monkeypatch records the variable only then, so that what move_secrets
        # puts there is taken away after the test (a bare delenv of an absent variable records nothing).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.parametrize("env_uri, override, clean_uri, variables", [
    ("http://alice:PW-env-1@tracking.example:5000", None, "http://alice@tracking.example:5000",
     {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "PW-env-1"}),
    (None, "tracking.uri=https://alice:PW%40override-2@tracking.example/mlflow",
     "https://alice@tracking.example/mlflow",
     {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "PW@override-2"}),
    (None, "tracking.uri=postgresql://bob:PW-authority-3@db.example/mlflow", "postgresql://bob@db.example/mlflow",
     {"PGPASSWORD": "PW-authority-3"}),
    (None, "tracking.uri='postgresql://bob@db.example/mlflow?sslmode=require&password=PW-libpq-4'",
     "postgresql://bob@db.example/mlflow?sslmode=require", {"PGPASSWORD": "PW-libpq-4"}),
])
def test_each_form_of_password_moves_to_the_variable_its_library_reads(clean_environment, env_uri, override,
                                                                        clean_uri, variables):
    if env_uri:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri
    cfg = compose_with_hydra(["paths.output_dir=/tmp/unused"] + ([override] if override else []))
    move_secrets(cfg)
    assert cfg.tracking.uri == clean_uri
    for name, value in variables.items():
        assert os.environ[name] == value
    recorded = str(cfg.hydra.overrides) + str(cfg.hydra.job.override_dirname) + str(cfg.tracking)
    assert "PW" not in recorded and "PW" not in os.environ.get("MLFLOW_TRACKING_URI", "")


def test_a_password_no_library_would_read_from_the_environment_is_refused(clean_environment):
    cfg = compose_with_hydra(["paths.output_dir=/tmp/unused", "tracking.uri=mysql://bob:PW-5@db.example/mlflow"])
    with pytest.raises(ConfigError, match=r"tracking\.uri='mysql://bob:\*\*\*@db\.example/mlflow' carries"):
        move_secrets(cfg)
    assert "PW-5" in cfg.tracking.uri and "PGPASSWORD" not in os.environ  # nothing half-moved


def test_redact_url_hides_both_forms_and_leaves_paths_alone():
    assert redact_url("postgresql://bob:pw@db/optuna") == "postgresql://bob:***@db/optuna"
    assert redact_url("postgresql://bob@db/optuna?password=pw") == "postgresql://bob@db/optuna?password=***"
    assert redact_url("sweeps_state/study/journal.log") == "sweeps_state/study/journal.log"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on this machine, storing runs and artifacts under a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", str(root / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no queue consumers to clean up
    with open(root / "server.log", "wb") as server_log:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=server_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", root
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and its uvicorn worker
        server.wait(timeout=60)


def files_containing(secrets: list[str], *folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                payload = path.read_bytes()
                found += [f"{path}: {secret}" for secret in secrets if secret.encode() in payload]
    return found


def test_no_planted_password_reaches_any_record(tmp_path, synthetic_data, mlflow_server):
    address, server_root = mlflow_server
    secrets = ["PW-train-env-6", "PW-sweep-override-7", "PW-storage-8", "PW-libpq-9"]
    printed = []

    # Training, the password in MLFLOW_TRACKING_URI: runs, logs params, checkpoints and the model.
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    training = {**synthetic_data, **TINY_TRAINING, "tracking.experiment_name": "secrets"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *(f"{k}={v}" for k, v in training.items())],
        cwd=train_dir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"http://alice:{secrets[0]}@{address}"})
    assert result.returncode == 0, result.stderr[-3000:]
    printed += [result.stdout, result.stderr]
    client = MlflowClient(f"http://{address}")
    [run] = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    recorded = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert f"uri: http://alice@{address}" in recorded  # the store is recorded, without its password

    # A tiny sweep, the password in a tracking.uri override; then two storage URLs that cannot connect.
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_overrides(sweep_dir, steps=10) + ["sweep.n_trials=2", f"tracking.uri=http://carol:{secrets[1]}@{address}"]
    result = run_sweep_command(overrides, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    printed += [result.stdout, result.stderr]
    for storage in (f"postgresql://dave:{secrets[2]}@127.0.0.1:1/optuna",
                    f"'postgresql://dave@127.0.0.1:1/optuna?password={secrets[3]}'"):
        result = run_sweep_command(overrides + ["sweep.study_name=unreachable", f"sweep.storage={storage}"])
        assert result.returncode == 1 and "postgresql://dave" in result.stdout + result.stderr, result.stderr[-3000:]
        printed += [result.stdout, result.stderr]

    assert not files_containing(secrets, train_dir, sweep_dir, server_root)
    assert not [secret for secret in secrets if any(secret in text for text in printed)]
    assert (train_dir / "outputs").is_dir() and list((sweep_dir).rglob(".hydra/overrides.yaml"))
