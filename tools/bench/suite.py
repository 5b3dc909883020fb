"""The benchmark's rows, measured in one process: what runs for each row, and how its ratio is formed."""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from bench import machine, overhead
from bench.runs import (FAST_PRESET, FAST_TARGET, TUTORIAL_TARGET, Workspace, accuracy_at, curve_run,
                                keras_fit_run, time_to, trainer_run)
from bench.stats import alternate, median_ratio
from tfsweep.config import compose_config

log = logging.getLogger(__name__)

PRUNING_SIDES = {"pruned": (), "none": ("sweeps/pruner=none",)}  # the sweep's own pruner, and none
CONSTANT_RATE = ("schedule=constant",)  # the fast preset as it was before it had a schedule


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs; `quick` is for development, `full` for the README's table."""

    speed_steps: int           # steps per speed run; timed from the first log point (after tracing)
    repeats: int               # runs per side of each A/B comparison; the median is reported
    matmul_size: int           # n of the n x n float32 matmul that stands for "what this CPU can do"
    tutorial_budget_s: float   # wall seconds the tutorial configuration may train in the accuracy row
    monitor_every: int         # steps between test-split checks of the fast preset in the accuracy row
    tutorial_monitor_every: int  # the same for the tutorial's configuration, which learns more slowly
    fast_overrides: tuple[str, ...] = ()  # applied on top of the fast preset (quick: fewer steps)
    # rows 6-8 and 10: a file in sweeps/, run from an empty study with its pruner and with none
    sweep_overrides: tuple[str, ...] = ("sweeps=default",)
    fast_seeds: tuple[int, ...] = (0, 1, 2)  # row 9: the fast preset must end at >= 99.0% for each
    # row 12: the default sampler and pruner on a space nobody tuned, stopped by a timeout, per seed
    wide_overrides: tuple[str, ...] = ("sweeps=wide", "sweep.timeout=200")
    wide_seeds: tuple[int, ...] = (0, 1, 2)


MODES = {
    "quick": Settings(speed_steps=150, repeats=2, matmul_size=1024, tutorial_budget_s=30, monitor_every=100,
                      tutorial_monitor_every=200, fast_overrides=("trainer.steps=400",),
                      sweep_overrides=("sweeps=bench_quick",), fast_seeds=(0, 1),
                      wide_overrides=("sweeps=wide", "sweep.timeout=20", "trainer.steps=200"), wide_seeds=(0,)),
    "full": Settings(speed_steps=200, repeats=5, matmul_size=2048, tutorial_budget_s=180, monitor_every=100,
                     tutorial_monitor_every=500),
}


GROUPS = ("speed", "accuracy", "fast_seeds", "sweep", "wide")  # rows 1-4, 5, 9, 6-8 with 10-11, 12


