"""Workers that share only the network: the local stack (PostgreSQL + an authenticated MLflow server that
proxies artifacts), four sweep workers started at the same instant, each in its own folder with its own
HOME and TMPDIR (and, where we may, its own host name), and one of them killed mid-trial like a machine
that dies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from sweep_fixtures import PROJECT_DIR, synthetic_mnist
from tfsweep import stack
from tfsweep import study as studies
from tfsweep.processes import process_alive

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin")),
                                                   reason="needs the Debian package postgresql")]

N_WORKERS, N_TRIALS, STEPS, HEARTBEAT = 4, 6, 60, 2


@pytest.fixture(scope="module")
def running_stack():
    state = Path(tempfile.mkdtemp(prefix="tfsweep-stack-"))  # the postgres user must reach it: not under pytest's
    try:
        yield stack.up(state, mlflow_port=stack.free_port("127.0.0.1"), proxy=True)
    finally:
        stack.down(state, purge=True)


def own_machine() -> list[str]:
    """A prefix giving the worker its own host name when we may (root), so that only the heartbeat, not a
    process check on a shared host, can tell that its worker died."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("hostname"):
        return ["unshare", "--uts", "sh", "-c", 'hostname "$WORKER_HOST" && exec "$@"', "sh"]
    return []


def start_workers(base: Path, running: stack.Stack, study: str, proxy: bool) -> list[tuple[subprocess.Popen, Path]]:
    """Prepare each worker's folders, then start them all at once; each is its own process group."""
    commands = []
    for index in range(N_WORKERS):
        root = base / f"worker-{index}"
        work, home, tmp = root / "work", root / "home", root / "tmp"
        for folder in (work, home, tmp):
            folder.mkdir(parents=True)
        shutil.copy(running.pgpass, home / ".pgpass")  # libpq's default place, mode 600 kept
        digests = synthetic_mnist(work / "data")
        # The same command line on every worker: every path is relative to the worker's own folder.
        overrides = [
            "data.root=data", "data.mirrors=[]", "data.fallback=none", "data.validation_size=100",
            "data.eval_batch_size=100", "data.shuffle_buffer=500",
            *(f"data.{split}.sha256={digest}" for split, digest in digests.items()),
            "model.filters=[4,8]", "model.dense_units=16", f"trainer.steps={STEPS}", "trainer.log_every=5",
            "trainer.eval_every=10", "trainer.checkpoint_every=10", "trainer.precision=float32",
            "schedule=constant", "tracking.log_checkpoints=true", "sweeps/pruner=none", f"sweep.study_name={study}",
            f"sweep.storage={running.storage_url()}", f"sweep.n_trials={N_TRIALS}",
            f"sweep.heartbeat_seconds={HEARTBEAT}", *([f"sweep.storage_proxy={running.storage_proxy}"] if proxy else []),
        ]
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "2",
               "WORKER_HOST": f"machine-{index}",
               **{k: v for k, v in running.worker_env().items() if k != "PGPASSFILE"}}  # ~/.pgpass instead
        commands.append((own_machine() + [sys.executable, str(PROJECT_DIR / "src" / "sweep.py"), *overrides],
                         env, work, root))
    return [(subprocess.Popen(command, cwd=work, env=env, stdout=open(root / "output.txt", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True), root)
            for command, env, work, root in commands]


def victim_trial(study: optuna.Study, client: MlflowClient, pids: set[int]):
    """A running trial of one of our workers whose run already holds an uploaded checkpoint."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_id, worker = trial.user_attrs.get("mlflow_run_id"), str(trial.user_attrs.get("worker", ""))
        if run_id and int(worker.rpartition(":")[2] or 0) in pids and any(
                a.path == "checkpoints/checkpoint" for a in client.list_artifacts(run_id, "checkpoints")):
            return trial
    return None


@pytest.mark.parametrize("proxy", [False, True], ids=["database", "storage proxy"])
def test_four_workers_sharing_only_the_network_survive_a_dead_machine(running_stack, monkeypatch, proxy):
    """Through the storage proxy too: only its heartbeat, written to the database, shows the dead machine."""
    started, study_name = time.monotonic(), f"stack-{'proxy' if proxy else 'database'}"
    base = Path(tempfile.mkdtemp(prefix="tfsweep-workers-"))
    for key, value in running_stack.worker_env().items():
        monkeypatch.setenv(key, value)  # this test reads the record as a worker would
    client = MlflowClient(running_stack.tracking_uri)
    workers = start_workers(base, running_stack, study_name, proxy)
    try:
        study, victim = None, None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline and all(w.poll() is None for w, _ in workers):
            try:
                study = study or optuna.load_study(study_name=study_name, storage=running_stack.storage_url())
                victim = victim_trial(study, client, {w.pid for w, _ in workers})
            except KeyError:  # the study does not exist yet
                pass
            if victim is None:
                time.sleep(0.2)
        assert victim is not None, "no trial was seen with an uploaded checkpoint: " + "\n-----\n".join(
            (root / "output.txt").read_text()[-1500:] for _, root in workers)
        [(killed, killed_root)] = [(w, r) for w, r in workers if str(w.pid) == victim.user_attrs["worker"].rpartition(":")[2]]
        os.killpg(killed.pid, signal.SIGKILL)  # the machine dies: no finally, no heartbeat any more
        for worker, _ in workers:
            worker.wait(timeout=300)
    finally:
        for worker, _ in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    outputs = {root: (root / "output.txt").read_text() for _, root in workers}
    survivors = [(w, r) for w, r in workers if w is not killed]
    assert [w.returncode for w, _ in survivors] == [0] * (N_WORKERS - 1), "\n-----\n".join(
        outputs[r][-2000:] for _, r in survivors)

    # Exactly the requested trials; the dead machine's trial was retried elsewhere, from its artifacts.
    study = optuna.load_study(study_name=study_name, storage=running_stack.storage_url())
    trials = study.get_trials()
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * N_TRIALS + ["FAIL"]
    [failed] = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == victim.number and "fail_reason" not in failed.user_attrs
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    assert retry.user_attrs["restored_step"] >= 10  # resumed from the checkpoint it had uploaded, not step 0
    assert study.metric_names == ["val/accuracy"]

    # One MLflow child run per trial (the retry continued the dead attempt's run), nothing left running.
    experiment = client.get_experiment_by_name("mnist-cnn")
    runs = client.search_runs([experiment.experiment_id], f"tags.`sweep.study_name` = '{study_name}'")
    children = [r for r in runs if r.data.tags["sweep.role"] == "trial"]
    [parent] = [r for r in runs if r.data.tags["sweep.role"] == "study"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(
        t.number for t in trials if t.state == TrialState.COMPLETE)
    assert retry.user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]
    assert {r.info.status for r in client.search_runs([experiment.experiment_id])} == {"FINISHED"}
    steps = [m.step for m in client.get_metric_history(retry.user_attrs["mlflow_run_id"], "train/loss")]
    assert sorted(steps) == list(range(5, STEPS + 1, 5))  # each step once across both attempts
    assert retry.user_attrs["mlflow_run_url"] == (f"{running_stack.tracking_uri}/#/experiments/"
                                                  f"{experiment.experiment_id}/runs/{retry.user_attrs['mlflow_run_id']}")

    # One publisher: one final summary, the parent's results and best_trial.yaml as an artifact.
    assert sum("best trial" in output for output in outputs.values()) == 1
    assert parent.data.tags["best.trial_number"] == str(studies.best_trial(study).number)
    assert "best_test_accuracy" in parent.data.metrics
    assert "best_trial.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # No password anywhere: worker output, logs, .hydra/ files, trial folders, artifacts, params, tags.
    secrets = stack.secrets_of(running_stack)
    files = [p for p in base.rglob("*") if p.is_file() and p.name != ".pgpass"]
    files += [p for p in (Path(running_stack.state_dir) / "artifacts").rglob("*") if p.is_file()]
    files += [Path(running_stack.state_dir) / name for name in ("mlflow.log", "proxy.log")]
    assert any(".hydra" in p.parts for p in files) and len(files) > 50
    leaks = [f"{p}: {name}" for p in files for name, secret in secrets.items() if secret.encode() in p.read_bytes()]
    for run in runs:
        record = " ".join([*run.data.params.values(), *run.data.tags.values()])
        leaks += [f"run {run.info.run_name}: {name}" for name, secret in secrets.items() if secret in record]
    assert not leaks
    print(f"stack workers test: {time.monotonic() - started:.0f} s after the stack was up")
    shutil.rmtree(base, ignore_errors=True)


def test_the_stack_comes_up_again_after_its_machine_went_down(monkeypatch):
    """Servers killed as a reboot kills them leave PostgreSQL's postmaster.pid behind; `up` starts anew."""
    state = Path(tempfile.mkdtemp(prefix="tfsweep-stack-"))
    try:
        running = stack.up(state, mlflow_port=stack.free_port("127.0.0.1"))
        postmaster = int((state / "postgres" / "postmaster.pid").read_text().split()[0])
        os.killpg(int((state / "mlflow.pid").read_text()), signal.SIGKILL)
        os.kill(postmaster, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while process_alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (state / "postgres" / "postmaster.pid").exists()
        again = stack.up(state, mlflow_port=running.mlflow_port)
        for name, value in again.worker_env().items():
            monkeypatch.setenv(name, value)
        assert MlflowClient(again.tracking_uri).search_experiments()  # the server answers, on its database
    finally:
        stack.down(state, purge=True)
