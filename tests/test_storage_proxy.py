"""`sweep.storage_proxy`: workers reach the study through Optuna's gRPC proxy, the heartbeat still counts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from loadtest import level as levels
from sweep_fixtures import tiny_overrides
from test_loadtest import check_level
from tfsweep import study as studies
from tfsweep.errors import UserError
from tfsweep.stack import free_port
from tfsweep.storage_proxy import ProxyStorage
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import compose_sweep

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def proxy(tmp_path):
    """`storage_proxy.serve` in its own process, in front of an SQLite study: (database URL, host:port)."""
    url, port = f"sqlite:///{tmp_path}/optuna.db", free_port("127.0.0.1")
    code = f"from tfsweep.storage_proxy import serve; serve({url!r}, '127.0.0.1', {port})"
    server = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url, f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def settings(tmp_path: Path, storage: str, storage_proxy: str | None, *extra: str):
    cfg = compose_sweep(tiny_overrides(tmp_path) + [f"sweep.storage='{storage}'", *extra])
    with open_dict(cfg):
        cfg.sweep.storage_proxy = storage_proxy
    return cfg


@pytest.mark.parametrize("through_proxy", [False, True], ids=["database", "proxy"])
def test_a_claimed_trial_has_a_heartbeat_and_goes_stale_when_its_worker_falls_silent(tmp_path, proxy, through_proxy):
    """A worker on another machine that dies right after taking its trial is found by the heartbeat alone,
    through the proxy as well: the claim itself records the first beat."""
    url, address = proxy
    sweep = OmegaConf.to_object(settings(tmp_path, url, address if through_proxy else None,
                                         "sweep.heartbeat_seconds=1").sweep)
    study = studies.load_study(sweep, studies.open_storage(sweep))
    assert isinstance(study._storage, ProxyStorage) is through_proxy
    with studies.study_lock(sweep):
        studies.queue_budget(study, sweep)
    with studies.study_lock(sweep, shared=True):
        trial = studies.next_trial(study, sweep)
    trial.set_user_attr("worker", "another-machine:1")  # alive as far as process checks can tell
    watched = studies.running_trials(study)
    assert studies.may_need_recovery(study, watched) is False
    deadline = time.monotonic() + 15
    time.sleep(2.5)  # no heartbeat thread runs: the worker died; the grace period is 2 s
    while not studies.may_need_recovery(study, watched):  # a loaded machine may take a little longer
        assert time.monotonic() < deadline, "the silent worker's trial never went stale"
        time.sleep(0.5)
    with studies.study_lock(sweep):
        studies.recover(study, sweep)
    retries = [t for t in study.get_trials() if studies.retry_history(t) == [trial.number]]
    assert len(retries) == 1 and studies.outcome(retries[0]) is studies.Outcome.waiting


def test_stand_in_workers_through_the_proxy_count_every_trial_once(tmp_path, proxy):
    url, address = proxy
    overrides = levels.sweep_overrides(2, 4, url, f"sqlite:///{tmp_path}/mlflow.db", tmp_path, "lt",
                                       ["trainer.steps=100", f"sweep.storage_proxy={address}"])
    check_level(levels.run_level(overrides, 2, tmp_path), trials=4)


@pytest.mark.parametrize("storage, storage_proxy, message", [
    ("journal", "127.0.0.1:1", r"sweep.storage=.* with sweep.storage_proxy, give the database URL"),
    ("database", "127.0.0.1", r"sweep.storage_proxy='127.0.0.1' is invalid"),
    ("database", "free port", r"cannot be opened through sweep.storage_proxy=127.0.0.1:\d+ .*start the database"),
])
def test_a_bad_or_absent_proxy_fails_in_one_line_before_any_trial(tmp_path, monkeypatch, storage, storage_proxy,
                                                                   message):
    monkeypatch.setattr(studies, "PROXY_READY_SECONDS", 1)
    url = str(tmp_path / "journal.log") if storage == "journal" else f"sqlite:///{tmp_path}/optuna.db"
    if storage_proxy == "free port":
        storage_proxy = f"127.0.0.1:{free_port('127.0.0.1')}"
    with pytest.raises(UserError, match=message) as error:
        run_sweep(settings(tmp_path, url, storage_proxy, "sweep.n_trials=1"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "tiny" / "trials").exists()
