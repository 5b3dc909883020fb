"""An Estimator-style trainer: model function + input functions + `model_dir` + hooks.

The loop runs its steps in compiled chunks (one `tf.function` call per logging interval), so Python
runs once per `log_every` steps rather than once per step; metrics are accumulated on the graph side
and read only at logging points.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig

from tfsweep.data import Splits
from tfsweep.errors import NonFiniteLossError
from tfsweep.hooks import Hook
from tfsweep.inputs import eval_input_fn, train_input_fn
from tfsweep.model import Mode, build_network, model_fn

log = logging.getLogger(__name__)


class Trainer:
    """Trains `cfg.model` on `splits` for `cfg.trainer.steps` global steps, resuming from `model_dir`."""

    def __init__(self, cfg: DictConfig, splits: Splits, hooks: list[Hook] = ()) -> None:
        self.cfg, self.splits, self.hooks = cfg, splits, list(hooks)
        self.steps = cfg.trainer.steps
        self.model_dir = Path(cfg.trainer.model_dir)
        keras.utils.set_random_seed(cfg.trainer.seed)  # initial weights and dropout masks
        self.network = build_network(cfg.model, cfg.trainer.precision)
        self.optimizer = instantiate(cfg.optimizer)
        self.optimizer.build(self.network.trainable_variables)  # so a checkpoint can restore its slots
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.checkpoint = tf.train.Checkpoint(network=self.network, optimizer=self.optimizer,
                                              global_step=self.global_step)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.model_dir),
                                                  max_to_keep=cfg.trainer.keep_checkpoints,
                                                  step_counter=self.global_step)
        # Running sums since the last logging point, kept on the graph side.
        self._loss_sum = tf.Variable(0.0, trainable=False)
        self._correct = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._seen = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._keep_probabilities = bool(cfg.trainer.log_probabilities)
        self._probabilities = tf.Variable(tf.zeros([cfg.data.batch_size, cfg.model.num_classes]),
                                          trainable=False)
        self._stop_reason: str | None = None
        self.start_step = self._restore()

    # -- model_dir ---------------------------------------------------------------------------------
    def _restore(self) -> int:
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        step = int(self.global_step.numpy())
        log.info("restored %s: resuming at global step %d", latest, step)
        return step

    def save(self) -> str:
        path = self.manager.save(checkpoint_number=self.global_step)
        for hook in self.hooks:
            hook.after_checkpoint(self, int(self.global_step.numpy()), path)
        return path

    # -- compiled steps ----------------------------------------------------------------------------
    @tf.function
    def _train_chunk(self, iterator, num_steps):
        for _ in tf.range(num_steps):
            features, labels = next(iterator)
            with tf.GradientTape() as tape:
                spec = model_fn(self.network, features, labels, Mode.TRAIN)
            gradients = tape.gradient(spec.loss, self.network.trainable_variables)
            self.optimizer.apply_gradients(zip(gradients, self.network.trainable_variables))
            self.global_step.assign_add(1)
            self._loss_sum.assign_add(spec.loss)
            self._correct.assign_add(tf.reduce_sum(tf.cast(spec.predictions["classes"] == labels, tf.int64)))
            self._seen.assign_add(tf.cast(tf.shape(labels)[0], tf.int64))
            if self._keep_probabilities:
                self._probabilities.assign(spec.predictions["probabilities"])

    @tf.function(reduce_retracing=True)
    def _eval_batch(self, features, labels):
        spec = model_fn(self.network, features, labels, Mode.EVAL)
        batch = tf.shape(labels)[0]
        correct = tf.reduce_sum(tf.cast(spec.predictions["classes"] == labels, tf.int64))
        return spec.loss * tf.cast(batch, tf.float32), correct, batch

    @tf.function(reduce_retracing=True)
    def _predict_batch(self, features):
        return model_fn(self.network, features, None, Mode.PREDICT).predictions

    # -- public API --------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop after the current chunk, like a hook's `run_context.request_stop()`."""
        self._stop_reason = reason

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    def last_probabilities(self) -> np.ndarray:
        return self._probabilities.numpy()

    def evaluate(self, split: str) -> dict[str, float]:
        """Mean loss and accuracy over a whole split (`validation` or `test`), dropout off."""
        prefix = {"validation": "val", "test": "test"}[split]
        images, labels = getattr(self.splits, f"{split}_images"), getattr(self.splits, f"{split}_labels")
        loss_sum, correct, count = 0.0, 0, 0
        for features, batch_labels in eval_input_fn(images, labels, self.cfg.data.eval_batch_size):
            batch_loss, batch_correct, batch = self._eval_batch(features, batch_labels)
            loss_sum, correct, count = loss_sum + float(batch_loss), correct + int(batch_correct), count + int(batch)
        metrics = {f"{prefix}/loss": loss_sum / max(count, 1), f"{prefix}/accuracy": correct / max(count, 1)}
        step = int(self.global_step.numpy())
        for hook in self.hooks:
            hook.after_eval(self, step, prefix, metrics)
        return metrics

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batches = [self._predict_batch(f) for f in eval_input_fn(images, None, self.cfg.data.eval_batch_size)]
        return {key: np.concatenate([b[key].numpy() for b in batches]) for key in ("classes", "probabilities")}

    def _read_and_reset_train_metrics(self, elapsed: float, steps_done: int) -> dict[str, float]:
        seen = int(self._seen.numpy())
        batches = seen / self.cfg.data.batch_size
        logs = {"train/loss": float(self._loss_sum.numpy()) / max(batches, 1),
                "train/accuracy": int(self._correct.numpy()) / max(seen, 1),
                "global_step_per_sec": steps_done / elapsed if elapsed > 0 else float("nan")}
        for variable in (self._loss_sum, self._correct, self._seen):
            variable.assign(tf.zeros_like(variable))
        return logs

    def train(self) -> dict[str, float]:
        """Train to `steps`, evaluating and checkpointing on the way; return the last metrics."""
        t = self.cfg.trainer
        metrics: dict[str, float] = {}
        error: BaseException | None = None
        for hook in self.hooks:
            hook.begin(self)
        try:
            step = self.start_step
            iterator = iter(train_input_fn(self.splits.train_images, self.splits.train_labels,
                                           self.cfg.data.batch_size, t.seed, self.cfg.data.shuffle_buffer,
                                           start_step=step))
            tick, tick_step = time.perf_counter(), step
            while step < self.steps and self._stop_reason is None:
                next_boundary = min(self.steps, _next_multiple(step, t.log_every),
                                    _next_multiple(step, t.eval_every), _next_multiple(step, t.checkpoint_every))
                self._train_chunk(iterator, tf.constant(next_boundary - step, tf.int64))
                step = next_boundary
                at_end = step == self.steps
                if step % t.log_every == 0 or at_end:
                    now = time.perf_counter()
                    logs = self._read_and_reset_train_metrics(now - tick, step - tick_step)
                    if not math.isfinite(logs["train/loss"]):
                        raise NonFiniteLossError(
                            f"the training loss became {logs['train/loss']} by step {step}; lower "
                            "optimizer.learning_rate (the last finite checkpoint is kept in model_dir)")
                    for hook in self.hooks:
                        hook.after_log(self, step, logs)
                    tick, tick_step = time.perf_counter(), step
                if step % t.eval_every == 0 or at_end:
                    metrics.update(self.evaluate("validation"))
                if step % t.checkpoint_every == 0 or at_end:
                    self.save()
            if self._stop_reason is not None:
                log.info("stopped at step %d: %s", step, self._stop_reason)
            else:
                if "val/accuracy" not in metrics:  # resumed a run that had already finished
                    metrics.update(self.evaluate("validation"))
                if t.evaluate_test:
                    metrics.update(self.evaluate("test"))
            return metrics
        except BaseException as exc:
            error = exc
            raise
        finally:
            for hook in self.hooks:
                hook.end(self, error)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every
