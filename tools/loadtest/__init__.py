"""A load test of the coordination layer: N real sweep workers against one PostgreSQL and one MLflow server.

Each worker process runs the sweep's own loop (`tfsweep.sweep.work`, `run_trial`) on a PostgreSQL study
tracked on the MLflow server, with only training replaced (`standin`): every Optuna and MLflow call stays
real. The calls are timed from outside (`clock`) in the worker processes (`workers`), with the servers'
CPU read from /proc (`server_cpu`); one worker count is a `level`, whose study is counted for duplicated
and lost trials (`audit`); `report` makes the table and the capacity estimate. Here: the whole test.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loadtest.level import EXPERIMENT, run_level, sweep_overrides
from loadtest.report import RESULTS_DIR, default_trial_seconds, estimate_capacity, machine, table
from loadtest.server_cpu import mlflow_server_command, server_pids
from tfsweep.processes import file_lock, write_atomically

log = logging.getLogger(__name__)


def run_load_test(worker_counts: list[int], trials_per_worker: int, stack_dir: Path, *, mlflow_port: int = 5001,
                  trial_seconds: float | None = None, train_seconds: float = 0.005,
                  checkpoint_size: int | None = None, lock_file: str | None = None, server_cores: float | None = None,
                  results_dir: Path | None = RESULTS_DIR, extra_overrides: list[str] = (),
                  keep_artifacts: bool = False, proxy: bool = False) -> dict[str, Any]:
    """Bring up (or reuse) the local stack and run one sweep per worker count; return (and save) the result.
    With `proxy`, the workers reach the study through the stack's Optuna storage proxy."""
    from tfsweep import stack as stacks

    running = stacks.up(stack_dir, mlflow_port=mlflow_port, proxy=proxy)
    if proxy:
        extra_overrides = [f"sweep.storage_proxy={running.storage_proxy}", *extra_overrides]
    os.environ.update(running.worker_env())  # the workers inherit the tracking server's credentials
    pids = server_pids(running, proxy)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    levels = []
    for n_workers in worker_counts:
        # With a lock file, one heavy job at a time on a shared machine.
        with file_lock(lock_file) if lock_file else nullcontext(), tempfile.TemporaryDirectory(prefix="tfsweep-loadtest-") as tmp:
            study_name = f"loadtest-{stamp}-{n_workers}w"
            overrides = sweep_overrides(n_workers, n_workers * trials_per_worker, running.storage_url(),
                                        running.tracking_uri, Path(tmp), study_name, list(extra_overrides))
            log.info("%d workers, %d trials: study %s", n_workers, n_workers * trials_per_worker, study_name)
            level = run_level(overrides, n_workers, Path(tmp), pids, train_seconds, checkpoint_size)
            level["study"] = study_name
            levels.append(level)
            if not keep_artifacts:
                remove_checkpoint_artifacts(Path(running.state_dir) / "artifacts", study_name)
            log.info("%s", table([level]).splitlines()[-1])
    seconds, source = (trial_seconds, "--trial-seconds") if trial_seconds else default_trial_seconds()
    result = {"mode": "loadtest", "machine": machine(), "stack": {"mlflow": running.tracking_uri,
              "postgres": f"{running.host}:{running.pg_port}", "storage_proxy": running.storage_proxy if proxy else None,
              "mlflow_server": mlflow_server_command(running)},
              "trials_per_worker": trials_per_worker,
              "train_seconds": train_seconds, "levels": levels, "table": table(levels),
              "trial_seconds_source": source}
    if seconds:
        result["capacity"] = estimate_capacity(levels, seconds, server_cores or os.cpu_count())
    if results_dir is not None:
        path = results_dir / f"{result['machine']['date'][:16].replace(':', '')}-loadtest.json"
        write_atomically(path, json.dumps(result, indent=2))
        result["path"] = str(path)
    return result


def remove_checkpoint_artifacts(artifacts_root: Path, study_name: str) -> int:
    """Delete the checkpoint files a level's trials uploaded to the local stack (several GB at 64 workers);
    the runs, their metrics and other artifacts stay. Return how many runs were cleaned."""
    from mlflow import MlflowClient

    from tfsweep import sweep_tracking

    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{sweep_tracking.STUDY_TAG}` = '{study_name}'",
                              max_results=50000)
    for run in runs:
        uri = run.info.artifact_uri
        if uri.startswith("mlflow-artifacts:/"):
            shutil.rmtree(artifacts_root / uri.removeprefix("mlflow-artifacts:/").lstrip("/") / "checkpoints",
                          ignore_errors=True)
    return len(runs)
