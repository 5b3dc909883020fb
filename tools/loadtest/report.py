"""What the load test concludes and shows: the table, the capacity estimate, the machine it ran on."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loadtest.clock import GROUPS

PROJECT_DIR = Path(__file__).resolve().parents[2]
RESULTS_DIR = PROJECT_DIR / "bench" / "results"


def default_trial_seconds(results_dir: Path = RESULTS_DIR) -> tuple[float | None, str]:
    """A default-sweep trial's median wall time, from the newest full benchmark's sweep-overhead row
    (rows 6-8 run the default sweep); (None, reason) when there is none."""
    for path in sorted(results_dir.glob("*-full.json"), reverse=True):
        row = json.loads(path.read_text()).get("rows", {}).get("sweep_overhead", {})
        seconds = (row.get("detail") or {}).get("median_trial_seconds")
        if seconds:
            shown = path.relative_to(PROJECT_DIR) if path.is_relative_to(PROJECT_DIR) else path
            return float(seconds), f"{shown}, median default-sweep trial"
    return None, "no full benchmark in bench/results; give --trial-seconds"


def estimate_capacity(levels: list[dict[str, Any]], trial_seconds: float, server_cores: float) -> dict[str, Any]:
    """How many real workers one PostgreSQL and one MLflow server can feed, and the first bottleneck.

    Ceilings from the largest level: each server's CPU seconds per trial (a server with
    `server_cores` cores serves at most server_cores / cpu_per_trial trials a second), and the study
    lock held alone (recovery), which stops every asker: at most 1 / (its seconds per trial) trials a
    second. Held shared, to take a trial, it stops no one. A worker asks for one trial
    every `trial_seconds`, so a ceiling of R trials per second feeds R x trial_seconds workers. One more
    does not depend on the trial's length: PostgreSQL's `max_connections`, shared by the study and
    MLflow, over the connections open at the peak per worker. The first bottleneck by latency is the group
    whose p50 per trial grew most from the smallest level to the largest.
    """
    smallest, largest = levels[0], levels[-1]
    ceilings = {f"{server} CPU": server_cores / cpu * trial_seconds
                for server, cpu in largest["server_cpu_seconds_per_trial"].items() if cpu > 0}
    hold = largest.get("alone_hold_seconds_per_trial")
    if hold:
        ceilings["study lock"] = trial_seconds / hold
    if largest.get("database_connections_peak"):
        ceilings["postgres connections"] = (largest["database_max_connections"] * largest["workers"]
                                            / largest["database_connections_peak"])
    p50s = {group: (smallest["per_trial"][group]["p50"], largest["per_trial"][group]["p50"]) for group in GROUPS}
    growth = {group: high / low for group, (low, high) in p50s.items() if low and high}
    limit = min(ceilings, key=ceilings.get) if ceilings else None
    return {"trial_seconds": trial_seconds, "server_cores": server_cores,
            "workers_by_ceiling": {k: round(v) for k, v in ceilings.items()},
            "workers": round(ceilings[limit]) if limit else None, "first_limit": limit,
            "p50_growth": growth, "grows_first": max(growth, key=growth.get) if growth else None}


COLUMNS = ["workers", "trials", "wall s", "trials/min", *(f"{label} p50/p99 ms" for label in GROUPS.values()),
           "lock shared p50/p99 ms", "lock alone ms/trial", "db connections peak", "errors", "duplicated", "lost"]


def table(levels: list[dict[str, Any]]) -> str:
    """The markdown table of the levels: one row per number of workers."""
    def ms(stats: dict[str, float | None]) -> str:
        return "/".join("-" if stats[q] is None else f"{1000 * stats[q]:.0f}" for q in ("p50", "p99"))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for level in levels:
        cells = [str(level["workers"]), str(level["trials"]), f"{level['wall_seconds']:.1f}",
                 f"{level['trials_per_minute']:.0f}", *(ms(level["per_trial"][g]) for g in GROUPS),
                 ms(level["per_trial"]["lock_hold"]), f"{1000 * (level.get('alone_hold_seconds_per_trial') or 0):.0f}",
                 str(level.get("database_connections_peak") or "-"),
                 str(level["errors"]), str(level["duplicated"]), str(level["lost"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capacity_lines(result: dict[str, Any]) -> list[str]:
    """The capacity estimate in two lines, or why there is none."""
    capacity = result.get("capacity")
    if not capacity:
        return [f"no capacity estimate: {result['trial_seconds_source']}"]
    ceilings = ", ".join(f"{name} {workers}" for name, workers in capacity["workers_by_ceiling"].items())
    return [f"capacity at {capacity['trial_seconds']:.1f} s a trial ({result['trial_seconds_source']}), servers on "
            f"{capacity['server_cores']:g} cores: about {capacity['workers']} workers; first limit: "
            f"{capacity['first_limit']} (workers per ceiling: {ceilings})",
            f"p50 per trial grew most with the workers in: {capacity['grows_first']} "
            f"(x{capacity['p50_growth'].get(capacity['grows_first'], float('nan')):.1f})"]


def machine() -> dict[str, Any]:
    """The machine and the coordination software a result was measured on.

    Not `bench.machine.describe()`: that one imports TensorFlow for its version and the CPU's
    float32 peak, which decide training speed, not the servers' and the study's.
    """
    from tfsweep.cpu import read_cpuinfo

    versions = {}
    for package in ("optuna", "mlflow", "sqlalchemy", "psycopg2-binary"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {"cpu": read_cpuinfo()["model_name"], "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), **versions,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
