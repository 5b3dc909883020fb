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

from sweep_fixtures import sweep_command, sweep_env, tiny_overrides
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


def test_workers_started_together_on_a_fresh_database_all_work_and_no_password_is_recorded(tmp_path, postgres_url):
    """Optuna creates its tables on first use; three workers doing it at once must take turns, not die.
    The libpq form of a password (`?password=`) is accepted by the server (trust) and must be redacted."""
    secret = "Pl4nted-Secret"
    storage = f"{postgres_url}?password={secret}"
    overrides = tiny_overrides(tmp_path, steps=20) + [f"sweep.storage='{storage}'", "sweep.n_trials=4"]
    workers = [subprocess.Popen(sweep_command(overrides), env=sweep_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], "\n-----\n".join(o[-1500:] for o in outputs)

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4, "\n-----\n".join(
        [str([(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]),
         *(o[-3000:] for o in outputs)])
    assert sum("best trial" in output for output in outputs) == 1  # one worker published the results
    written = [p for p in tmp_path.rglob("*") if p.is_file() and ".hydra" not in p.parts]
    assert not [str(p) for p in written if secret.encode() in p.read_bytes()]  # MLflow's db and artifacts, logs
    assert not [o for o in outputs if secret in o]
