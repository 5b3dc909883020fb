"""The speed benchmark behind `make bench`: each row is a ratio against a baseline measured in this process.

Machines like ours are shared and noisy, so a comparison runs its sides in alternating order (A B, B A,
...) and reports the median of the repeats; absolute numbers are kept only as context for the ratios.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from tfsweep.hooks import Hook

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
FAST_PRESET = "fast"                  # conf/experiment/fast.yaml: the recommended fast configuration
FAST_TARGET, TUTORIAL_TARGET = 0.990, 0.973  # test accuracy each configuration is timed to


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
    sweep_overrides: tuple[str, ...] = field(default_factory=tuple)  # the small sweep of the pruning row


MODES = {
    "quick": Settings(speed_steps=150, repeats=2, matmul_size=1024, tutorial_budget_s=30, monitor_every=100,
                      tutorial_monitor_every=200,
                      fast_overrides=("trainer.steps=400",),
                      sweep_overrides=("sweeps=quick", "sweep.n_trials=4", "trainer.steps=100",
                                       "trainer.eval_every=25", "trainer.checkpoint_every=100",
                                       "sweep.pruner.settings.median.n_startup_trials=1",
                                       "sweep.pruner.settings.median.n_warmup_steps=25",
                                       "sweep.sampler.settings.tpe.n_startup_trials=2")),
    "full": Settings(speed_steps=200, repeats=5, matmul_size=2048, tutorial_budget_s=180, monitor_every=100,
                     tutorial_monitor_every=500,
                     sweep_overrides=("sweeps=quick",)),
}


# -- statistics -------------------------------------------------------------------------------------
def alternate(sides: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Call each side `repeats` times, rotating the order every round (A B, B A, A B, ...).

    Rotating cancels a slow drift of the machine's speed (another job starting, thermal limits) that
    a fixed order would credit to whichever side always runs second.
    """
    names = list(sides)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(sides[name]())
    return results


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the per-round ratios numerators[i] / denominators[i].

    Runs of the same round are minutes apart at most, so each ratio sees the machine in one state;
    the median then drops the rounds where another job slowed one side.
    """
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


# -- the machine ------------------------------------------------------------------------------------
def read_cpuinfo(text: str | None = None) -> dict[str, Any]:
    """Vendor, model, family, clock and flags of the first CPU in /proc/cpuinfo (text for tests)."""
    if text is None:
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    return {"vendor": first.get("vendor_id", ""), "model_name": first.get("model name", platform.processor()),
            "family": int(first.get("cpu family", 0) or 0), "model": int(first.get("model", 0) or 0),
            "mhz": float(first.get("cpu MHz", 0) or 0), "flags": set(first.get("flags", "").split())}


def float32_peak(cpu: dict[str, Any], cores: int) -> tuple[float, str]:
    """The CPU's float32 peak in FLOP/s as cores x clock x FLOP/cycle, and the assumption behind it.

    FLOP/cycle counts two FMA pipes (2 FLOP per lane each): 16 float32 lanes with AVX-512 on Intel
    and on AMD from Zen 5, 8 lanes where 512-bit FMAs are split into 256-bit halves (AMD Zen 4,
    family 25) or only AVX2 exists. The clock is the one /proc/cpuinfo reports; boost can exceed it.
    """
    flags = cpu["flags"]
    if "avx512f" in flags and not (cpu["vendor"] == "AuthenticAMD" and cpu["family"] <= 25):
        lanes, why = 16, "AVX-512, 2 FMA pipes x 16 float32 lanes"
    elif "avx512f" in flags:
        lanes, why = 8, "AMD Zen 4 (family 25): 512-bit FMAs run as 2 x 256-bit, so 2 FMA pipes x 8 lanes"
    elif "fma" in flags:
        lanes, why = 8, "AVX2, 2 FMA pipes x 8 float32 lanes"
    else:
        lanes, why = 2, "no FMA found: 2 pipes x 2 lanes (SSE guess)"
    per_cycle = 2 * lanes * 2
    clock = cpu["mhz"] * 1e6
    return cores * clock * per_cycle, f"{cores} cores x {cpu['mhz']:.0f} MHz x {per_cycle} FLOP/cycle ({why})"


def machine() -> dict[str, Any]:
    import keras
    import tensorflow as tf

    cpu = read_cpuinfo()
    cores = os.cpu_count() or 1
    peak, assumption = float32_peak(cpu, cores)
    return {"cpu": cpu["model_name"], "vendor": cpu["vendor"], "cpu_family": cpu["family"],
            "cpu_model": cpu["model"], "cores": cores, "mhz": cpu["mhz"],
            "isa": sorted(cpu["flags"] & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "float32_peak_flops": peak, "peak_assumption": assumption,
            "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def matmul_flops(size: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n float32 matmul: what TensorFlow's own best kernel achieves here (median)."""
    import tensorflow as tf

    a = tf.random.stateless_uniform([size, size], seed=[1, 2])
    b = tf.random.stateless_uniform([size, size], seed=[3, 4])
    per_call = max(1, int(2e10 // (2 * size ** 3)))  # ~20 GFLOP a timing: long enough to time well

    @tf.function
    def products(count):
        total = tf.zeros([size, size])
        for _ in tf.range(count):
            total += tf.linalg.matmul(a, b)
        return total

    products(tf.constant(1)).numpy()  # trace
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        products(tf.constant(per_call)).numpy()
        rates.append(2 * size ** 3 * per_call / (time.perf_counter() - start))
    return statistics.median(rates)


# -- configurations ---------------------------------------------------------------------------------
def compose(overrides: list[str] | tuple[str, ...], output_dir: Path) -> DictConfig:
    """The real training config, as `src/train.py <overrides>` would compose it, writing under output_dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tfsweep.config import CONFIG_DIR, register_configs

    register_configs()
    items = [*overrides, f"paths.output_dir={output_dir}"]
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("train", overrides=items)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=items)


class Workspace:
    """Fresh output folders (a reused model_dir would resume) and one MLflow store for the benchmark."""

    def __init__(self, root: Path) -> None:
        self.root, self.count = root, 0
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def config(self, *overrides: str) -> DictConfig:
        self.count += 1
        return compose([f"tracking.uri={self.tracking_uri}", "tracking.experiment_name=bench",
                        "trainer.progress_bar=false", *overrides], self.root / f"run-{self.count:03d}")


# -- measurements -----------------------------------------------------------------------------------
class StepTimer(Hook):
    """Steps/sec between the first and the last log point: tracing and the final evaluation excluded."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []

    def after_log(self, trainer, step, logs):
        self.marks.append((step, time.perf_counter()))

    @property
    def steps_per_sec(self) -> float:
        (first_step, first), (last_step, last) = self.marks[0], self.marks[-1]
        return (last_step - first_step) / (last - first)


def trainer_run(cfg: DictConfig) -> dict[str, float]:
    """Our trainer through `train(cfg)`: steps/sec in the loop and the wall seconds of the whole call."""
    from tfsweep.training import train

    timer = StepTimer()
    start = time.perf_counter()
    metrics = train(cfg, hooks=[timer])
    return {"steps_per_sec": timer.steps_per_sec, "wall_seconds": time.perf_counter() - start, **metrics}


def keras_fit_run(cfg: DictConfig, splits) -> dict[str, float]:
    """The baseline: a bare Keras `model.fit` of the same network, batch, precision and input pipeline."""
    import keras
    from hydra.utils import instantiate

    from tfsweep.inputs import train_input_fn
    from tfsweep.model import build_network

    keras.utils.set_random_seed(cfg.trainer.seed)
    network = build_network(cfg.model, cfg.trainer.precision)
    network.compile(optimizer=instantiate(cfg.optimizer),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    dataset = train_input_fn(splits.train_images, splits.train_labels, cfg.data.batch_size, cfg.trainer.seed,
                             cfg.data.shuffle_buffer)
    first_timed = cfg.trainer.log_every  # the same window as StepTimer's: from step log_every on
    marks: dict[int, float] = {}
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: marks.__setitem__(batch + 1, time.perf_counter()))
    network.fit(dataset, epochs=1, steps_per_epoch=cfg.trainer.steps, verbose=0, shuffle=False, callbacks=[timer])
    return {"steps_per_sec": (cfg.trainer.steps - first_timed) / (marks[cfg.trainer.steps] - marks[first_timed])}


class AccuracyCurve(Hook):
    """Test accuracy against training wall time, checked every `every` steps; the checks' own time is
    taken off the clock. Stops the run once `budget_s` seconds of training have passed."""

    def __init__(self, every: int, budget_s: float | None = None) -> None:
        self.every, self.budget_s = every, budget_s
        self.points: list[tuple[float, int, float]] = []  # (seconds, step, test accuracy)
        self._start = self._excluded = 0.0

    def begin(self, trainer):
        self._start, self._excluded = time.perf_counter(), 0.0

    def after_log(self, trainer, step, logs):
        if step % self.every and step != trainer.steps:
            return
        now = time.perf_counter()
        seconds = now - self._start - self._excluded
        classes = trainer.predict(trainer.splits.test_images)["classes"]
        self.points.append((seconds, step, float(np.mean(classes == trainer.splits.test_labels))))
        self._excluded += time.perf_counter() - now
        if self.budget_s is not None and seconds >= self.budget_s:
            trainer.request_stop(f"the benchmark's time budget of {self.budget_s:.0f} s is spent")


def curve_run(cfg: DictConfig, every: int, budget_s: float | None = None) -> dict[str, Any]:
    from tfsweep.training import train

    curve = AccuracyCurve(every, budget_s)
    metrics = train(cfg, hooks=[curve])
    return {"points": curve.points, **metrics}


def time_to(points: list[tuple[float, int, float]], target: float) -> float | None:
    """Seconds at the first checked point whose test accuracy reaches `target`, or None."""
    return next((seconds for seconds, _, accuracy in points if accuracy >= target), None)


def accuracy_at(points: list[tuple[float, int, float]], seconds: float) -> float | None:
    """Test accuracy at the last checked point no later than `seconds`."""
    reached = [accuracy for at, _, accuracy in points if at <= seconds]
    return reached[-1] if reached else None


# -- the benchmark ----------------------------------------------------------------------------------
def run(mode: str = "full", with_sweep: bool = True, workdir: Path | None = None) -> dict[str, Any]:
    """Measure every row; return {machine, settings, rows: {...}, curves}."""
    import keras

    from tfsweep.data import load_splits
    from tfsweep.model import build_network, training_flops_per_example

    settings = MODES[mode]
    root = Path(tempfile.mkdtemp(prefix="tfsweep-bench-", dir=workdir))
    ws = Workspace(root)
    speed = ("trainer.evaluate_test=false", f"trainer.steps={settings.speed_steps}")
    result: dict[str, Any] = {"mode": mode, "machine": machine(), "settings": asdict(settings), "rows": {}}
    rows = result["rows"]
    try:
        tutorial = ws.config(*speed)
        splits = load_splits(tutorial.data)
        log.info("rows 1-3: %d alternating rounds of %d-step runs", settings.repeats, settings.speed_steps)
        runs = alternate({
            "trainer": lambda: trainer_run(ws.config(*speed)),
            "keras_fit": lambda: keras_fit_run(ws.config(*speed), splits),
            "trainer_bfloat16": lambda: trainer_run(ws.config(*speed, "trainer.precision=mixed_bfloat16")),
            "trainer_untracked": lambda: trainer_run(ws.config(*speed, "tracking.enabled=false")),
        }, settings.repeats)
        sps = {name: [r["steps_per_sec"] for r in values] for name, values in runs.items()}
        result["runs"] = runs
        rows["trainer_vs_keras"] = {
            "value": median_ratio(sps["trainer"], sps["keras_fit"]), "goal": ">= 1.0",
            "detail": {"trainer_steps_per_sec": statistics.median(sps["trainer"]),
                       "keras_fit_steps_per_sec": statistics.median(sps["keras_fit"])}}
        rows["bfloat16_vs_float32"] = {
            "value": median_ratio(sps["trainer_bfloat16"], sps["trainer"]), "goal": ">= 1.8",
            "detail": {"bfloat16_steps_per_sec": statistics.median(sps["trainer_bfloat16"]),
                       "float32_steps_per_sec": statistics.median(sps["trainer"])}}
        wall = {name: [r["wall_seconds"] for r in runs[name]] for name in ("trainer", "trainer_untracked")}
        loop_overhead = 1 - median_ratio(sps["trainer"], sps["trainer_untracked"])
        fixed = statistics.median(np.subtract(wall["trainer"], wall["trainer_untracked"]))
        default_steps = compose([], root / "unused").trainer.steps
        rows["tracking_overhead"] = {
            "value": loop_overhead, "goal": "< 0.02",
            "detail": {"whole_run_overhead": median_ratio(wall["trainer"], wall["trainer_untracked"]) - 1,
                       "per_run_seconds": fixed,
                       "projected_overhead_default_run": loop_overhead + fixed * statistics.median(
                           sps["trainer_untracked"]) / default_steps,
                       "default_steps": default_steps}}

        network = build_network(tutorial.model, "float32")
        flops_per_example = training_flops_per_example(network)
        matmul = matmul_flops(settings.matmul_size)
        achieved = statistics.median(sps["trainer"]) * tutorial.data.batch_size * flops_per_example
        achieved_bf16 = statistics.median(sps["trainer_bfloat16"]) * tutorial.data.batch_size * flops_per_example
        peak = result["machine"]["float32_peak_flops"]
        rows["hardware_efficiency"] = {
            "value": achieved / matmul, "goal": "report",
            "detail": {"flops_per_example": flops_per_example, "trainer_float32_flops": achieved,
                       "trainer_bfloat16_flops": achieved_bf16, "matmul_float32_flops": matmul,
                       "matmul_size": settings.matmul_size, "fraction_of_peak": achieved / peak,
                       "bfloat16_fraction_of_float32_matmul": achieved_bf16 / matmul,
                       "bfloat16_fraction_of_float32_peak": achieved_bf16 / peak,
                       "matmul_fraction_of_peak": matmul / peak}}
        keras.backend.clear_session()

        log.info("row 5: time to accuracy (fast preset, then the tutorial's configuration)")
        fast = curve_run(ws.config(f"experiment={FAST_PRESET}", *settings.fast_overrides), settings.monitor_every)
        fast_float32 = trainer_run(ws.config(f"experiment={FAST_PRESET}", *settings.fast_overrides,
                                             "trainer.precision=float32"))
        tutorial_curve = curve_run(ws.config(), settings.tutorial_monitor_every, settings.tutorial_budget_s)
        fast_seconds = time_to(fast["points"], FAST_TARGET)
        tutorial_seconds = time_to(tutorial_curve["points"], TUTORIAL_TARGET)
        budget_seconds = tutorial_curve["points"][-1][0]
        rows["bfloat16_vs_float32"]["detail"].update({
            "fast_preset_steps": fast["points"][-1][1],
            "bfloat16_test_accuracy": fast["test/accuracy"], "float32_test_accuracy": fast_float32["test/accuracy"],
            "accuracy_difference_points": 100 * (fast["test/accuracy"] - fast_float32["test/accuracy"])})
        speedup = None
        if fast_seconds is not None:
            speedup = (tutorial_seconds or budget_seconds) / fast_seconds
        rows["time_to_accuracy"] = {
            "value": speedup, "goal": "report",
            "detail": {"fast_seconds_to_99.0": fast_seconds, "tutorial_seconds_to_97.3": tutorial_seconds,
                       "tutorial_budget_seconds": budget_seconds,
                       "tutorial_accuracy_at_budget": tutorial_curve["points"][-1][2],
                       "tutorial_accuracy_at_fast_time": None if fast_seconds is None
                       else accuracy_at(tutorial_curve["points"], fast_seconds),
                       "speedup_is_lower_bound": tutorial_seconds is None}}
        result["curves"] = {"tutorial": tutorial_curve["points"], "fast": fast["points"]}
        keras.backend.clear_session()

        if with_sweep:
            log.info("rows 6-7: the same small sweep with pruning on and off")
            rows.update(sweep_rows(settings, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def sweep_rows(settings: Settings, root: Path) -> dict[str, Any]:
    """Rows 6 and 7: the same small sweep (same sampler seed) with the median pruner on and off."""
    from tfsweep.sweep import run_sweep
    from tfsweep.sweep_config import compose_sweep

    outcomes: dict[str, dict[str, Any]] = {}
    for pruner in ("median", "none"):  # one run each: a sweep is too long to repeat here
        study_dir = root / f"sweep-{pruner}"
        cfg = compose_sweep([*settings.sweep_overrides, f"sweep.pruner.name={pruner}",
                             f"sweep.study_name=bench-{pruner}", f"sweep.dir={study_dir}",
                             f"paths.output_dir={study_dir}", "tracking.uri=sqlite:///" + str(root / "sweep.db")])
        outcome = run_sweep(cfg)
        storage = Path(str(cfg.sweep.storage))
        outcome["storage_bytes"] = storage.stat().st_size if storage.exists() else None
        outcomes[pruner] = outcome
    on, off = outcomes["median"], outcomes["none"]
    trials = [t for t in on["trials"] + off["trials"] if t["seconds"] is not None]
    return {
        "pruning": {
            "value": on["wall_seconds"] / off["wall_seconds"], "goal": "report",
            "detail": {pruner: {key: outcome[key] for key in ("wall_seconds", "n_complete", "n_pruned",
                                                               "n_failed", "best_value", "best_params")}
                       for pruner, outcome in outcomes.items()}},
        "sweep_overhead": {
            "value": statistics.median([(t["seconds"] - t["training_seconds"]) / t["seconds"] for t in trials]),
            "goal": "report",
            "detail": {"median_trial_seconds": statistics.median([t["seconds"] for t in trials]),
                       "median_overhead_seconds": statistics.median(
                           [t["seconds"] - t["training_seconds"] for t in trials]),
                       "storage_bytes": {p: o["storage_bytes"] for p, o in outcomes.items()},
                       "storage": "Optuna journal file"}},
    }


# -- reporting --------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table: what was compared, the ratio, the goal and the measured context."""
    rows, lines = result["rows"], ["| # | comparison | result | goal | measured |", "|---|---|---|---|---|"]

    def add(number, name, value, goal, detail):
        lines.append(f"| {number} | {name} | {value} | {goal} | {detail} |")

    if row := rows.get("trainer_vs_keras"):
        d = row["detail"]
        add(1, "trainer vs bare Keras `model.fit` (steps/s, float32, batch 100)", _x(row["value"]), "≥ 1.0x",
            f"{d['trainer_steps_per_sec']:.1f} vs {d['keras_fit_steps_per_sec']:.1f} steps/s")
    if row := rows.get("bfloat16_vs_float32"):
        d = row["detail"]
        accuracy = ""
        if "bfloat16_test_accuracy" in d:
            accuracy = (f"; test accuracy after {d['fast_preset_steps']} steps of the fast preset "
                        f"{_pct(d['bfloat16_test_accuracy'])} vs {_pct(d['float32_test_accuracy'])} "
                        f"({d['accuracy_difference_points']:+.2f} points)")
        add(2, "mixed_bfloat16 vs float32 (steps/s)", _x(row["value"]), "≥ 1.8x, accuracy within 0.2 points",
            f"{d['bfloat16_steps_per_sec']:.1f} vs {d['float32_steps_per_sec']:.1f} steps/s{accuracy}")
    if row := rows.get("tracking_overhead"):
        d = row["detail"]
        add(3, "MLflow tracking on vs off (training loop)", _pct(row["value"]), "< 2%",
            f"whole {result['settings']['speed_steps']}-step run {_pct(d['whole_run_overhead'])} "
            f"({d['per_run_seconds']:.1f} s per run: run creation, params, checkpoints and model upload); "
            f"projected for the default {d['default_steps']}-step run {_pct(d['projected_overhead_default_run'])}")
    if row := rows.get("hardware_efficiency"):
        d = row["detail"]
        add(4, "trainer FLOP/s vs a float32 matmul in the same process", _pct(row["value"]), "report",
            f"{d['trainer_float32_flops'] / 1e9:.0f} GFLOP/s float32 ({d['flops_per_example'] / 1e6:.1f} "
            f"MFLOP/example) vs {d['matmul_float32_flops'] / 1e9:.0f} GFLOP/s matmul {d['matmul_size']}²; "
            f"{_pct(d['fraction_of_peak'])} of the float32 peak (bfloat16: {d['trainer_bfloat16_flops'] / 1e9:.0f} "
            f"GFLOP/s, {_pct(d['bfloat16_fraction_of_float32_peak'])} of the float32 peak)")
    if row := rows.get("time_to_accuracy"):
        d = row["detail"]
        fast = "not reached" if d["fast_seconds_to_99.0"] is None else f"{d['fast_seconds_to_99.0']:.0f} s"
        if d["tutorial_seconds_to_97.3"] is not None:
            tutorial = f"tutorial config to 97.3%: {d['tutorial_seconds_to_97.3']:.0f} s"
        else:
            tutorial = (f"tutorial config: 97.3% not reached in {d['tutorial_budget_seconds']:.0f} s "
                        f"({_pct(d['tutorial_accuracy_at_budget'])} then, "
                        f"{_pct(d['tutorial_accuracy_at_fast_time'])} at the fast preset's time)")
        value = _x(row["value"]) if row["value"] is not None else "n/a"
        add(5, "time to accuracy: fast preset to 99.0% vs tutorial config to 97.3%",
            ("> " if d["speedup_is_lower_bound"] and row["value"] is not None else "") + value, "report",
            f"fast preset to 99.0%: {fast}; {tutorial}")
    if row := rows.get("pruning"):
        d = row["detail"]
        add(6, "sweep with median pruning vs without (wall time, same seed)", _x(row["value"]), "report",
            f"{d['median']['wall_seconds']:.0f} vs {d['none']['wall_seconds']:.0f} s; "
            f"best val accuracy {_pct(d['median']['best_value'])} vs {_pct(d['none']['best_value'])}; "
            f"{d['median']['n_pruned']} of {d['median']['n_complete'] + d['median']['n_pruned']} trials pruned")
    if row := rows.get("sweep_overhead"):
        d = row["detail"]
        add(7, "sweep overhead: a trial's time outside training steps", _pct(row["value"]), "report",
            f"{d['median_overhead_seconds']:.1f} s of a {d['median_trial_seconds']:.1f} s trial (median); "
            f"{d['storage']} of {max(v or 0 for v in d['storage_bytes'].values()) / 1024:.0f} KiB")
    m = result["machine"]
    lines.append("")
    lines.append(f"{m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}), {m['cores']} cores, "
                 f"{', '.join(m['isa'])}; TensorFlow {m['tensorflow']}, Keras {m['keras']}; "
                 f"{result['mode']} mode, {m['date']}. Float32 peak assumed: {m['peak_assumption']}.")
    return "\n".join(lines)


def plot(curves: dict[str, list], path: Path) -> None:
    """Test accuracy against training wall time for the tutorial's configuration and the fast preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, label in (("tutorial", "tutorial config (SGD 0.001, batch 100, float32)"),
                        ("fast", f"experiment={FAST_PRESET}")):
        points = curves[name]
        ax.plot([p[0] for p in points], [100 * p[2] for p in points], marker="o", markersize=3, label=label)
    for target in (FAST_TARGET, TUTORIAL_TARGET):
        ax.axhline(100 * target, color="grey", linewidth=0.6, linestyle="--")
    lowest = min(100 * p[2] for points in curves.values() for p in points)
    ax.set(xlabel="training wall time (s)", ylabel="MNIST test accuracy (%)", ylim=(max(0, lowest - 2), 100),
           title="Test accuracy vs wall time")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write `<date>-<mode>.json` (and the accuracy plot) into results_dir; return the json path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.fromisoformat(result["machine"]["date"]).strftime("%Y-%m-%dT%H%M")
    path = results_dir / f"{stamp}-{result['mode']}.json"
    if "curves" in result:
        plot_path = results_dir / f"{stamp}-{result['mode']}-accuracy-vs-time.png"
        plot(result["curves"], plot_path)
        result["plot"] = plot_path.name
    result["table"] = table(result)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable))
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
