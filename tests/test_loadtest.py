"""The load test: stand-in workers run the real sweep loop, and its table counts every trial once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from loadtest import level as levels, report, server_cpu, standin
from loadtest.clock import DETAILS, GROUPS
from tfsweep.sweep_config import compose_sweep

SRC = Path(__file__).resolve().parents[1] / "src"


def level(workers: int, **per_trial_p50: float) -> dict:
    """A summarized level with the given p50 seconds per trial, as `summarize_level` makes it."""
    groups = {g: {"p50": per_trial_p50.get(g, 0.01), "p99": 0.02} for g in (*GROUPS, *DETAILS)}
    return {"workers": workers, "trials": 2 * workers, "wall_seconds": 10.0, "trials_per_minute": 12.0 * workers,
            "per_trial": groups, "errors": 0, "duplicated": 0, "lost": 0,
            "server_cpu_seconds_per_trial": {"mlflow": 0.5, "postgres": 0.1}}


def test_checkpoint_size_is_the_real_networks():
    cfg = compose_sweep(["optimizer=adam"])
    # conv 5x5x1x32, conv 5x5x32x64, dense 7*7*64 -> 1024, logits 1024 -> 10, each with biases; Adam keeps
    # two slots per weight.
    weights = 5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 7 * 7 * 64 * 1024 + 1024 + 1024 * 10 + 10
    assert standin.checkpoint_bytes(cfg) == 4 * weights * 3


def test_stand_in_calls_hooks_where_the_trainer_does(tmp_path):
    from tfsweep.hooks import Hook

    class Recorder(Hook):
        def __init__(self):
            self.calls = []

        def begin(self, trainer):
            self.calls.append("begin")

        def after_log(self, trainer, step, logs):
            self.calls.append(f"log {step}")

        def before_eval(self, trainer, step, split):
            self.calls.append(f"eval? {step}")

        def after_eval(self, trainer, step, split, metrics):
            self.calls.append(f"eval {step}")
            if step == 40:
                trainer.request_stop("pruned")

        def before_checkpoint(self, trainer, step):
            self.calls.append(f"save {step}")

        def after_checkpoint(self, trainer, step, path):
            assert Path(path + ".index").exists() and trainer.manager.latest_checkpoint == path

        def end(self, trainer, error):
            self.calls.append(f"end {error}")

    cfg = compose_sweep(["trainer.steps=100", "trainer.log_every=10", "trainer.eval_every=20",
                         "trainer.checkpoint_every=20", "trainer.keep_checkpoints=1",
                         f"paths.output_dir={tmp_path}"])
    recorder = Recorder()
    trainer = standin.StandInTrainer(cfg, [recorder], train_seconds=0, checkpoint_size=10_000)
    trainer.train()
    assert recorder.calls == ["begin", "log 10", "log 20", "eval? 20", "eval 20", "save 20", "log 30", "log 40",
                              "eval? 40", "eval 40", "save 40", "end None"]
    kept = sorted(p.name for p in Path(cfg.trainer.model_dir).glob("ckpt-*"))
    assert kept == ["ckpt-40.data-00000-of-00001", "ckpt-40.index"]
    assert (Path(cfg.trainer.model_dir) / "ckpt-40.data-00000-of-00001").stat().st_size == 10_000


def test_an_error_in_the_stand_in_reaches_every_hooks_end_and_the_caller(tmp_path):
    from tfsweep.hooks import Hook

    class Failing(Hook):
        def after_eval(self, trainer, step, split, metrics):
            raise ValueError(f"eval at {step}")

    class Ends(Hook):
        def end(self, trainer, error):
            self.error = error

    cfg = compose_sweep(["trainer.steps=100", "trainer.log_every=10", "trainer.eval_every=50",
                         "trainer.checkpoint_every=50", f"paths.output_dir={tmp_path}"])
    ends = Ends()
    with pytest.raises(ValueError, match="eval at 50"):
        standin.StandInTrainer(cfg, [Failing(), ends], train_seconds=0, checkpoint_size=10_000).train()
    assert isinstance(ends.error, ValueError) and str(ends.error) == "eval at 50"
    assert not list(Path(cfg.trainer.model_dir).glob("ckpt-*"))  # it stopped before the checkpoint at 50


def test_percentiles_interpolate_and_are_none_without_values():
    assert levels.p50_p99([1.0, 2.0, 3.0, 4.0]) == {"p50": 2.5, "p99": pytest.approx(3.97)}
    assert levels.p50_p99([]) == {"p50": None, "p99": None}


def test_server_cpu_counts_the_children_a_process_has_reaped():
    burn = "import time\nwhile time.process_time() < 0.5: pass"
    before = server_cpu.tree_cpu_seconds(os.getpid())
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert server_cpu.tree_cpu_seconds(os.getpid()) - before >= 0.45


def test_table_has_every_column_and_one_row_per_level():
    text = report.table([level(2), level(4)])
    header, rule, *rows = text.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == report.COLUMNS
    for name in ("ask", "suggest", "report+prune", "tell", "run create", "metrics", "upload", "end", "errors",
                 "duplicated", "lost", "trials/min"):
        assert any(name in column for column in report.COLUMNS)
    assert [row.split("|")[1].strip() for row in rows] == ["2", "4"]


def test_capacity_names_the_lowest_ceiling_and_the_fastest_growing_call():
    small, large = level(2, ask=0.01), level(16, ask=0.2)
    large["server_cpu_seconds_per_trial"] = {"mlflow": 0.4, "postgres": 0.05}
    large["alone_hold_seconds_per_trial"] = 0.004
    estimate = report.estimate_capacity([small, large], trial_seconds=40.0, server_cores=2)
    assert estimate["workers_by_ceiling"] == {"mlflow CPU": 200, "postgres CPU": 1600, "study lock": 10000}
    assert estimate["first_limit"] == "mlflow CPU" and estimate["workers"] == 200
    large.update(database_connections_peak=48, database_max_connections=300)  # 3 per worker
    estimate = report.estimate_capacity([small, large], trial_seconds=40.0, server_cores=2)
    assert estimate["workers_by_ceiling"]["postgres connections"] == 100
    assert estimate["first_limit"] == "postgres connections" and estimate["workers"] == 100
    assert estimate["grows_first"] == "ask"


def test_default_trial_seconds_come_from_the_newest_full_benchmark(tmp_path):
    (tmp_path / "2026-01-01T0000-full.json").write_text('{"rows": {"sweep_overhead": {"detail": '
                                                         '{"median_trial_seconds": 30.0}}}}')
    (tmp_path / "2026-02-01T0000-full.json").write_text('{"rows": {"sweep_overhead": {"detail": '
                                                         '{"median_trial_seconds": 41.5}}}}')
    (tmp_path / "2026-03-01T0000-quick.json").write_text('{"rows": {}}')
    seconds, _ = report.default_trial_seconds(tmp_path)
    assert seconds == 41.5
    assert report.default_trial_seconds(tmp_path / "none")[0] is None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_level(result: dict, trials: int) -> None:
    assert result["errors"] == 0, result["error_messages"]
    assert result["duplicated"] == 0 and result["lost"] == 0, result["audit"]
    audit = result["audit"]
    assert audit["study_trials"] == trials and audit["mlflow_runs"] == trials and audit["left_running"] == 0
    assert result["trials_per_minute"] > 0 and result["workers_loaded_tensorflow"] == 0
    assert result["worker_start_cpu_seconds"]["p50"] > 0  # each worker's start-up, outside the window
    for group in GROUPS:  # every group was timed in every trial: a call path that moved shows here
        assert result["per_call"][group]["calls"] >= trials, group
        assert result["per_trial"][group]["p50"] > 0, group


def test_warm_up_composes_what_every_trial_of_the_default_sweep_copies(tmp_path):
    """The worker's first compose happens before the release: a trial's config is then a cache hit."""
    from loadtest.workers import warm_up
    from tfsweep import sweep_config

    cfg = compose_sweep([f"sweep.dir={tmp_path}"])
    ctx = sweep_config.SweepContext(sweep_config.check(cfg), sweep_config.command_overrides(cfg), "lt", None)
    sweep_config._cached_compose.cache_clear()
    warm_up(ctx, str(tmp_path / "warm-up"))
    hits = sweep_config._cached_compose.cache_info().hits
    params = {"data.batch_size": 128, "optimizer.learning_rate": 3e-3, "model.dropout": 0.2}
    assert set(params) == set(ctx.sweep.params)
    sweep_config.trial_config(ctx.overrides, params, str(tmp_path / "0000"))
    assert sweep_config._cached_compose.cache_info().hits == hits + 1


def test_workers_on_a_journal_and_sqlite_count_every_trial_once(tmp_path):
    """Two stand-in workers run the sweep's real loop on a journal file and a local MLflow store."""
    overrides = levels.sweep_overrides(2, 2, str(tmp_path / "journal.log"), f"sqlite:///{tmp_path}/mlflow.db",
                                         tmp_path, "lt", ["trainer.steps=100"])
    result = levels.run_level(overrides, 2, tmp_path)
    check_level(result, trials=2)


