import json
from pathlib import Path

import pytest
from sweep_fixtures import tiny_overrides

from bench import machine, overhead, report, runs, suite
from bench.stats import alternate, median_ratio
from tfsweep.cpu import read_cpuinfo
from tfsweep.data import load_splits
from tfsweep.sweep_config import compose_sweep

RESULTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "bench" / "results").glob("*.json")
                 if "rows" in json.loads(p.read_text()))  # the benchmark's; the load test saves its own there
ZEN4_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx avx2 fma avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_alternate_rotates_the_order_every_round():
    calls = []
    results = alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results == {"a": [1, 1, 1], "b": [2, 2, 2]}


def test_median_ratio_pairs_rounds_and_drops_the_disturbed_one():
    # Round 2 ran while the machine was busy for the denominator only; the ratio of medians would be 2.2.
    assert median_ratio([10, 11, 12], [5, 1, 6]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        median_ratio([1, 2], [1])


def test_float32_peak_counts_zen4_avx512_as_256_bit_halves():
    cpu = read_cpuinfo(ZEN4_CPUINFO)
    assert cpu["vendor"] == "AuthenticAMD" and cpu["family"] == 25 and "avx512_bf16" in cpu["flags"]
    peak, assumption = machine.float32_peak(cpu, cores=2)
    assert peak == pytest.approx(2 * 2.6e9 * 32)
    assert "2 cores" in assumption
    intel = {**cpu, "vendor": "GenuineIntel", "family": 6}
    assert machine.float32_peak(intel, cores=2)[0] == pytest.approx(2 * 2.6e9 * 64)


def test_time_to_and_accuracy_at_read_the_curve():
    points = [(10.0, 100, 0.95), (20.0, 200, 0.991), (30.0, 300, 0.989), (40.0, 400, 0.993)]
    assert runs.time_to(points, 0.99) == 20.0  # the first crossing, not the last
    assert runs.time_to(points, 0.999) is None
    assert runs.accuracy_at(points, 29.0) == 0.991
    assert runs.accuracy_at(points, 5.0) is None


def test_training_timer_stops_for_evaluations_and_checkpoints_between_log_points(monkeypatch):
    from tfsweep import hooks

    clock = iter([0.0,            # begin
                  5.0,            # log 50: 5 s of training
                  7.0, 10.0,      # evaluation at step 60, not a log point: 2 s of training, then 3 s off
                  13.0,           # log 100: 3 s more of training
                  13.0, 15.0,     # evaluation at the log point, 2 s off
                  15.0, 16.0,     # checkpoint, 1 s off
                  21.0])          # log 150: 5 s of training
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: next(clock))
    timer = hooks.TrainingTimer()
    timer.begin(None)
    timer.after_log(None, 50, {})
    timer.before_eval(None, 60, "val")
    timer.after_eval(None, 60, "val", {})
    timer.after_log(None, 100, {})
    timer.before_eval(None, 100, "val")
    timer.after_eval(None, 100, "val", {})
    timer.before_checkpoint(None, 100)
    timer.after_checkpoint(None, 100, "ckpt-100")
    timer.after_log(None, 150, {})
    assert timer.training_seconds == 15.0
    assert timer.steps_per_sec == 100 / 10.0  # steps 50 to 150 in the 10 training seconds between them


def test_speed_measurements_on_synthetic_data_agree_with_each_other(make_cfg):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": "40", "trainer.evaluate_test": "false"})
    ours = runs.trainer_run(cfg)
    timed_steps = cfg.trainer.steps - cfg.trainer.log_every  # from the first log point on
    assert timed_steps / ours["steps_per_sec"] < ours["wall_seconds"]  # the timed window lies inside the run
    assert 0 <= ours["val/accuracy"] <= 1
    keras_fit = runs.keras_fit_run(cfg, load_splits(cfg.data))
    # The same network, batch and data: a unit slip (examples for steps, ms for s) would leave this band.
    assert 0.1 < ours["steps_per_sec"] / keras_fit["steps_per_sec"] < 10


