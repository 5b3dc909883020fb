"""Optuna's gRPC storage proxy in front of the study's database, for many workers (`sweep.storage_proxy`).

Workers send the study's reads and writes to one proxy process (`serve`, started by `make stack-up
ARGS=--proxy`), which keeps one connection pool and Optuna's cache of finished trials for all of them.
The proxy's API has no heartbeat, so `ProxyStorage` writes a trial's heartbeat to the database itself,
as the study lock does: both are a short connection now and then, not a read of the study.
"""

from __future__ import annotations

import logging

import optuna
from optuna.storages import GrpcStorageProxy, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

log = logging.getLogger(__name__)


def address(host_port: str) -> tuple[str, int]:
    """("host", port) of "host:port"; ValueError when it is not that."""
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{host_port!r} is not host:port")
    return host, int(port)


class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
    """The proxy's client for the study, with the heartbeat of Optuna's RDBStorage on the database.

    `heartbeat` is an RDBStorage of the same database, with the sweep's heartbeat interval; Optuna's
    heartbeat thread and `fail_stale_trials` see this storage as one that has a heartbeat.
    """

    def __init__(self, host_port: str, heartbeat: RDBStorage) -> None:
        host, port = address(host_port)
        super().__init__(host=host, port=port)
        self._heartbeat = heartbeat

    def record_heartbeat(self, trial_id: int) -> None:
        self._heartbeat.record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return self._heartbeat._get_stale_trial_ids(study_id)  # noqa: SLF001 - BaseHeartbeat's own name

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat.get_heartbeat_interval()

    def get_heartbeat_stale_trial_callback(self):
        return None  # `study.recover` queues the retries


def serve(database_url: str, host: str, port: int) -> None:
    """Run the proxy for `database_url` until the process is stopped (`python src/stack.py proxy`)."""
    from tfsweep.study import experimental_ok

    with experimental_ok():
        # get_storage, as Optuna's docs advise: its cache keeps finished trials out of the database's reads.
        storage = optuna.storages.get_storage(database_url)
        log.info("Optuna storage proxy on %s:%d", host, port)
        optuna.storages.run_grpc_proxy_server(storage, host=host, port=port)
