"""A local multi-machine stack: PostgreSQL for the Optuna study and MLflow's store, and an MLflow
tracking server with basic auth that proxies artifacts, so sweep workers share nothing but the network.

Everything lives in one state folder (`.stack/` by default). Secrets are generated at first start and
kept in files readable only by their owner: `pgpass` (libpq's password file, found through PGPASSFILE)
and `worker.env` (MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). No password is put
on a command line, in a URL or in a log.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from dotenv import dotenv_values

from tfsweep.errors import UserError
from tfsweep.processes import process_alive, write_atomically

log = logging.getLogger(__name__)

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
DB_USER = "tfsweep"
DATABASES = ("optuna", "mlflow", "mlflow_auth")  # the study; MLflow's runs; MLflow's users and permissions
WORKER_USER = "worker"
ADMIN_USER = "admin"
READY_TIMEOUT_S = 120
# Room for ~350 direct workers (2-3 connections each at the peak) and the MLflow server; ~1.6 MB of the
# server's memory per connection. Workers through the storage proxy hold fewer.
PG_MAX_CONNECTIONS = 1000
MLFLOW_THREADS = 16  # request threads in each of the MLflow server's 2 processes


def mlflow_pool_env() -> dict[str, str]:
    """The MLflow server's database pool: two connections per request thread. Creating a run reads its
    experiment in a second session, so with one per thread, 16 run creations at once each held one and
    waited 30 s for another (`make loadtest ARGS="--proxy"` at 64 workers)."""
    return {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "5", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": str(2 * MLFLOW_THREADS - 5)}


class StackError(UserError):
    """The local stack cannot be started or used."""


@dataclass
class Stack:
    """Where the stack's services listen, as recorded in `state_dir/stack.json`."""

    state_dir: str
    host: str
    pg_port: int
    mlflow_port: int
    proxy_port: int | None = None  # Optuna's gRPC storage proxy, from the first `up(proxy=True)` on

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def storage_url(self) -> str:
        """The Optuna storage URL; the password comes from PGPASSFILE, not from the URL."""
        return f"postgresql://{DB_USER}@{self.host}:{self.pg_port}/optuna"

    @property
    def storage_proxy(self) -> str | None:
        """The `sweep.storage_proxy` setting of this stack's proxy, if it has one."""
        return None if self.proxy_port is None else f"{self.host}:{self.proxy_port}"

    @property
    def pgpass(self) -> Path:
        return Path(self.state_dir) / "pgpass"

    @property
    def worker_env_file(self) -> Path:
        return Path(self.state_dir) / "worker.env"

    def worker_env(self) -> dict[str, str]:
        """The environment a sweep worker needs: tracking server, its credentials, the password file."""
        return dict(dotenv_values(self.worker_env_file, interpolate=False))


def _pg_bin() -> Path:
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), reverse=True)
    if not found:
        raise StackError("PostgreSQL is not installed: `sudo apt-get install -y postgresql` (Debian's package)")
    return found[0]


def free_port(host: str) -> int:
    """A TCP port nothing listens on now (for a second stack beside the default one, as the tests start)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _as_postgres(*command: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """initdb and the server refuse to run as root, so they run as the `postgres` user when we are root."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, *command], input=stdin, capture_output=True, text=True, timeout=120)
    if result.returncode and check:
        raise StackError(f"{Path(command[0]).name} failed: {result.stderr.strip().splitlines()[-1:]}")
    return result


def _postgres_running(data: Path) -> bool:
    """pg_ctl's own check, so that a postmaster.pid left by a machine that went down does not count."""
    status = _as_postgres(str(_pg_bin() / "pg_ctl"), "-D", str(data), "status", check=False) if data.exists() else None
    return status is not None and status.returncode == 0


def _running_pid(pid_file: Path) -> int | None:
    """The process id `pid_file` records, while that process lives."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError):
        return None
    return pid if process_alive(pid) else None


def secrets_of(running: Stack) -> dict[str, str]:
    """The stack's generated passwords by name, so that a test can check that none reached the record."""
    return json.loads((Path(running.state_dir) / "secrets.json").read_text())


