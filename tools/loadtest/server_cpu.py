"""The servers' load: CPU seconds from /proc (the MLflow server's, PostgreSQL's and the storage proxy's,
children included), and PostgreSQL's open connections at their peak."""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path


def server_pids(stack, proxy: bool = False) -> dict[str, int]:
    """The MLflow server's and the PostgreSQL postmaster's process ids, and with `proxy` the storage
    proxy's, from the stack's state folder."""
    state = Path(stack.state_dir)
    pid_files = {"mlflow": state / "mlflow.pid", "postgres": state / "postgres" / "postmaster.pid",
                 **({"proxy": state / "proxy.pid"} if proxy else {})}
    return {name: int(path.read_text().split()[0]) for name, path in pid_files.items()}


def mlflow_server_command(stack) -> str:
    """How the stack runs the MLflow server (its `mlflow server` options): the server type changes its CPU."""
    pid = server_pids(stack)["mlflow"]
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    return " ".join(arguments[arguments.index("server"):])  # the pid file's process is the `mlflow` command


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


class ConnectionPeak:
    """The most client connections a PostgreSQL server had open at once while the block ran (the study's
    and MLflow's databases together: they share `max_connections`), sampled every `every` seconds from
    `pg_stat_activity` over one connection of its own (not counted)."""

    def __init__(self, url: str, every: float = 0.2) -> None:
        self.url, self.every, self.peak, self.max_connections = url, every, 0, None
        self._stop = threading.Event()

    def _sample(self) -> None:
        import sqlalchemy

        # Autocommit: PostgreSQL keeps one snapshot of pg_stat_activity for a whole transaction.
        engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")
        query = sqlalchemy.text("SELECT count(*) - 1 FROM pg_stat_activity WHERE backend_type = 'client backend'")
        with engine.connect() as connection:
            self.max_connections = int(connection.execute(sqlalchemy.text("SHOW max_connections")).scalar_one())
            while not self._stop.is_set():
                self.peak = max(self.peak, connection.execute(query).scalar_one())
                self._stop.wait(self.every)

    def __enter__(self) -> "ConnectionPeak":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
