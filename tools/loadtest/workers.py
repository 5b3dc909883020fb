"""The worker processes: each loads the sweep with the stand-in, waits for the others, runs trials, and
saves its timings; the parent starts them, releases them together and collects their records."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any
from unittest.mock import patch

from loadtest.clock import measure_calls
from loadtest.standin import install_stand_in


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def warm_up(ctx, workdir: str) -> None:
    """A worker's one-time start-up, done before the release as on a machine of its own: Hydra composes the
    sweep's command line (each trial then sets its values on a copy), MLflow resolves its context tags
    (importing GitPython), and the database driver and Optuna's table models are imported (no connection
    is made). Otherwise 64 workers pay it in the first seconds of the measured window."""
    from mlflow.tracking.context.registry import resolve_tags

    from tfsweep.sweep_config import trial_config

    trial_config(ctx.overrides, {}, workdir)
    resolve_tags({})
    if "://" in ctx.sweep.storage:
        import optuna.storages._rdb.models  # noqa: F401 - what RDBStorage imports on first use
        import sqlalchemy

        sqlalchemy.create_engine(ctx.sweep.storage).dispose()  # loads the driver; connects only when used


def worker_main(ctx, index: int, ready, start, out_path: str, train_seconds: float, checkpoint_size: int | None) -> None:
    """One worker process: load the sweep with the stand-in, wait for the others, run trials, save timings."""
    logging.basicConfig(level=logging.WARNING, format=f"[worker {index}] %(message)s")
    install_stand_in(train_seconds, checkpoint_size)
    from tfsweep import sweep

    warm_up(ctx, str(Path(out_path).with_suffix(".warm-up")))
    record: dict[str, Any] = {"worker": index, "pid": os.getpid(), "start_cpu_seconds": _cpu_seconds()}
    with measure_calls() as clock:
        ready.put(index)
        start.wait()
        started, cpu = time.perf_counter(), _cpu_seconds()
        try:
            sweep.work(ctx, index, show_progress=False)
        except Exception as exc:  # the parent reports it; the other workers go on
            # Where, too: an error through the storage proxy comes without a message.
            where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                               for f in reversed(traceback.extract_tb(exc.__traceback__, limit=-4)))
            record["error"] = f"{type(exc).__name__}: {exc} (at {where})"[:2000]
        record.update(seconds=time.perf_counter() - started, cpu_seconds=_cpu_seconds() - cpu,
                      max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      tensorflow_loaded="tensorflow" in sys.modules,
                      trials=[{**t, "calls": dict(t["calls"])} for t in clock.trials])
    Path(out_path).write_text(json.dumps(record))
    sys.exit(1 if "error" in record else 0)


class Workers:
    """`n_workers` worker processes of the sweep `ctx`, started and loaded, waiting to be released."""

    def __init__(self, ctx, n_workers: int, workdir: Path, train_seconds: float, checkpoint_size: int | None,
                 start_timeout: float) -> None:
        spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the parent's imports
        ready, self._start = spawn.Queue(), spawn.Event()
        self._outputs = [workdir / f"worker-{i}.json" for i in range(n_workers)]
        self._processes = [spawn.Process(target=worker_main, name=f"loadtest-worker-{i}",
                                         args=(ctx, i, ready, self._start, str(out), train_seconds, checkpoint_size))
                           for i, out in enumerate(self._outputs)]
        # Not a "View run ... at" line on stdout for every trial's end.
        with patch.dict(os.environ, {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
            for process in self._processes:
                process.start()
        self._wait_until_loaded(ready, start_timeout)

    def _wait_until_loaded(self, ready, timeout: float) -> None:
        """Wait until every worker has loaded and is ready; stop them all if one dies or time runs out."""
        deadline, loaded = time.monotonic() + timeout, 0
        while loaded < len(self._processes):
            try:
                ready.get(timeout=1)
                loaded += 1
            except queue.Empty:
                dead = [p for p in self._processes if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    for process in self._processes:
                        process.kill()
                    reason = (f"{dead[0].name} exited with code {dead[0].exitcode} while loading" if dead
                              else f"the workers did not all load within {timeout:.0f} s")
                    raise RuntimeError(f"load test stopped: {reason}")

    def release(self) -> None:
        self._start.set()

    def join(self) -> list[dict[str, Any]]:
        """Wait for every worker to exit; return each one's record with its exit code."""
        for process in self._processes:
            process.join()
        return [{**(json.loads(path.read_text()) if path.exists() else {"trials": []}), "exitcode": process.exitcode}
                for process, path in zip(self._processes, self._outputs)]
