import json

import pytest

from tfsweep import bench
from tfsweep.data import load_splits

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
    results = bench.alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results == {"a": [1, 1, 1], "b": [2, 2, 2]}


def test_median_ratio_pairs_rounds_and_drops_the_disturbed_one():
    # Round 2 ran while the machine was busy for the denominator only.
    assert bench.median_ratio([10, 11, 12], [5, 1, 6]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.median_ratio([1, 2], [1])


def test_float32_peak_counts_zen4_avx512_as_256_bit_halves():
    cpu = bench.read_cpuinfo(ZEN4_CPUINFO)
    assert cpu["vendor"] == "AuthenticAMD" and cpu["family"] == 25 and "avx512_bf16" in cpu["flags"]
    peak, assumption = bench.float32_peak(cpu, cores=2)
    assert peak == pytest.approx(2 * 2.6e9 * 32)
    assert "2 cores" in assumption
    intel = {**cpu, "vendor": "GenuineIntel", "family": 6}
    assert bench.float32_peak(intel, cores=2)[0] == pytest.approx(2 * 2.6e9 * 64)


def test_time_to_and_accuracy_at_read_the_curve():
    points = [(10.0, 100, 0.95), (20.0, 200, 0.991), (30.0, 300, 0.989), (40.0, 400, 0.993)]
    assert bench.time_to(points, 0.99) == 20.0
    assert bench.time_to(points, 0.999) is None
    assert bench.accuracy_at(points, 29.0) == 0.991
    assert bench.accuracy_at(points, 5.0) is None


def test_measurements_on_synthetic_data(make_cfg, tmp_path):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": "20", "trainer.evaluate_test": "false"})
    ours = bench.trainer_run(cfg)
    assert ours["steps_per_sec"] > 0 and ours["wall_seconds"] > 0 and "val/accuracy" in ours
    assert bench.keras_fit_run(cfg, load_splits(cfg.data))["steps_per_sec"] > 0

    curve = bench.curve_run(make_cfg(**{"tracking.enabled": "false", "trainer.steps": "40",
                                        "trainer.model_dir": str(tmp_path / "curve")}), every=10)
    assert [step for _, step, _ in curve["points"]] == [10, 20, 30, 40]
    seconds = [s for s, _, _ in curve["points"]]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert curve["points"][-1][2] == pytest.approx(curve["test/accuracy"])  # same split, same weights


def test_budget_stops_training_early(make_cfg):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": "1000"})
    curve = bench.curve_run(cfg, every=5, budget_s=0.0)
    assert [step for _, step, _ in curve["points"]] == [5]


def test_table_and_saved_json_name_the_machine(tmp_path):
    machine = bench.machine()
    result = {"mode": "quick", "machine": machine, "settings": {"speed_steps": 10}, "rows": {
        "trainer_vs_keras": {"value": 1.25, "goal": ">= 1.0",
                             "detail": {"trainer_steps_per_sec": 20.0, "keras_fit_steps_per_sec": 16.0}}},
              "curves": {"tutorial": [(1.0, 50, 0.9), (2.0, 100, 0.95)], "fast": [(1.0, 50, 0.97), (2.0, 100, 0.99)]}}
    path = bench.save(result, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["machine"]["tensorflow"] and saved["machine"]["cores"] >= 1
    assert "| 1 | trainer vs bare Keras" in saved["table"] and "1.25x" in saved["table"]
    assert (tmp_path / saved["plot"]).stat().st_size > 0
