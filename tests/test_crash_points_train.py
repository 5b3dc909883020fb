"""Kill `src/train.py` for real (SIGKILL) at each named crash point, run the same command again, and check
the record: one FINISHED run with one model, no step logged twice, and the same numbers, to the last bit,
as a run that was never interrupted (float32, and mixed_bfloat16 for one point)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import TINY_TRAINING
from tfsweep import tracking_store
from tfsweep.crashpoints import ENV

pytestmark = pytest.mark.slow

PROJECT_DIR = Path(__file__).resolve().parents[1]
TIMING = "global_step_per_sec"  # wall-clock speed: the one metric a rerun does not repeat exactly

# Steps 20, log every 5, evaluate and checkpoint every 10. `point:n` dies at the n-th time the point is
# reached: mid_training:3 is step 15, logged but past the checkpoint at 10, so the rerun computes it again.
POINTS = [
    "tracking.after_run_created", "tracking.after_run_id_written", "trainer.mid_training:3",
    "trainer.mid_checkpoint", "trainer.after_checkpoint:2", "tracking.before_flush",
    "tracking.during_checkpoint_upload", "tracking.during_model_upload", "tracking.before_terminated",
    "trainer.before_finished_record",
]
SCENARIOS = [("float32", point) for point in POINTS] + [("mixed_bfloat16", "trainer.mid_training:3")]
AGAIN = ("float32", None)  # the reference whose finished run is run once more


def command(root: Path, name: str, synthetic_data: dict[str, str], precision: str) -> list[str]:
    overrides = {**synthetic_data, **TINY_TRAINING, "trainer.precision": precision,
                 "hydra.run.dir": str(root / name / "run"), "trainer.model_dir": str(root / name / "model"),
                 "tracking.uri": f"sqlite:///{root / 'mlflow.db'}", "tracking.experiment_name": name}
    return [sys.executable, "src/train.py", *(f"{k}={v}" for k, v in overrides.items())]


def run(cmd: list[str], crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if crash_at:
        env[ENV] = crash_at
    return subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)


def record(root: Path, name: str) -> dict:
    """The store's whole record of one scenario: its runs, their models, and every metric point."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment])
    points, models = {}, []
    for run in runs:
        points = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                  for key in run.data.metrics}
        models += client.search_logged_models([experiment], filter_string=f"source_run_id = '{run.info.run_id}'")
    return {"runs": [run.info.status for run in runs], "points": points,
            "models": [str(model.status).rsplit(".", 1)[-1] for model in models]}


def values(points: dict[str, list[tuple[int, float]]]) -> dict[tuple[str, int], float]:
    return {(key, step): value for key, history in points.items() if key != TIMING for step, value in history}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, synthetic_data) -> dict:
    """Every scenario, two processes at a time: the uninterrupted references, and for each crash point
    the killed command and the same command run again."""
    root = tmp_path_factory.mktemp("crash-points")
    tracking_store.connect(f"sqlite:///{root / 'mlflow.db'}")  # the store's tables, once for all

    def scenario(precision: str, point: str | None) -> dict:
        name = f"{precision}-{point or 'reference'}".replace(":", "-")
        cmd = command(root, name, synthetic_data, precision)
        killed = run(cmd, crash_at=point) if point else None
        final = run(cmd)
        outcome = {"name": name, "cmd": cmd, "killed": killed, "final": final, **record(root, name)}
        if (precision, point) == AGAIN:  # here, not after the pool: it overlaps the other scenarios
            outcome["again"], outcome["points_after_again"] = run(cmd), record(root, name)["points"]
        return outcome

    jobs = [("float32", None), ("mixed_bfloat16", None), *SCENARIOS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: scenario(*job), jobs))
    return {"root": root, **dict(zip(jobs, results))}


@pytest.mark.parametrize("precision,point", SCENARIOS)
def test_a_run_killed_at_a_crash_point_and_rerun_leaves_one_true_record(outcomes, precision, point):
    got, expected = outcomes[(precision, point)], outcomes[(precision, None)]
    assert expected["final"].returncode == 0, expected["final"].stderr[-3000:]
    assert got["killed"].returncode == -signal.SIGKILL, f"{point} was not reached:\n{got['killed'].stderr[-3000:]}"
    assert got["final"].returncode == 0, got["final"].stderr[-3000:]
    assert got["runs"] == ["FINISHED"] and got["models"] == ["READY"]
    for key, history in got["points"].items():
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{key} logged a step twice: {steps}"
    assert sorted(got["points"]) == sorted(expected["points"])
    assert values(got["points"]) == values(expected["points"])  # every curve, val and test, to the last bit


def test_the_same_command_after_a_finished_run_changes_nothing(outcomes):
    reference = outcomes[AGAIN]
    assert reference["final"].returncode == 0, reference["final"].stderr[-3000:]
    again = reference["again"]
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr
    assert reference["points_after_again"] == reference["points"]
