"""Slow: a short sweep on real MNIST registers its best trial's model as the champion, and
`mlflow models serve -m models:/<name>@champion` answers a REST request with the right digits."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tfsweep.data import load_splits
from tfsweep.sweep import run_sweep
from tfsweep.sweep_config import ParamSpec, ParamType, compose_sweep

pytestmark = pytest.mark.slow

MODEL_NAME = "digits"
READY_WITHIN_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ready(server: subprocess.Popen, url: str) -> None:
    """Read the server's log until uvicorn says it listens (the model is loaded by then), then /ping."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, server.stdout), lines.put(None)], daemon=True).start()
    deadline, seen = time.monotonic() + READY_WITHIN_S, []
    while not any("Uvicorn running on" in line for line in seen[-1:]):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"mlflow models serve did not start within {READY_WITHIN_S} s: {''.join(seen[-20:])}")
        if line is None:
            pytest.fail(f"mlflow models serve exited with {server.wait()}: {''.join(seen[-20:])}")
        seen.append(line)
    with urllib.request.urlopen(f"{url}/ping", timeout=30) as answer:
        assert answer.status == 200


def test_the_sweeps_champion_is_registered_and_served_over_rest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_sweep([
        "sweep.n_trials=2", "sweeps/pruner=none", "sweep.study_name=serve", f"sweep.dir={tmp_path}/serve",
        f"paths.root_dir={tmp_path}", f"tracking.uri={uri}", "tracking.log_checkpoints=false",
        f"tracking.registered_model_name={MODEL_NAME}",
        # A small network, Adam at batch 100 in every trial: ~95% after 300 steps, in seconds.
        "model.filters=[8,16]", "model.dense_units=64", "trainer.precision=float32", "trainer.steps=300",
        "trainer.eval_every=300", "optimizer=adam", "data.batch_size=100",
    ])
    cfg.sweep.params = {"optimizer.learning_rate": ParamSpec(type=ParamType.float, low=0.001, high=0.003, log=True)}
    result = run_sweep(cfg)
    assert result["best_model_uri"] == f"models:/{MODEL_NAME}/1"

    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    trials = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment_name).experiment_id],
                                "tags.`sweep.role` = 'trial'")
    best_run = next(r for r in trials if r.info.run_id == champion.run_id)
    assert best_run.data.tags["optuna.trial_number"] == str(result["best_trial"])
    # Only the best trial has a model.
    models = client.search_logged_models([best_run.info.experiment_id])
    assert [model.source_run_id for model in models] == [best_run.info.run_id]
    assert champion.source == f"models:/{models[0].model_id}" and models[0].name == best_run.info.run_name

    splits = load_splits(cfg.data)
    images, labels = splits.test_images[:10], splits.test_labels[:10]
    mlflow.set_tracking_uri(uri)
    in_process = np.asarray(mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion").predict(images))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
         "--env-manager", "local", "-p", str(port), "-w", "1"],
        # MLflow starts `uvicorn` by name: this environment's bin folder goes first on PATH.
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        cwd=tmp_path, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_ready(server, url)
        request = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            served = np.asarray(json.load(answer)["predictions"])

        wrong = urllib.request.Request(f"{url}/invocations", data=json.dumps({"inputs": [[1, 2, 3]]}).encode(),
                                       headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(wrong, timeout=60)
        failure = json.load(refused.value)["stack_trace"]  # MLflow's message is generic; ours ends its trace
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    np.testing.assert_array_equal(served, in_process)
    assert np.sum(served == labels) >= 9, (served, labels)  # ~95% accurate after 300 steps
    assert failure.strip().splitlines()[-1] == (
        "ValueError: expected images of shape [n, 28, 28], [n, 28, 28, 1] or [n, 784], got an array of shape [1, 3]")
