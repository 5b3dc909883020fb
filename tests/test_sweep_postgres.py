"""The multi-machine set-up for real: a local PostgreSQL server holds the study, two workers share it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweep_fixtures import tiny_overrides
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import compose_sweep

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PG_BIN is None, reason="needs the Debian package postgresql")]


def as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    """initdb refuses to run as root, so the server runs as the `postgres` user when we are root."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def postgres_url():
    data = Path(tempfile.mkdtemp(prefix="tfsweep-pg-"))  # outside pytest's root-only tmp folder
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres(str(PG_BIN / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "-o",
                f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
    try:
        as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)


def test_two_workers_share_a_postgresql_study_with_exactly_the_requested_trials(tmp_path, postgres_url):
    cfg = compose_sweep(tiny_overrides(tmp_path, steps=150) + [
        f"sweep.storage={postgres_url}", "sweep.n_workers=2", "sweep.n_trials=6"])
    result = run_sweep(cfg)

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert result["n_complete"] == len(complete) == 6
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("surplus") for t in study.trials)
    assert len({t.number for t in complete}) == 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both worker processes took trials

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-cnn")
    children = client.search_runs([experiment.experiment_id], "tags.`sweep.role` = 'trial'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(t.number for t in complete)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {result["mlflow_parent_run_id"]}