def test_tracked_run_counts_the_metric_batches_sent_while_its_timed_steps_train(make_cfg, tmp_path):
    cfg = make_cfg(**{"trainer.steps": "40", "trainer.log_every": "10", "trainer.eval_every": "20",
                      "trainer.evaluate_test": "false"})
    tracked = runs.trainer_run(cfg)
    # Timed from the log point at 10 to the one at 40: the loss points of steps 10, 20 and 30 and the
    # validation at 20 are sent in that window, in one to four batches (points wait for each other).
    assert 1 <= tracked["metric_batches_in_loop"] <= 4
    assert 0 < tracked["metric_batch_cpu_seconds"] < tracked["timed_seconds"] < tracked["wall_seconds"]
    untracked = runs.trainer_run(make_cfg(**{"tracking.enabled": "false", "trainer.steps": "40",
                                             "trainer.log_every": "10",
                                             "paths.output_dir": str(tmp_path / "untracked")}))
    assert untracked["metric_batches_in_loop"] == 0 and untracked["metric_batch_cpu_seconds"] == 0


def test_accuracy_curve_checks_the_test_split_off_the_clock(make_cfg, tmp_path):
    curve = runs.curve_run(make_cfg(**{"tracking.enabled": "false", "trainer.steps": "40",
                                       "trainer.model_dir": str(tmp_path / "curve")}), every=10)
    assert [step for _, step, _ in curve["points"]] == [10, 20, 30, 40]
    seconds = [s for s, _, _ in curve["points"]]
    assert seconds == sorted(seconds)
    assert curve["points"][-1][2] == pytest.approx(curve["test/accuracy"])  # same split, same weights


def test_budget_stops_training_early(make_cfg):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": "1000"})
    curve = runs.curve_run(cfg, every=5, budget_s=0.0)
    assert [step for _, step, _ in curve["points"]] == [5]


def table_row(key: str) -> report.Row:
    return next(row for row in report.ROWS if row.key == key)


def test_table_names_the_machine_and_keeps_row_numbers(tmp_path):
    described = machine.describe()
    result = {"mode": "quick", "machine": described, "settings": {"speed_steps": 10}, "rows": {
        "trainer_vs_keras": {"value": 1.25,
                             "detail": {"trainer_steps_per_sec": 20.0, "keras_fit_steps_per_sec": 16.0}},
        "trial_overhead": {"value": 0.25, "detail": {
            "mean_outside_seconds": 2.0, "mean_trial_seconds": 8.0, "trials_measured": 3, "trial_steps": 100,
            "phases_seconds": {name: 0.25 for name in overhead.PHASES}}}},
              "curves": {"tutorial": [(1.0, 50, 0.9), (2.0, 100, 0.95)], "fast": [(1.0, 50, 0.97), (2.0, 100, 0.99)]}}
    saved = json.loads(report.save(result, tmp_path).read_text())
    lines = saved["table"].splitlines()
    assert lines[2] == "| 1 | trainer vs bare Keras `model.fit` (steps/s, float32, batch 100) | 1.25x | ≥ 1.0x " \
                       "| 20.0 vs 16.0 steps/s |"
    assert lines[3].startswith("| 8 | trial overhead") and "| 25.0% | ≤ 10% |" in lines[3]
    assert "trace and compile 0.25 s" in lines[3] and "2.0 s of a 8.0 s trial" in lines[3]
    assert {key: row["goal"] for key, row in saved["rows"].items()} == {  # the json's goals are the table's
        "trainer_vs_keras": "≥ 1.0x", "trial_overhead": "≤ 10%"}
    cpu = read_cpuinfo()
    assert f"{cpu['model_name']} (family {cpu['family']} model {cpu['model']}), {described['cores']} cores" in lines[-1]
    assert saved["machine"]["tensorflow"] == described["tensorflow"]
    assert (tmp_path / saved["plot"]).stat().st_size > 0


