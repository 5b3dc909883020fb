import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

from tfsweep.data import load_splits
from tfsweep.errors import ConfigError, NonFiniteLossError, UserError
from tfsweep.hooks import Hook
from tfsweep.inputs import eval_input_fn, train_input_fn
from tfsweep.trainer import Trainer
from tfsweep.training import evaluate_checkpoint, train


class Recorder(Hook):
    def __init__(self):
        self.logs, self.evals, self.checkpoints = [], [], []
        self.evals_begun: list[tuple[int, str]] = []

    def after_log(self, trainer, step, logs):
        self.logs.append((step, logs))

    def before_eval(self, trainer, step, split):
        assert len(self.evals_begun) == len(self.evals)  # the last evaluation has ended
        self.evals_begun.append((step, split))

    def after_eval(self, trainer, step, split, metrics):
        self.evals.append((step, split, metrics))

    def after_checkpoint(self, trainer, step, path):
        self.checkpoints.append(step)


def test_short_training_learns_checkpoints_and_reports(make_cfg):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": "40"})
    recorder = Recorder()
    metrics = train(cfg, hooks=[recorder])
    assert [step for step, _ in recorder.logs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [(step, split) for step, split, _ in recorder.evals] == [
        (10, "val"), (20, "val"), (30, "val"), (40, "val"), (40, "test")] == recorder.evals_begun
    assert recorder.checkpoints == [10, 20, 30, 40]
    assert all(math.isfinite(logs["train/loss"]) and logs["global_step_per_sec"] > 0 for _, logs in recorder.logs)
    assert recorder.logs[-1][1]["train/loss"] < recorder.logs[0][1]["train/loss"]
    assert metrics["val/accuracy"] > 0.5 and metrics["test/accuracy"] > 0.5  # chance is 0.1
    assert sorted(p.name for p in Path(cfg.trainer.model_dir).glob("ckpt-*.index")) == [
        "ckpt-20.index", "ckpt-30.index", "ckpt-40.index"]  # keep_checkpoints=3
    assert evaluate_checkpoint(cfg, "test")["test/accuracy"] == pytest.approx(metrics["test/accuracy"])


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(make_cfg, tmp_path, precision):
    # Dropout on, a checkpoint between log points, Adam and a warmed-up cosine schedule: the resumed run
    # needs the dropout RNG, the optimizer's iterations (which the schedule reads), the running training
    # metrics and the data position of the checkpoint.
    common = {"tracking.enabled": "false", "model.dropout": "0.4", "trainer.steps": "20",
              "trainer.precision": precision, "trainer.log_every": "4", "trainer.checkpoint_every": "6",
              "schedule": "cosine", "schedule.warmup_steps": "4", "schedule.alpha": "0.1"}
    straight_recorder = Recorder()
    straight = train(make_cfg(**common, **{"trainer.model_dir": str(tmp_path / "straight")}),
                     hooks=[straight_recorder])

    class Killed(Exception):
        pass

    class KillAfterFirstCheckpoint(Hook):
        def after_checkpoint(self, trainer, step, path):
            raise Killed

    cfg = make_cfg(**common)
    with pytest.raises(Killed):
        train(cfg, hooks=[KillAfterFirstCheckpoint()])
    recorder = Recorder()
    resumed = Trainer(cfg, load_splits(cfg.data), [recorder])
    assert resumed.start_step == 6 and int(resumed.optimizer.iterations) == 6
    assert resumed.train() == straight  # every metric, to the last bit
    without_rate = [(step, {k: v for k, v in logs.items() if k != "global_step_per_sec"})
                    for step, logs in straight_recorder.logs if step > 6]
    assert [(step, {k: v for k, v in logs.items() if k != "global_step_per_sec"})
            for step, logs in recorder.logs] == without_rate


def test_same_seed_gives_same_initial_weights_and_data_order(make_cfg, tmp_path):
    def trainer(name, seed=0):
        return Trainer(make_cfg(**{"tracking.enabled": "false", "trainer.seed": str(seed),
                                   "trainer.model_dir": str(tmp_path / name)}), splits)

    splits = load_splits(make_cfg().data)
    a, b, other = trainer("a"), trainer("b"), trainer("other", seed=1)
    for wa, wb in zip(a.network.get_weights(), b.network.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.network.get_weights()[0], other.network.get_weights()[0])

    def first_labels(seed, start_step=0):
        dataset = train_input_fn(splits.train_images, splits.train_labels, 20, seed, 1000, start_step)
        return [labels.numpy().tolist() for _, labels in dataset.take(3)]

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)
    assert first_labels(0, start_step=1) == first_labels(0)[1:] + [first_labels(0, 3)[0]]


