"""One load level: a fresh study run by N stand-in workers started together, and its row of figures."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from loadtest.audit import audit_study
from loadtest.clock import DETAILS, GROUPS
from loadtest.server_cpu import ConnectionPeak, cpu_seconds
from loadtest.workers import Workers

EXPERIMENT = "tfsweep-loadtest"


def sweep_overrides(n_workers: int, n_trials: int, storage: str, tracking_uri: str, workdir: Path,
                    study_name: str, extra: list[str] = ()) -> list[str]:
    """The sweep command line of a load level: the default sweep on the given storage and tracking server."""
    return [f"sweep.study_name={study_name}", f"sweep.storage='{storage}'", f"sweep.n_trials={n_trials}",
            f"sweep.n_workers={n_workers}", f"sweep.dir='{workdir / study_name}'", f"tracking.uri='{tracking_uri}'",
            f"tracking.experiment_name={EXPERIMENT}", *extra]


def run_level(overrides: list[str], n_workers: int, workdir: Path, pids: dict[str, int] | None = None,
              train_seconds: float = 0.005, checkpoint_size: int | None = None,
              start_timeout: float = 900) -> dict[str, Any]:
    """Run one sweep of `n_workers` stand-in workers started together; return its measurements.

    The parent prepares the study as `run_sweep` does (checks, storage, parent run), starts the workers,
    releases them at once when all have loaded, and times from that moment to the last one's exit.
    The finished study is not published: that happens once per study, not per trial.
    """
    from tfsweep import study as studies
    from tfsweep import sweep_tracking
    from tfsweep.config import flatten
    from tfsweep.sweep_config import SweepContext, check, command_overrides, compose_sweep

    cfg = compose_sweep(overrides)
    sweep = check(cfg)
    ctx = SweepContext(sweep, command_overrides(cfg), cfg.tracking.experiment_name, cfg.tracking.uri)
    client = ctx.client()
    study = studies.load_study(sweep, studies.open_storage(sweep))
    ctx.parent_run_id = sweep_tracking.parent_run(client, ctx.experiment, study,
                                                  {f"sweep.{k}": v for k, v in flatten(cfg.sweep).items()
                                                   if k != "storage"})
    workers = Workers(ctx, n_workers, workdir, train_seconds, checkpoint_size, start_timeout)
    connections = ConnectionPeak(sweep.storage) if sweep.storage.startswith("postgresql") else nullcontext()
    with connections:
        workers.release()
        started, cpu_before = time.perf_counter(), cpu_seconds(pids or {})
        records = workers.join()
        wall = time.perf_counter() - started
    server_cpu = {name: seconds - cpu_before[name] for name, seconds in cpu_seconds(pids or {}).items()}
    audit = audit_study(studies.load_study(sweep, studies.open_storage(sweep)), sweep.n_trials,
                        client, ctx.experiment, sweep.study_name)
    return summarize_level(n_workers, sweep.n_trials, wall, records, audit, server_cpu,
                           getattr(connections, "peak", None), getattr(connections, "max_connections", None))


def p50_p99(values: list[float]) -> dict[str, float | None]:
    """The median and the 99th percentile (numpy's linear interpolation); None for no values."""
    import numpy as np

    return dict(zip(("p50", "p99"), map(float, np.percentile(values, [50, 99])) if values else (None, None)))


def summarize_level(n_workers: int, n_trials: int, wall: float, workers: list[dict], audit: dict[str, Any],
                    server_cpu: dict[str, float], peak_connections: int | None = None,
                    max_connections: int | None = None) -> dict[str, Any]:
    """The level's row: trials per minute, per-trial p50/p99 seconds of each group, errors, duplicates, losses."""
    trials = [t for w in workers for t in w.get("trials", [])]
    per_trial = {group: [sum(t["calls"].get(group, [])) for t in trials] for group in (*GROUPS, *DETAILS)}
    per_call = {group: [s for t in trials for s in t["calls"].get(group, [])] for group in (*GROUPS, *DETAILS)}
    worker_errors = [f"worker {w.get('worker')}: {w.get('error') or 'exit code %s' % w['exitcode']}"
                     for w in workers if w.get("error") or w["exitcode"]]
    told = len(trials)
    return {
        "workers": n_workers,
        "trials": n_trials,
        "wall_seconds": wall,
        "trials_per_minute": 60 * told / wall if wall else None,
        "trial_seconds": p50_p99([t["wall_seconds"] for t in trials]),
        "per_trial": {group: p50_p99(seconds) for group, seconds in per_trial.items()},
        "per_call": {group: {"calls": len(seconds), **p50_p99(seconds)} for group, seconds in per_call.items()},
        # Held alone, the lock stops every asker: its seconds per trial, not a trial's p50 (most have none).
        "alone_hold_seconds_per_trial": sum(per_trial["alone_hold"]) / told if told else None,
        "errors": len(worker_errors) + len(audit["failed"]) + audit["runs_not_finished"],
        "error_messages": worker_errors + [f"trial {f['number']}: {f['reason']}" for f in audit["failed"]],
        "duplicated": audit["duplicated_trials"] + audit["duplicated_runs"],
        "lost": audit["lost_trials"] + audit["lost_runs"],
        "audit": audit,
        "server_cpu_seconds": server_cpu,
        "database_connections_peak": peak_connections,  # all of PostgreSQL's; None on other storage
        "database_max_connections": max_connections,
        "server_cpu_seconds_per_trial": {k: v / told for k, v in server_cpu.items()} if told else {},
        "worker_cpu_seconds_per_trial": sum(w.get("cpu_seconds", 0) for w in workers) / told if told else None,
        # Each worker's start-up (imports, the first compose) before the release, outside the figures above.
        "worker_start_cpu_seconds": p50_p99([w["start_cpu_seconds"] for w in workers if "start_cpu_seconds" in w]),
        "workers_loaded_tensorflow": sum(bool(w.get("tensorflow_loaded")) for w in workers),
        "worker_max_rss_mb": max((w.get("max_rss_mb", 0) for w in workers), default=None),
    }