def test_the_sweep_journals_are_kept_beside_the_results_for_a_replay(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    for side in ("pruned", "none"):
        (work / f"sweep-{side}").mkdir(parents=True)
        (work / f"sweep-{side}" / "journal.log").write_text(f'{{"op_code": 0, "side": "{side}"}}\n')
    (work / "run-001").mkdir()  # a training run's folder holds no journal
    result = {"mode": "quick", "machine": machine.describe(), "settings": {}, "rows": {},
              "journals": suite.journals(work)}
    saved = json.loads(report.save(result, results).read_text())
    assert set(saved["journals"]) == {"sweep-none", "sweep-pruned"}
    for side in ("pruned", "none"):
        kept = results / saved["journals"][f"sweep-{side}"]
        assert kept.name.endswith(f"-quick-sweep-{side}.journal.log")
        assert kept.read_text() == f'{{"op_code": 0, "side": "{side}"}}\n'


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_saved_results_still_render_to_their_own_table(path):
    saved = json.loads(path.read_text())
    assert report.table(saved) == saved["table"]


def test_first_chunk_excess_compares_with_the_steady_step_time():
    # 50 steps took 3 s at first, then 0.5 s per 50 steps: 2.5 s went to tracing.
    assert overhead.first_chunk_excess([(50, 3.0), (50, 0.5), (100, 1.0)]) == pytest.approx(2.5)
    assert overhead.first_chunk_excess([(50, 3.0)]) == 0.0  # nothing to compare with


def test_breakdown_adds_up_to_the_wall_time():
    def record(number, first_evaluation):
        t = overhead.TrialRecord("bench", number, wall_seconds=20.0, between_seconds=1.0)
        t.calls.update({"model_build": [0.5], "mlflow": [0.25, 0.75], "evaluations": [first_evaluation, 1.0, 1.0],
                        "checkpoint_saves": [0.5], "checkpoint_uploads": [1.5], "clear_keras": [0.25]})
        timer = overhead.ChunkTimer()
        timer.intervals, timer.training_seconds = [(50, 4.0), (50, 1.0), (50, 1.0)], 6.0
        t.timers.append(timer)
        return t

    result = overhead.breakdown([record(0, 3.0), record(1, 2.0)])
    assert result["steady_evaluation_seconds"] == 1.0
    first, second = result["per_trial"]
    assert first["phases_seconds"]["trace_and_compile"] == pytest.approx(3.0 + 2.0)  # train 3 s + eval 2 s
    assert second["phases_seconds"]["trace_and_compile"] == pytest.approx(3.0 + 1.0)
    assert first["phases_seconds"]["evaluations"] == pytest.approx(3.0)
    assert first["training_seconds"] == pytest.approx(3.0)
    assert first["phases_seconds"]["rest"] == pytest.approx(21.0 - 3.0 - (5 + 0.5 + 1 + 3 + 0.5 + 1.5 + 0.25 + 1))
    assert sum(first["phases_seconds"].values()) + first["training_seconds"] == pytest.approx(21.0)
    assert result["mean_trial_seconds"] == 21.0 and result["trials_measured"] == 2
    assert first["calls"]["evaluations"] == 3


def test_sweep_rows_time_every_trial_by_phase(tmp_path):
    shrink = [o for o in tiny_overrides(tmp_path) if "pruner" not in o]  # the pruning row sets its own
    # one trial: successive halving lets the leader at a rung go on, so the pruned side's trial finishes too
    rows = suite.sweep_rows(suite.MODES["quick"], tmp_path, (*shrink, "sweep.n_trials=1", "tracking.log_checkpoints=true"))
    assert rows["pruning"]["detail"]["none"]["n_complete"] == 1
    detail = rows["trial_overhead"]["detail"]
    assert detail["trials_measured"] == 2 and detail["trial_steps"] == 30
    assert [t["study"] for t in detail["per_trial"]] == ["bench-pruned", "bench-none"]
    for trial in detail["per_trial"]:
        # steps 30, eval_every 10, checkpoint_every 10: each phase is seen as often as the trainer runs it
        evaluations = 3
        assert trial["calls"]["evaluations"] == evaluations and trial["calls"]["checkpoint_saves"] == evaluations
        assert trial["calls"]["model_build"] == 1 and trial["calls"]["clear_keras"] == 1
        assert trial["calls"]["checkpoint_uploads"] >= 1 and trial["calls"]["mlflow"] >= 3
        phases = trial["phases_seconds"]
        assert phases["rest"] > -0.05  # no second counted twice
        assert sum(phases.values()) + trial["training_seconds"] == pytest.approx(trial["wall_seconds"])
        assert trial["outside_seconds"] == pytest.approx(trial["wall_seconds"] - trial["training_seconds"])
    assert rows["trial_overhead"]["value"] == pytest.approx(
        sum(t["outside_seconds"] for t in detail["per_trial"]) / sum(t["wall_seconds"] for t in detail["per_trial"]))
    assert rows["pruning"]["detail"]["pruned"]["pruner"] == "SuccessiveHalvingPruner"  # the default sweep's
    assert rows["pruning"]["detail"]["none"]["pruner"] == "NopPruner"
    # row 10 is the pruned side, `make sweep` as a user runs it: its time, and its pick's test accuracy
    default, pruned = rows["default_sweep"], rows["pruning"]["detail"]["pruned"]
    assert default["detail"]["wall_seconds"] == pruned["wall_seconds"] and default["detail"]["pruner"] == pruned["pruner"]
    assert default["detail"]["best_params"] == pruned["best_params"] != {} and pruned["n_complete"] == 1
    assert 0 <= default["value"] == default["detail"]["best_test_accuracy"] <= 1
    line = table_row("default_sweep").measured(default["detail"], {})
    assert "failed of 1 trials of 30 steps; best val accuracy" in line
    assert default["detail"]["n_trials"] == 1 and 0 <= rows["pruning"]["detail"]["none"]["best_value"] <= 1
    # row 11: the whole command, its imports included, against the pruned side's training steps
    wall = rows["sweep_wall_overhead"]["detail"]
    assert wall["command_seconds"] == pytest.approx(pruned["wall_seconds"] + wall["imports_seconds"])
    assert wall["imports_seconds"] > 1  # TensorFlow alone takes longer to import
    assert rows["sweep_wall_overhead"]["value"] == pytest.approx(1 - wall["training_seconds"] / wall["command_seconds"])
    assert 0 < wall["training_seconds"] < pruned["wall_seconds"]


def test_wide_space_row_sweeps_each_seed_until_its_timeout_and_reports_the_lowest_pick(tmp_path):
    shrink = [o for o in tiny_overrides(tmp_path) if "pruner" not in o and not o.startswith("trainer.steps")]
    settings = suite.Settings(speed_steps=10, repeats=1, matmul_size=8, tutorial_budget_s=1, monitor_every=10,
                              tutorial_monitor_every=10, wide_seeds=(0, 1),
                              wide_overrides=("sweeps=wide", *shrink, "trainer.steps=20", "sweep.timeout=1"))
    row = suite.wide_space_rows(settings, tmp_path)["wide_space"]
    runs_ = row["detail"]["runs"]
    assert [r["seed"] for r in runs_] == [0, 1]
    # the timeout lets each command's first trial end (it may diverge on this space), then stops it
    assert all(r["n_complete"] + r["n_pruned"] + r["n_failed"] >= 1 for r in runs_)
    assert all(r["best_test_accuracy"] is not None for r in runs_ if r["n_complete"])
    tested = [r["best_test_accuracy"] for r in runs_]
    assert row["value"] == (None if None in tested else min(tested))
    assert row["detail"]["overrides"][0] == "sweeps=wide"
    assert table_row("wide_space").measured(row["detail"], {}).startswith("seed 0 ")


def test_fast_preset_row_alternates_seeds_and_counts_the_seeds_at_99(make_cfg, synthetic_data, tmp_path):
    tiny = tuple(f"{k}={v}" for k, v in {**synthetic_data, "model.filters": "[4,8]", "model.dense_units": "32",
                                         "trainer.steps": "20", "trainer.log_every": "10", "trainer.eval_every": "10",
                                         "trainer.checkpoint_every": "10", "tracking.enabled": "false"}.items())
    settings = suite.Settings(speed_steps=10, repeats=1, matmul_size=8, tutorial_budget_s=1, monitor_every=10,
                              tutorial_monitor_every=10, fast_overrides=tiny, fast_seeds=(0, 1))
    result = {"rows": {}}
    suite.fast_seed_rows(settings, runs.Workspace(tmp_path), result)
    row = result["rows"]["fast_preset_seeds"]
    detail = row["detail"]
    assert [r["seed"] for r in detail["runs"]["schedule"]] == [r["seed"] for r in detail["runs"]["constant"]] == [0, 1]
    finals = [r["test_accuracy"] for r in detail["runs"]["schedule"]]
    assert row["value"] == min(finals) and detail["seeds_at_99.0"] == sum(a >= 0.99 for a in finals)
    reached = [r["seconds_to_99.0"] for side in detail["runs"].values() for r in side]
    assert (detail["time_to_99.0_ratio"] is None) == (None in reached)
    line = table_row("fast_preset_seeds").measured(detail, result)
    assert line.startswith(f"{detail['seeds_at_99.0']} of 2 seeds end at")


def recorded_trial(number: int, curve: list[float], seconds: float):
    """A finished 1,500-step trial as an unpruned study stores it: its curve every 500 steps, its duration."""
    import datetime as dt

    import optuna

    start = dt.datetime(2026, 1, 1)
    return optuna.trial.FrozenTrial(
        number=number, trial_id=number, state=optuna.trial.TrialState.COMPLETE, value=curve[-1], values=None,
        datetime_start=start, datetime_complete=start + dt.timedelta(seconds=seconds), params={}, distributions={},
        user_attrs={}, system_attrs={}, intermediate_values={500 * (i + 1): v for i, v in enumerate(curve)})


def test_pruner_replay_charges_each_trial_the_steps_it_would_have_run():
    from bench import replay

    trials = [recorded_trial(0, [0.90, 0.95, 0.96], 33.0), recorded_trial(1, [0.97, 0.98, 0.99], 63.0),
              recorded_trial(2, [0.80, 0.85, 0.86], 33.0), recorded_trial(3, [0.98, 0.99, 0.995], 33.0)]
    none, halving = replay.compare(trials, [
        {"_target_": "optuna.pruners.NopPruner"},
        {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 500, "reduction_factor": 2,
         "bootstrap_count": 1}], steps=1500)
    assert none["ratio"] == pytest.approx(1.0) and none["n_complete"] == 4 and none["shortfall"] == 0
    # trial 0 is the bootstrap (stops at 500); 1 is the best of two at 500 and of its two at 1,000 but
    # alone there, so the bootstrap stops it too; 2 is behind at 500; 3 leads at 500 and 1,000 and finishes
    fixed = replay.FIXED_SECONDS
    cost = [fixed + (33 - fixed) / 3, fixed + (63 - fixed) * 2 / 3, fixed + (33 - fixed) / 3, 33.0]
    assert halving["seconds"] == pytest.approx(sum(cost)) and halving["ratio"] == pytest.approx(sum(cost) / 162)
    assert halving["n_complete"] == 1 and halving["best_value"] == 0.995 and halving["shortfall"] == 0
    # 0 and 1 each led the study when they ran, and stopped; 2 was behind; 3 led and finished
    assert none["stopped"] == [] and halving["stopped"] == [0, 1, 2]
    # with one random trial, 0 is the best before guided trial 1 and 1 the best before 2 and 3: both steer,
    # and the halving stops both
    assert replay.steering(trials, startup=1) == [0, 1] and halving["stops_steering"] == [0, 1]
    assert replay.steering(trials, startup=2) == [1] and replay.steering(trials, startup=4) == []
    # trials 0 and 1 run to the end; 2 and 3 stop at the first evaluation, a third of the way
    assert replay.floor(trials, [0, 1], first_step=500, steps=1500) == pytest.approx(
        (33 + 63 + 2 * (fixed + (33 - fixed) / 3)) / 162)


def test_pruner_replay_of_a_tpe_sweep_shows_which_pruners_it_cannot_predict(capsys):
    """The numbers sweeps/default.yaml quotes for TPE, from the committed unpruned journal of the default
    sweep under TPE, with the learning rate from 3e-4 (10 trials of 800 steps, validated every 100)."""
    from bench import replay

    journal = Path(__file__).resolve().parents[1] / "bench/results/2026-12-03T1547-default-sweep-unpruned.journal.log"
    replay.main(["sweeps/sampler=tpe", "sweep.study_name=replay-none", f"sweep.storage={journal}",
                 "trainer.steps=800", "trainer.eval_every=100", "sweep.sampler.n_startup_trials=4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "replay-none: 10 finished trials of 800 steps, 1029 s, best 0.9938"
    # 3, 5 and 6 are the best so far when guided trials 4-9 are drawn (0 is passed during the random start):
    # letting them finish and stopping every other trial at step 100 would cost 0.43x
    assert lines[1] == "0.43x at least for a pruner that stops no trial steering the sampler (steering: 3, 5, 6)"
    rows = {line.split("SuccessiveHalvingPruner ")[-1]: line.split("  ")[:4] for line in lines[2:]}
    # the pruner the default ran TPE with (0.66x run): it stops none of them
    assert rows["min_resource=200 reduction_factor=4 bootstrap_count=2"] == [
        "0.67x", " 5 finished", "best short by 0.0000", "stops steering: none"]
    # cheaper on paper, but it stops steering trials 3 and 5: run, it pruned all 10 trials
    assert rows["min_resource=100 reduction_factor=5 bootstrap_count=2"] == [
        "0.48x", " 2 finished", "best short by 0.0000", "stops steering: 3, 5"]
    assert rows["min_resource=100 reduction_factor=2 bootstrap_count=0"] == [
        "0.59x", " 4 finished", "best short by 0.0000", "stops steering: none"]


def test_pruner_replay_of_the_default_random_sweep_backs_its_pruner(capsys):
    """The default pruner's cost on the committed unpruned journal of 10 random default-sweep trials of
    800 steps (validated every 100 so that rungs at 100 replay too): it keeps the best trial, and a
    bootstrap, cheaper here, lets no trial finish once the first is the best at its rung."""
    from bench import replay

    journal = Path(__file__).resolve().parents[1] / "bench/results/2026-12-03T1853-default-sweep-unpruned.journal.log"
    replay.main(["sweep.study_name=random-none-lr", f"sweep.storage={journal}", "sweeps/sampler=random",
                 "trainer.steps=800", "trainer.eval_every=100"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "random-none-lr: 10 finished trials of 800 steps, 457 s, best 0.9936"
    # random draws follow no trial, so the replay is what the pruned study runs
    assert lines[1].endswith("(steering: none)")
    rows = {line.split("SuccessiveHalvingPruner ")[-1]: line.split("  ")[:3] for line in lines[2:]}
    halving = compose_sweep(["sweeps=default"]).sweep.pruner
    chosen = f"min_resource=200 reduction_factor={halving.reduction_factor} bootstrap_count={halving.bootstrap_count}"
    assert rows[chosen] == ["0.49x", " 2 finished", "best short by 0.0000"]
    assert rows["min_resource=200 reduction_factor=5 bootstrap_count=1"] == ["0.39x", " 1 finished",
                                                                             "best short by 0.0000"]
    # a first rung at 100: no trial finishes with a bootstrap
    assert rows["min_resource=100 reduction_factor=5 bootstrap_count=1"][1:] == [" 0 finished", "best short by n/a"]
    assert rows["min_resource=100 reduction_factor=4 bootstrap_count=0"] == ["0.40x", " 2 finished",
                                                                             "best short by 0.0000"]


def test_pruner_replay_of_the_16_trial_tpe_sweep_gives_the_figures_of_its_time(capsys):
    """The figures a factor of 4 with a bootstrap of 2 was chosen by on 2026-12-02, when the default sweep was
    16 TPE trials of 1,500 steps, from its committed unpruned journal."""
    from bench import replay

    journal = Path(__file__).resolve().parents[1] / "bench/results/2026-12-02T1745-default-sweep-unpruned.journal.log"
    # the 16-trial, 1,500-step default sweep of 2026-12-02, replayed with the settings it ran with
    replay.main(["sweeps/sampler=tpe", "sweep.study_name=replay-none", f"sweep.storage={journal}",
                 "trainer.steps=1500", "trainer.eval_every=250"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "replay-none: 16 finished trials of 1500 steps, 2639 s, best 0.9938"
    rows = {line.split("SuccessiveHalvingPruner ")[-1]: line.split("  ")[:3] for line in lines[2:]}
    assert rows["min_resource=250 reduction_factor=4 bootstrap_count=2"] == ["0.47x", " 3 finished",
                                                                             "best short by 0.0000"]
    assert rows["min_resource=250 reduction_factor=3 bootstrap_count=0"] == ["0.59x", " 6 finished",
                                                                             "best short by 0.0014"]
