"""A benchmark result as people read it: a markdown table naming the machine, an accuracy-vs-time plot,
and the JSON file both are saved in."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.overhead import PHASES
from bench.runs import FAST_PRESET, FAST_TARGET, TUTORIAL_TARGET
from tfsweep.processes import write_atomically

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.0f} s"


def _pruning(d: dict, result: dict) -> str:
    on, off = d.get("pruned", d.get("median")), d["none"]  # older results: "median"
    pruner = f"{on['pruner']}: " if "pruner" in on else ""  # older results: the median pruner
    return (f"{pruner}{on['wall_seconds']:.0f} vs {off['wall_seconds']:.0f} s; best val accuracy {pct(on['best_value'])} "
            f"vs {pct(off['best_value'])}; {on['n_pruned']} of {on['n_complete'] + on['n_pruned']} trials pruned")


def _bfloat16(d: dict, result: dict) -> str:
    measured = f"{d['bfloat16_steps_per_sec']:.1f} vs {d['float32_steps_per_sec']:.1f} steps/s"
    if "bfloat16_test_accuracy" in d:
        measured += (f"; test accuracy after {d['fast_preset_steps']} steps of the fast preset "
                     f"{pct(d['bfloat16_test_accuracy'])} vs {pct(d['float32_test_accuracy'])} "
                     f"({d['accuracy_difference_points']:+.2f} points)")
    return measured


def _time_to_accuracy(d: dict, result: dict) -> str:
    fast = seconds(d["fast_seconds_to_99.0"])
    if d["tutorial_seconds_to_97.3"] is not None:
        tutorial = f"tutorial config to 97.3%: {d['tutorial_seconds_to_97.3']:.0f} s"
    else:
        tutorial = (f"tutorial config: 97.3% not reached in {d['tutorial_budget_seconds']:.0f} s "
                    f"({pct(d['tutorial_accuracy_at_budget'])} then, "
                    f"{pct(d['tutorial_accuracy_at_fast_time'])} at the fast preset's time)")
    return f"fast preset to 99.0%: {fast}; {tutorial}"


def _trial_overhead(d: dict, result: dict) -> str:
    phases = "; ".join(f"{label} {d['phases_seconds'][name]:.2f} s" for name, label in PHASES.items())
    return (f"{d['mean_outside_seconds']:.1f} s of a {d['mean_trial_seconds']:.1f} s trial "
            f"(mean of {d['trials_measured']} trials of {d['trial_steps']} steps): {phases}")


def _fast_preset_seeds(d: dict, result: dict) -> str:
    runs = d["runs"]
    finals = ", ".join(f"seed {r['seed']} {pct(r['test_accuracy'])}" for r in runs["schedule"])
    with_schedule = ", ".join(seconds(r["seconds_to_99.0"]) for r in runs["schedule"])
    constant = ", ".join(seconds(r["seconds_to_99.0"]) for r in runs["constant"])
    before = ", ".join(pct(r["test_accuracy"]) for r in runs["constant"])
    return (f"{d['seeds_at_99.0']} of {len(runs['schedule'])} seeds end at ≥ 99.0% ({finals}); time to 99.0% "
            f"{with_schedule} vs {constant} with a constant rate (which ends at {before}), median ratio "
            f"{times(d['time_to_99.0_ratio'])}")


def _default_sweep(d: dict, result: dict) -> str:
    best = "no trial finished"
    if d["best_params"]:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d["best_params"].items())
        best = f"best val accuracy {pct(d['best_value'])}, {params}"
    return (f"{d['wall_seconds']:.0f} s from an empty study; {d['n_complete']} complete, {d['n_pruned']} pruned "
            f"({d['pruner']}), {d['n_failed']} failed of {d['n_trials']} trials of {d['trial_steps']} steps; {best}")


@dataclass(frozen=True)
class Row:
    """One line of the table: which result row, what it compares, how its value reads, its goal, the context."""

    key: str
    comparison: str | Callable[[dict], str]  # a callable reads the row's detail (older results differ)
    value: Callable[[dict], str]
    goal: str | Callable[[dict], str]
    measured: Callable[[dict, dict], str]

    def text(self, field: str, detail: dict) -> str:
        value = getattr(self, field)
        return value if isinstance(value, str) else value(detail)


ROWS = (  # numbered in this order; a row not measured (--no-sweep) keeps its number free
    Row("trainer_vs_keras", "trainer vs bare Keras `model.fit` (steps/s, float32, batch 100)",
        lambda row: times(row["value"]), "≥ 1.0x",
        lambda d, result: f"{d['trainer_steps_per_sec']:.1f} vs {d['keras_fit_steps_per_sec']:.1f} steps/s"),
    Row("bfloat16_vs_float32", "mixed_bfloat16 vs float32 (steps/s)", lambda row: times(row["value"]),
        "≥ 1.8x, accuracy within 0.2 points", _bfloat16),
    Row("tracking_overhead", "MLflow tracking on vs off (training loop)", lambda row: pct(row["value"]), "< 2%",
        lambda d, result: (
            f"whole {result['settings']['speed_steps']}-step run {pct(d['whole_run_overhead'])} "
            f"({d['per_run_seconds']:.1f} s per run: run creation, params, checkpoints and model upload); "
            f"projected for the default {d['default_steps']}-step run {pct(d['projected_overhead_default_run'])}"
            + ("" if "loop_cpu_fraction" not in d else  # results saved before it was measured
               f"; rounds {', '.join(pct(v) for v in d['round_overheads'])}; CPU time of the metric batches "
               f"sent during the timed steps ({d['metric_batches_in_loop']:.0f} a run): "
               f"{pct(d['loop_cpu_fraction'], 2)} of those steps' time"))),
    Row("hardware_efficiency", "trainer FLOP/s vs a float32 matmul in the same process",
        lambda row: pct(row["value"]), "report",
        lambda d, result: (
            f"{d['trainer_float32_flops'] / 1e9:.0f} GFLOP/s float32 ({d['flops_per_example'] / 1e6:.1f} "
            f"MFLOP/example) vs {d['matmul_float32_flops'] / 1e9:.0f} GFLOP/s matmul {d['matmul_size']}²; "
            f"{pct(d['fraction_of_peak'])} of the float32 peak (bfloat16: {d['trainer_bfloat16_flops'] / 1e9:.0f} "
            f"GFLOP/s, {pct(d['bfloat16_fraction_of_float32_peak'])} of the float32 peak)")),
    Row("time_to_accuracy", "time to accuracy: fast preset to 99.0% vs tutorial config to 97.3%",
        lambda row: ("> " if row["detail"]["speedup_is_lower_bound"] and row["value"] is not None else "")
        + times(row["value"]), "report", _time_to_accuracy),
    Row("pruning", lambda d: ("sweep with median pruning vs without (wall time, same seed)" if "median" in d
                              else "sweep with its pruner vs without (wall time, same seed)"),
        lambda row: times(row["value"]), lambda d: "report" if "median" in d else "≤ 0.5x, best val within 0.1 point",
        _pruning),
    Row("sweep_overhead", "sweep overhead: a trial's time outside training steps", lambda row: pct(row["value"]),
        "report", lambda d, result: (
            f"{d['median_overhead_seconds']:.1f} s of a {d['median_trial_seconds']:.1f} s trial (median); "
            f"{d['storage']} of {max(v or 0 for v in d['storage_bytes'].values()) / 1024:.0f} KiB")),
    Row("trial_overhead", "trial overhead by phase: time outside training steps, both sweeps' trials",
        lambda row: pct(row["value"]), "≤ 10%", _trial_overhead),
    Row("fast_preset_seeds", "fast preset: final test accuracy, lowest of its seeds", lambda row: pct(row["value"]),
        "≥ 99.0% for every seed", _fast_preset_seeds),
    Row("default_sweep", "default sweep (`make sweep`): the selected trial's test accuracy",
        lambda row: pct(row["value"]), "≥ 99.3% in ≤ 600 s", _default_sweep),
    Row("sweep_wall_overhead", "default sweep: the command's wall time outside training steps",
        lambda row: pct(row["value"]), "≤ 10%", lambda d, result: (
            f"{d['command_seconds'] - d['training_seconds']:.1f} s of {d['command_seconds']:.1f} s: imports "
            f"{d['imports_seconds']:.1f} s, inside its {d['n_trials']} trials {d['trials_outside_seconds']:.1f} s "
            "(evaluations, tracing, tracking), the rest opening the study and publishing")),
    Row("wide_space", "a wide space nobody tuned (sweeps/wide.yaml) stopped by its timeout: the selected "
        "trial's test accuracy, lowest of its seeds", lambda row: pct(row["value"]), "≥ 99.2% on every seed",
        lambda d, result: "; ".join(
            f"seed {r['seed']} {pct(r['best_test_accuracy'])} ({r['n_complete']} complete, {r['n_pruned']} pruned "
            f"in {r['wall_seconds']:.0f} s)" for r in d["runs"]) + f"; {' '.join(d['overrides'])}"),
)


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table: what was compared, the ratio, the goal and the measured context."""
    lines = ["| # | comparison | result | goal | measured |", "|---|---|---|---|---|"]
    for number, row in enumerate(ROWS, start=1):
        if measured := result["rows"].get(row.key):
            detail = measured["detail"]
            lines.append(f"| {number} | {row.text('comparison', detail)} | {row.value(measured)} "
                         f"| {row.text('goal', detail)} | {row.measured(detail, result)} |")
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
    journals = {name: results_dir / f"{stamp}-{result['mode']}-{name}.journal.log"
                for name in result.get("journals", {})}
    for name, journal in journals.items():
        write_atomically(journal, result["journals"][name])
    if journals:  # the json names the files, not their text
        result["journals"] = {name: journal.name for name, journal in journals.items()}
    for row in ROWS:  # the goals as the table states them: ROWS is their one source
        if measured := result["rows"].get(row.key):
            measured["goal"] = row.text("goal", measured["detail"])
    result["table"] = table(result)
    write_atomically(path, json.dumps(result, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