def test_features_are_scaled_to_unit_range(make_cfg):
    splits = load_splits(make_cfg().data)
    features, labels = next(iter(train_input_fn(splits.train_images, splits.train_labels, 20, 0, 100)))
    assert features.dtype == tf.float32 and features.shape == (20, 28, 28) and labels.shape == (20,)
    assert float(tf.reduce_min(features)) >= 0.0 and float(tf.reduce_max(features)) == 1.0


def test_input_pipelines_run_without_the_autotuner_whose_thread_delays_deleting_an_iterator(make_cfg):
    # With autotuning on, a trial's end waited up to 20 s for the autotuner's sleeping thread (a sweep
    # trial's wall time against its MLflow run's, 2026-12-03); tens of seconds of running make it show.
    splits = load_splits(make_cfg().data)
    for dataset in (train_input_fn(splits.train_images, splits.train_labels, 20, 0, 100),
                    eval_input_fn(splits.test_images, splits.test_labels, 20)):
        assert dataset.options().autotune.enabled is False
        assert len(list(dataset.take(2))) == 2


def test_nan_loss_from_the_start_says_no_checkpoint_exists_and_saves_none(make_cfg):
    cfg = make_cfg(**{"tracking.enabled": "false", "optimizer": "sgd", "optimizer.learning_rate": "1e12"})
    with pytest.raises(NonFiniteLossError, match=r"lower optimizer.learning_rate \(no checkpoint was saved"):
        train(cfg)
    assert not list(Path(cfg.trainer.model_dir).glob("ckpt-*"))


def test_a_diverging_run_never_replaces_its_last_finite_checkpoint(make_cfg):
    # Checkpoints every 2 steps but log points only every 20, and one checkpoint kept: a diverged
    # network saved at a checkpoint boundary would replace the last finite one.
    class DivergeAfterStep4(Hook):
        def after_checkpoint(self, trainer, step, path):
            if step == 4:
                trainer.network.get_layer("dense").kernel.assign(np.full((392, 32), np.inf, np.float32))

    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.keep_checkpoints": "1", "trainer.checkpoint_every": "2",
                      "trainer.log_every": "20", "trainer.eval_every": "20", "trainer.steps": "40"})
    # Which guard sees it first depends on the CPU's kernels: some turn the infinite weights into a NaN
    # loss, others (AVX-512 on Zen 5) keep the loss finite for these steps and the save refuses them.
    with pytest.raises(NonFiniteLossError, match=r"became (nan|not finite) by step 6; lower optimizer.learning_rate \(the last "
                                                 r"finite checkpoint, step 4, stays in trainer.model_dir="):
        train(cfg, hooks=[DivergeAfterStep4()])
    assert [p.name for p in Path(cfg.trainer.model_dir).glob("ckpt-*.index")] == ["ckpt-4.index"]
    restored = Trainer(cfg, load_splits(cfg.data))
    assert restored.start_step == 4 and all(np.isfinite(w).all() for w in restored.network.get_weights())


@pytest.mark.parametrize("batch_size", ["201", "10000000000000"])
def test_a_batch_larger_than_the_training_split_is_refused_before_anything_is_written(make_cfg, batch_size):
    cfg = make_cfg(**{"data.batch_size": batch_size})  # the synthetic training split has 200 images
    with pytest.raises(ConfigError, match=rf"data.batch_size={batch_size} is larger than the training split "
                                          r"\(200 images.*use at most 200"):
        train(cfg)
    assert not Path(cfg.trainer.model_dir).exists()
    assert MlflowClient(cfg.tracking.uri).search_runs(["0"]) == []
    assert MlflowClient(cfg.tracking.uri).get_experiment_by_name(cfg.tracking.experiment_name) is None


def test_a_model_dir_of_another_network_is_refused_and_left_as_it_was(make_cfg):
    train(make_cfg(**{"trainer.steps": "10", "tracking.log_model": "false"}))
    cfg = make_cfg(**{"trainer.steps": "10", "model.filters": "[8,8]"})
    before = {p.name: p.stat().st_mtime_ns for p in Path(cfg.trainer.model_dir).iterdir()}
    with pytest.raises(UserError, match=r"trainer.model_dir=.* holds a checkpoint of another network .*"
                                        r"shape \(5, 5, 1, 4\).*shape \(5, 5, 1, 8\).*conv1/kernel.*"
                                        r"use a new trainer.model_dir"):
        train(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.trainer.model_dir).iterdir()} == before
    runs = MlflowClient(cfg.tracking.uri).search_runs(
        [MlflowClient(cfg.tracking.uri).get_experiment_by_name(cfg.tracking.experiment_name).experiment_id])
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_mixed_bfloat16_trains(make_cfg):
    metrics = train(make_cfg(**{"tracking.enabled": "false", "trainer.precision": "mixed_bfloat16"}))
    assert metrics["val/accuracy"] > 0.3