def run(mode: str = "full", with_sweep: bool = True, workdir: Path | None = None,
        groups: tuple[str, ...] = GROUPS) -> dict[str, Any]:
    """Measure every row (or the `groups` named); return {mode, machine, settings, rows: {...}, runs, curves}."""
    import keras

    settings = MODES[mode]
    root = Path(tempfile.mkdtemp(prefix="tfsweep-bench-", dir=workdir))
    label = mode if set(groups) == set(GROUPS) else "-".join((mode, *groups))  # a partial run says so
    result: dict[str, Any] = {"mode": label, "machine": machine.describe(), "settings": asdict(settings), "rows": {}}
    try:
        ws = Workspace(root)  # one for all rows: its run folders are numbered, and a reused one would resume
        for group, measure in (("speed", speed_rows), ("accuracy", accuracy_rows), ("fast_seeds", fast_seed_rows)):
            if group in groups:
                measure(settings, ws, result)
                keras.backend.clear_session()
        if with_sweep and "sweep" in groups:
            log.info("rows 6-8 and 10: the default sweep from an empty study with its pruner and with none")
            result["rows"].update(sweep_rows(settings, root))
            result["journals"] = journals(root)
        if with_sweep and "wide" in groups:
            log.info("row 12: the wide search space stopped by its timeout, seeds %s", list(settings.wide_seeds))
            result["rows"].update(wide_space_rows(settings, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def speed_rows(settings: Settings, ws: Workspace, result: dict[str, Any]) -> None:
    """Rows 1-4: steps/s of our trainer against bare Keras, bfloat16, tracking off, and a matmul."""
    from tfsweep.data import load_splits
    from tfsweep.model import build_network, training_flops_per_example

    # One validation pass, at the end: the tutorial's cadence (2,000 steps apart, 40 log points between),
    # not a 200-step run's derived every-40, whose metric writes would crowd row 3's timed window.
    speed = ("trainer.evaluate_test=false", f"trainer.steps={settings.speed_steps}",
             f"trainer.eval_every={settings.speed_steps}")
    tutorial = ws.config(*speed)
    splits = load_splits(tutorial.data)
    log.info("rows 1-4: %d alternating rounds of %d-step runs", settings.repeats, settings.speed_steps)
    runs = alternate({
        "trainer": lambda: trainer_run(ws.config(*speed)),
        "keras_fit": lambda: keras_fit_run(ws.config(*speed), splits),
        "trainer_bfloat16": lambda: trainer_run(ws.config(*speed, "trainer.precision=mixed_bfloat16")),
        "trainer_untracked": lambda: trainer_run(ws.config(*speed, "tracking.enabled=false")),
    }, settings.repeats)
    result["runs"] = runs
    sps = {name: [r["steps_per_sec"] for r in values] for name, values in runs.items()}
    median_sps = {name: statistics.median(values) for name, values in sps.items()}
    rows = result["rows"]
    rows["trainer_vs_keras"] = {
        "value": median_ratio(sps["trainer"], sps["keras_fit"]),
        "detail": {"trainer_steps_per_sec": median_sps["trainer"], "keras_fit_steps_per_sec": median_sps["keras_fit"]}}
    rows["bfloat16_vs_float32"] = {
        "value": median_ratio(sps["trainer_bfloat16"], sps["trainer"]),
        "detail": {"bfloat16_steps_per_sec": median_sps["trainer_bfloat16"],
                   "float32_steps_per_sec": median_sps["trainer"]}}
    wall = {name: [r["wall_seconds"] for r in runs[name]] for name in ("trainer", "trainer_untracked")}
    loop_overhead = 1 - median_ratio(sps["trainer"], sps["trainer_untracked"])
    fixed = statistics.median(np.subtract(wall["trainer"], wall["trainer_untracked"]))
    default_steps = compose_config("train", [f"paths.output_dir={ws.root / 'unused'}"]).trainer.steps
    rows["tracking_overhead"] = {
        "value": loop_overhead,
        "detail": {"whole_run_overhead": median_ratio(wall["trainer"], wall["trainer_untracked"]) - 1,
                   "per_run_seconds": fixed,
                   "projected_overhead_default_run": loop_overhead + fixed * median_sps["trainer_untracked"]
                   / default_steps,
                   "default_steps": default_steps,
                   # what the ratio above cannot resolve below the rounds' spread: tracking's own work
                   "loop_cpu_fraction": statistics.median(r["metric_batch_cpu_seconds"] / r["timed_seconds"]
                                                          for r in runs["trainer"]),
                   "metric_batches_in_loop": statistics.median(r["metric_batches_in_loop"] for r in runs["trainer"]),
                   "round_overheads": [1 - a / b for a, b in zip(sps["trainer"], sps["trainer_untracked"])]}}

    flops_per_example = training_flops_per_example(build_network(tutorial.model, "float32"))
    matmul = machine.matmul_flops(settings.matmul_size)
    achieved, achieved_bf16 = (median_sps[name] * tutorial.data.batch_size * flops_per_example
                               for name in ("trainer", "trainer_bfloat16"))
    peak = result["machine"]["float32_peak_flops"]
    rows["hardware_efficiency"] = {
        "value": achieved / matmul,
        "detail": {"flops_per_example": flops_per_example, "trainer_float32_flops": achieved,
                   "trainer_bfloat16_flops": achieved_bf16, "matmul_float32_flops": matmul,
                   "matmul_size": settings.matmul_size, "fraction_of_peak": achieved / peak,
                   "bfloat16_fraction_of_float32_matmul": achieved_bf16 / matmul,
                   "bfloat16_fraction_of_float32_peak": achieved_bf16 / peak,
                   "matmul_fraction_of_peak": matmul / peak}}


def accuracy_rows(settings: Settings, ws: Workspace, result: dict[str, Any]) -> None:
    """Row 5, and row 2's accuracy: test accuracy against training time, fast preset and tutorial config."""
    log.info("row 5: time to accuracy (fast preset, then the tutorial's configuration)")
    fast = curve_run(ws.config(f"experiment={FAST_PRESET}", *settings.fast_overrides), settings.monitor_every)
    fast_float32 = trainer_run(ws.config(f"experiment={FAST_PRESET}", *settings.fast_overrides,
                                         "trainer.precision=float32"))
    tutorial = curve_run(ws.config(), settings.tutorial_monitor_every, settings.tutorial_budget_s)
    fast_seconds = time_to(fast["points"], FAST_TARGET)
    tutorial_seconds = time_to(tutorial["points"], TUTORIAL_TARGET)
    budget_seconds = tutorial["points"][-1][0]
    rows = result["rows"]
    rows["bfloat16_vs_float32"]["detail"].update({
        "fast_preset_steps": fast["points"][-1][1],
        "bfloat16_test_accuracy": fast["test/accuracy"], "float32_test_accuracy": fast_float32["test/accuracy"],
        "accuracy_difference_points": 100 * (fast["test/accuracy"] - fast_float32["test/accuracy"])})
    speedup = None if fast_seconds is None else (tutorial_seconds or budget_seconds) / fast_seconds
    rows["time_to_accuracy"] = {
        "value": speedup,
        "detail": {"fast_seconds_to_99.0": fast_seconds, "tutorial_seconds_to_97.3": tutorial_seconds,
                   "tutorial_budget_seconds": budget_seconds,
                   "tutorial_accuracy_at_budget": tutorial["points"][-1][2],
                   "tutorial_accuracy_at_fast_time": None if fast_seconds is None
                   else accuracy_at(tutorial["points"], fast_seconds),
                   "speedup_is_lower_bound": tutorial_seconds is None}}
    result["curves"] = {"tutorial": tutorial["points"], "fast": fast["points"]}


def fast_seed_rows(settings: Settings, ws: Workspace, result: dict[str, Any]) -> None:
    """Row 9: the fast preset's final test accuracy for each seed, and its time to 99.0% against the same
    preset with a constant learning rate, the two sides alternating seed by seed."""
    import keras

    log.info("row 9: the fast preset with and without its schedule, seeds %s", list(settings.fast_seeds))
    sides = {"schedule": (), "constant": CONSTANT_RATE}
    seeds = {side: iter(settings.fast_seeds) for side in sides}

    def fast_run(side: str) -> dict[str, Any]:
        seed = next(seeds[side])
        run = curve_run(ws.config(f"experiment={FAST_PRESET}", *settings.fast_overrides, *sides[side],
                                  f"trainer.seed={seed}"), settings.monitor_every)
        keras.backend.clear_session()
        return {"seed": seed, "test_accuracy": run["test/accuracy"], "seconds_to_99.0": time_to(run["points"], FAST_TARGET),
                "training_seconds": run["points"][-1][0]}

    runs = alternate({side: lambda side=side: fast_run(side) for side in sides}, len(settings.fast_seeds))
    to_target = {side: [r["seconds_to_99.0"] for r in runs[side]] for side in sides}
    reached = all(s is not None for times_ in to_target.values() for s in times_)
    result["rows"]["fast_preset_seeds"] = {
        "value": min(r["test_accuracy"] for r in runs["schedule"]),
        "detail": {"seeds": list(settings.fast_seeds), "runs": runs,
                   "seeds_at_99.0": sum(r["test_accuracy"] >= FAST_TARGET for r in runs["schedule"]),
                   "time_to_99.0_ratio": median_ratio(to_target["schedule"], to_target["constant"]) if reached else None}}


def journals(root: Path) -> dict[str, str]:
    """The sweep rows' Optuna journals by folder (`sweep-pruned`, `sweep-none`), kept with the results
    so that a pruner can be chosen by replaying the unpruned study (`python -m bench.replay`)."""
    return {path.parent.name: path.read_text() for path in sorted(root.glob("sweep-*/journal.log"))}


def _sweep(overrides: list[str], study_name: str, study_dir: Path, database: Path) -> tuple[DictConfig, dict[str, Any]]:
    """Run a sweep in `study_dir`, tracked in the SQLite file `database`; return its config and outcome,
    which names its pruner."""
    from tfsweep.sweep import run_sweep
    from tfsweep.sweep_config import compose_sweep

    cfg = compose_sweep([*overrides, f"sweep.study_name={study_name}", f"sweep.dir={study_dir}",
                         f"paths.output_dir={study_dir}", f"tracking.uri=sqlite:///{database}"])
    outcome = run_sweep(cfg)
    outcome["pruner"] = cfg.sweep.pruner._target_.rsplit(".", 1)[-1]
    return cfg, outcome


def sweep_rows(settings: Settings, root: Path, extra_overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Rows 6-8 and 10: the sweep of `settings` (`make sweep`'s) from an empty study, with its pruner and
    with none (same sampler seed), every trial timed by phase. The pruned side is `make sweep` as a user
    runs it: row 10 is its wall time and the test accuracy of the trial it selects on validation.
    `extra_overrides` apply to both sweeps (tests shrink them with it); the sides' pruners, study names and
    folders are set after them."""
    outcomes: dict[str, dict[str, Any]] = {}
    with overhead.measure_trials() as clock:
        for side, pruning in PRUNING_SIDES.items():  # one run each: a sweep is too long to repeat here
            cfg, outcome = _sweep([*settings.sweep_overrides, *extra_overrides, *pruning], f"bench-{side}",
                                  root / f"sweep-{side}", root / "sweep.db")
            storage = Path(str(cfg.sweep.storage))
            outcome["storage_bytes"] = storage.stat().st_size if storage.exists() else None
            outcomes[side] = outcome
    on, off = outcomes["pruned"], outcomes["none"]
    trials = [t for t in on["trials"] + off["trials"] if t["seconds"] is not None]
    command_seconds = on["wall_seconds"] + import_seconds()
    training_seconds = sum(t["training_seconds"] or 0 for t in on["trials"])
    phases = overhead.breakdown(clock.trials)
    return {
        "default_sweep": {
            "value": on["best_test_accuracy"],
            "detail": {"n_trials": cfg.sweep.n_trials, "trial_steps": cfg.trainer.steps,
                       **{key: on[key] for key in ("wall_seconds", "pruner", "n_complete", "n_pruned", "n_failed",
                                                   "best_value", "best_params", "best_test_accuracy")}}},
        "pruning": {
            "value": on["wall_seconds"] / off["wall_seconds"],
            "detail": {side: {key: outcome[key] for key in ("pruner", "wall_seconds", "n_complete", "n_pruned",
                                                             "n_failed", "best_value", "best_params")}
                       for side, outcome in outcomes.items()}},
        "sweep_overhead": {
            "value": statistics.median([(t["seconds"] - t["training_seconds"]) / t["seconds"] for t in trials]),
            "detail": {"median_trial_seconds": statistics.median([t["seconds"] for t in trials]),
                       "median_overhead_seconds": statistics.median(
                           [t["seconds"] - t["training_seconds"] for t in trials]),
                       "storage_bytes": {side: o["storage_bytes"] for side, o in outcomes.items()},
                       "storage": "Optuna journal file"}},
        "trial_overhead": {
            "value": sum(r["outside_seconds"] for r in phases["per_trial"])
            / sum(r["wall_seconds"] for r in phases["per_trial"]),
            "detail": {"trial_steps": cfg.trainer.steps, **phases}},
        "sweep_wall_overhead": {
            "value": 1 - training_seconds / command_seconds,
            "detail": {"command_seconds": command_seconds, "imports_seconds": command_seconds - on["wall_seconds"],
                       "training_seconds": training_seconds,
                       "trials_outside_seconds": sum(t["seconds"] - t["training_seconds"] for t in on["trials"]
                                                     if t["seconds"] is not None),
                       "n_trials": len(on["trials"])}},
    }


def import_seconds() -> float:
    """What `src/sweep.py` spends importing TensorFlow, MLflow and the project before it can start: the
    in-process sweep rows have that behind them."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tfsweep.sweep"], check=True, capture_output=True)
    return time.perf_counter() - started


def wide_space_rows(settings: Settings, root: Path) -> dict[str, Any]:
    """Row 12: sweeps/wide.yaml, a search space the defaults were not chosen on, stopped by its timeout,
    once per seed: the test accuracy of the trial each run selects on validation, the lowest of them."""
    runs = []
    for seed in settings.wide_seeds:
        _, outcome = _sweep([*settings.wide_overrides, f"sweep.seed={seed}"], f"wide-{seed}", root / f"wide-{seed}",
                            root / "wide.db")
        runs.append({"seed": seed, **{key: outcome[key] for key in (
            "wall_seconds", "n_complete", "n_pruned", "n_failed", "best_value", "best_params", "best_test_accuracy")}})
    tested = [r["best_test_accuracy"] for r in runs]
    return {"wide_space": {"value": None if None in tested else min(tested),
                           "detail": {"overrides": list(settings.wide_overrides), "runs": runs}}}