def load(state_dir: Path) -> Stack:
    try:
        return Stack(**json.loads((state_dir / "stack.json").read_text()))
    except FileNotFoundError:
        raise StackError(f"no stack in {state_dir}: start one with `make stack-up`") from None


def _start_postgres(stack: Stack, secrets_: dict[str, str]) -> None:
    pg_bin, state = _pg_bin(), Path(stack.state_dir)
    data, socket_dir = state / "postgres", state / "run"
    first_start = not data.exists()
    for folder in (data, socket_dir):
        folder.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    if first_start:
        # Local socket: the server's own OS user only; TCP: passwords (SCRAM), never trust.
        _as_postgres(str(pg_bin / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=peer",
                     "--auth-host=scram-sha-256")
    if not _postgres_running(data):
        _as_postgres(str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(socket_dir / "postgres.log"), "-w", "-o",
                     f"-p {stack.pg_port} -k {socket_dir} -c listen_addresses={stack.host} -c max_connections={PG_MAX_CONNECTIONS}",
                     "start")
    if first_start:
        psql = [str(pg_bin / "psql"), "-h", str(socket_dir), "-p", str(stack.pg_port), "-U", "postgres",
                "-v", "ON_ERROR_STOP=1", "-q"]
        # The password travels on stdin, not on a command line that `ps` would show.
        _as_postgres(*psql, stdin=f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{secrets_['postgres']}';\n")
        for database in DATABASES:
            _as_postgres(*psql, "-c", f"CREATE DATABASE {database} OWNER {DB_USER}")


def _start_mlflow(stack: Stack, secrets_: dict[str, str]) -> None:
    state = Path(stack.state_dir)
    if _running_pid(state / "mlflow.pid"):
        return
    db = f"postgresql://{DB_USER}@{stack.host}:{stack.pg_port}"
    (state / "basic_auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"  # the worker user manages what it creates; others may only look
        f"database_uri = {db}/mlflow_auth\n"
        f"admin_username = {ADMIN_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without it every request checks the password hash (PBKDF2, tens of ms of CPU): `make loadtest`
        # measured 20 CPU-seconds of the server per sweep trial, a ceiling of ~4 real workers.
        "auth_cache_ttl_seconds = 60\n")
    env = {**os.environ, "PGPASSFILE": str(stack.pgpass), "MLFLOW_AUTH_CONFIG_PATH": str(state / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets_["flask"],  # signs the auth app's CSRF tokens
           # No job runner: seven queue consumers for GenAI evaluation jobs, unused by sweeps, that took
           # memory and CPU from the servers' 2 cores (as in src/ui.py).
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **mlflow_pool_env()}
    # Gunicorn serves the Flask app itself; uvicorn (MLflow's default) wraps it in FastAPI and a thread
    # pool, which cost the server ~1.3-1.6x the CPU per sweep trial (docs/loadtest.md).
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"{db}/mlflow", "--serve-artifacts",
               "--artifacts-destination", str(state / "artifacts"),
               "--host", stack.host, "--port", str(stack.mlflow_port), "--workers", "2",
               "--gunicorn-opts", f"--worker-class gthread --threads {MLFLOW_THREADS} --timeout 120"]

    def healthy() -> bool:
        with urllib.request.urlopen(f"{stack.tracking_uri}/health", timeout=2) as response:
            return response.status == 200

    _start_server("mlflow", stack, command, env, healthy)


def _start_proxy(stack: Stack) -> None:
    if _running_pid(Path(stack.state_dir) / "proxy.pid"):
        return
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "stack.py"), "proxy", "--dir", stack.state_dir]

    def listening() -> bool:
        with socket.create_connection((stack.host, stack.proxy_port), timeout=2):
            return True

    _start_server("proxy", stack, command, {**os.environ, "PGPASSFILE": str(stack.pgpass)}, listening)


