"""The servers' CPU seconds, read from /proc: the MLflow server's and PostgreSQL's, children included."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path


def server_pids(stack) -> dict[str, int]:
    """The MLflow server's and the PostgreSQL postmaster's process ids, from the stack's state folder."""
    state = Path(stack.state_dir)
    return {"mlflow": int((state / "mlflow.pid").read_text().split()[0]),
            "postgres": int((state / "postgres" / "postmaster.pid").read_text().split()[0])}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    return {name: tree_cpu_seconds(pid) for name, pid in pids.items()}


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children it has reaped (PostgreSQL's
    backends end with their connections)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = defaultdict(list)
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()  # after the command's name
        except OSError:  # ended while we read
            continue
        stats[int(entry.name)] = fields
        children[int(fields[1])].append(int(entry.name))
    total, pending = 0.0, [root_pid]
    while pending:
        pid = pending.pop()
        if pid in stats:
            total += sum(map(int, stats[pid][11:15])) / tick  # utime, stime, cutime, cstime
        pending.extend(children.get(pid, []))
    return total