@pytest.mark.slow
@pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")), reason="needs PostgreSQL")
@pytest.mark.parametrize("proxy", [[], ["--proxy"]], ids=["database", "storage proxy"])
def test_make_loadtest_on_the_stack(tmp_path, proxy):
    """`python -m loadtest` with 4 workers on a fresh local stack: the table, 0 duplicated, 0 lost."""
    stack_dir = Path(tempfile.mkdtemp(prefix="tfsweep-loadtest-"))  # the postgres user cannot enter pytest's root-only tmp
    command = [sys.executable, "-m", "loadtest", "--workers", "4", "--trials-per-worker", "2", *proxy,
               "--stack-dir", str(stack_dir), "--mlflow-port", str(free_port()), "--trial-seconds", "40",
               "--results-dir", str(tmp_path / "results"), "trainer.steps=200"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        subprocess.run([sys.executable, str(SRC / "stack.py"), "down", "--dir", str(stack_dir)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| workers"))
    assert [c.strip() for c in header.strip("|").split("|")] == report.COLUMNS
    row = next(line for line in lines if line.startswith("| 4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "8" and cells[-3:] == ["0", "0", "0"]  # trials; errors, duplicated, lost
    # Each of the 4 workers holds a pooled connection of its own (through the proxy, the proxy's pool does),
    # and MLflow's server a few.
    assert int(cells[report.COLUMNS.index("db connections peak")]) >= (2 if proxy else 5)
    assert any(line.startswith("capacity at 40.0 s a trial") for line in lines)
    assert ("proxy CPU" in next(line for line in lines if line.startswith("capacity"))) is bool(proxy)
    saved = list((tmp_path / "results").glob("*-loadtest.json"))
    assert len(saved) == 1
    assert "--gunicorn-opts" in json.loads(saved[0].read_text())["stack"]["mlflow_server"]  # what it measured
    shutil.rmtree(stack_dir, ignore_errors=True)