def _start_server(name: str, stack: Stack, command: list[str], env: dict[str, str],
                  ready: Callable[[], bool]) -> None:
    """Start `command` in its own session, logging to `<name>.log`; wait until `ready()` answers True."""
    state = Path(stack.state_dir)
    with open(state / f"{name}.log", "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    (state / f"{name}.pid").write_text(str(process.pid))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} server exited with code {process.returncode}; see {state / f'{name}.log'}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} server did not answer within {READY_TIMEOUT_S} s; see {state / f'{name}.log'}")


def _ensure_worker_user(stack: Stack, secrets_: dict[str, str]) -> None:
    from mlflow.server import get_app_client
    from unittest.mock import patch

    admin = {"MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": secrets_["admin"]}
    with patch.dict(os.environ, admin):
        client = get_app_client("basic-auth", tracking_uri=stack.tracking_uri)
        try:
            client.get_user(WORKER_USER)
        except Exception:  # RestException RESOURCE_DOES_NOT_EXIST: first start
            client.create_user(WORKER_USER, secrets_["worker"])


def up(state_dir: Path, host: str = "127.0.0.1", mlflow_port: int = 5001, proxy: bool = False) -> Stack:
    """Start (or find running) PostgreSQL and the MLflow server, and with `proxy` Optuna's storage proxy;
    create databases, users and secrets."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o711)  # the postgres user must reach its data folder inside
    secrets_file = state_dir / "secrets.json"
    if secrets_file.exists():
        secrets_ = json.loads(secrets_file.read_text())
        stack = load(state_dir)
    else:
        secrets_ = {name: secrets.token_urlsafe(24) for name in ("postgres", "admin", "worker", "flask")}
        write_atomically(secrets_file, json.dumps(secrets_), mode=0o600)
        stack = Stack(str(state_dir), host, free_port(host), mlflow_port)
    if proxy and stack.proxy_port is None:
        stack.proxy_port = free_port(stack.host)
    (state_dir / "stack.json").write_text(json.dumps(asdict(stack)))
    write_atomically(stack.pgpass, f"{host}:{stack.pg_port}:*:{DB_USER}:{secrets_['postgres']}\n", mode=0o600)
    write_atomically(stack.worker_env_file, f"export MLFLOW_TRACKING_URI={stack.tracking_uri}\n"
                     f"export MLFLOW_TRACKING_USERNAME={WORKER_USER}\n"
                     f"export MLFLOW_TRACKING_PASSWORD={secrets_['worker']}\n"
                     f"export PGPASSFILE={stack.pgpass}\n", mode=0o600)
    _start_postgres(stack, secrets_)
    _start_mlflow(stack, secrets_)
    _ensure_worker_user(stack, secrets_)
    if stack.proxy_port is not None:  # a stack once started with its proxy keeps it
        _start_proxy(stack)
    return stack


def serve_proxy(state_dir: Path) -> None:
    """Run the stack's storage proxy in this process until it is stopped."""
    from tfsweep.storage_proxy import serve

    running = load(state_dir.resolve())
    if running.proxy_port is None:
        raise StackError(f"the stack in {state_dir} has no proxy port: start it with `make stack-up ARGS=--proxy`")
    os.environ["PGPASSFILE"] = str(running.pgpass)
    serve(running.storage_url(), running.host, running.proxy_port)


def _stop_server(pid_file: Path) -> None:
    """Stop the process group `pid_file` records: SIGTERM, then SIGKILL after 10 s."""
    if (pid := _running_pid(pid_file)) is not None:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def down(state_dir: Path, purge: bool = False) -> None:
    """Stop the proxy, the MLflow server and PostgreSQL; with `purge`, delete the databases, artifacts and
    secrets."""
    state_dir = state_dir.resolve()
    for name in ("proxy", "mlflow"):
        _stop_server(state_dir / f"{name}.pid")
    data = state_dir / "postgres"
    if _postgres_running(data):
        _as_postgres(str(_pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    if purge:
        shutil.rmtree(state_dir, ignore_errors=True)