def test_request_stop_ends_training_early(make_cfg):
    class StopAtTen(Hook):
        def after_eval(self, trainer, step, split, metrics):
            trainer.request_stop("enough")

    cfg = make_cfg(**{"tracking.enabled": "false"})
    metrics = train(cfg, hooks=[StopAtTen()])
    assert "test/accuracy" not in metrics and "val/accuracy" in metrics
    assert Trainer(cfg, load_splits(cfg.data)).start_step == 10


def test_probabilities_hook_logs_the_softmax_of_the_last_batch(make_cfg, caplog):
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.log_probabilities": "true", "trainer.steps": "5"})
    with caplog.at_level("INFO", logger="tfsweep.hooks"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probabilities (step 5)")]
    assert len(lines) == 1 and lines[0].count("[") == 21  # a [20, 10] array: one outer and 20 row brackets


class LearningRates(Hook):
    """The learning rate the optimizer applies at the next step, at each log point."""

    def __init__(self):
        self.rates = {}

    def after_log(self, trainer, step, logs):
        self.rates[step] = float(trainer.optimizer.learning_rate)


def test_the_learning_rate_follows_the_cosine_schedule_with_warm_up_to_the_step(make_cfg):
    peak, warmup, steps, alpha = 0.01, 4, 20, 0.1
    cfg = make_cfg(**{"tracking.enabled": "false", "trainer.steps": str(steps), "trainer.log_every": "2",
                      "optimizer.learning_rate": str(peak), "schedule": "cosine",
                      "schedule.warmup_steps": str(warmup), "schedule.alpha": str(alpha)})
    rates = LearningRates()
    train(cfg, hooks=[rates])

    def expected(step):  # linear from 0 to the peak, then cosine down to alpha * peak at `steps`
        if step < warmup:
            return peak * step / warmup
        done = (step - warmup) / (steps - warmup)
        return peak * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * done)) + alpha)

    assert list(rates.rates) == list(range(2, steps + 1, 2))
    for step, rate in rates.rates.items():
        assert rate == pytest.approx(expected(step), rel=1e-5), step
    assert rates.rates[steps] == pytest.approx(alpha * peak)


def test_a_schedule_changes_training_and_the_constant_one_is_the_plain_learning_rate(make_cfg, tmp_path):
    def weights(name, *extra):
        cfg = make_cfg(*extra, **{"tracking.enabled": "false", "optimizer": "sgd", "optimizer.learning_rate": "0.05",
                                  "trainer.steps": "10", "trainer.model_dir": str(tmp_path / name)})
        trainer = Trainer(cfg, load_splits(cfg.data))
        trainer.train()
        return trainer.network.get_weights()

    constant = weights("constant")
    exponential = weights("exponential", "schedule=exponential")
    cosine_at_alpha_1 = weights("flat-cosine", "schedule=cosine", "schedule.alpha=1.0")  # a flat cosine
    assert not all(np.array_equal(a, b) for a, b in zip(constant, exponential))
    for a, b in zip(constant, cosine_at_alpha_1):
        np.testing.assert_array_equal(a, b)


def test_a_process_reads_its_data_once_until_a_file_changes(make_cfg, tmp_path, synthetic_data):
    import shutil

    from tfsweep.training import cached_splits

    root = tmp_path / "data"
    shutil.copytree(synthetic_data["data.root"], root)
    cfg = make_cfg(**{"data.root": str(root)})
    first = cached_splits(cfg.data)
    assert cached_splits(make_cfg(**{"data.root": str(root)}).data) is first  # the next trial's config
    assert cached_splits(make_cfg(**{"data.root": str(root), "data.batch_size": "7"}).data) is first
    assert cached_splits(make_cfg(**{"data.root": str(root), "data.validation_size": "20"}).data) is not first
    labels = root / cfg.data.test_labels.name
    labels.write_bytes(labels.read_bytes()[:-1])  # truncated: verified again, refused, fetched again (none)
    with pytest.raises(Exception, match=labels.name):
        cached_splits(cfg.data)
