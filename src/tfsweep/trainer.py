"""An Estimator-style trainer: model function + input functions + `model_dir` + hooks.

The loop runs its steps in compiled chunks (one `tf.function` call per logging interval), so Python
runs once per `log_every` steps rather than once per step; the training metrics are Keras metrics
updated on the graph side and read only at chunk ends.

A checkpoint holds everything the next step depends on: weights, optimizer slots and iterations, the
global step, the dropout layers' random-generator state and the running training metrics. The data
position is the global step (the input function skips to it), so a run killed anywhere and resumed
computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tfsweep.crashpoints import crashpoint
from tfsweep.data import METRIC_PREFIXES, Splits
from tfsweep.errors import ConfigError, NonFiniteLossError, UserError, first_line
from tfsweep.hooks import Hook, chunk_ends, running
from tfsweep.inputs import eval_input_fn, train_input_fn
from tfsweep.model import Mode, build_network, model_fn, usable_precision
from tfsweep.processes import write_atomically

log = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"  # in model_dir, written last: a finished run's settings and metrics


class Trainer:
    """Trains `cfg.model` on `splits` for `cfg.trainer.steps` global steps, resuming from `model_dir`."""

    def __init__(self, cfg: DictConfig, splits: Splits, hooks: list[Hook] = ()) -> None:
        self.cfg, self.splits, self.hooks = cfg, splits, list(hooks)
        self.steps = cfg.trainer.steps
        self.model_dir = Path(cfg.trainer.model_dir)
        check_batch_size(cfg, splits)
        keras.utils.set_random_seed(cfg.trainer.seed)  # initial weights and dropout masks
        self.network = build_network(cfg.model, usable_precision(cfg.trainer.precision))
        # The schedule reads the optimizer's iteration count, which the checkpoint holds: a resumed run
        # continues the schedule where it stopped.
        self.optimizer = instantiate(cfg.optimizer, _partial_=True)(learning_rate=instantiate(cfg.schedule))
        self.optimizer.build(self.network.trainable_variables)  # so a checkpoint can restore its slots
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.train_loss = keras.metrics.Mean(name="train/loss")
        self.train_accuracy = keras.metrics.SparseCategoricalAccuracy(name="train/accuracy")
        self.eval_loss = keras.metrics.Mean(name="loss")
        self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        # Keras 3 checkpoints a model's weights only. The dropout layers' SeedGenerator states pick the
        # next dropout masks: without them a resumed run draws the masks of step 0 again.
        seed_states = [v for v in self.network.variables if not any(v is w for w in self.network.weights)]
        self.checkpoint = tf.train.Checkpoint(
            network=self.network, optimizer=self.optimizer, global_step=self.global_step,
            dropout_seeds=seed_states, train_metrics=self.train_loss.variables + self.train_accuracy.variables)
        self.manager = tf.train.CheckpointManager(self.checkpoint, str(self.model_dir),
                                                  max_to_keep=cfg.trainer.keep_checkpoints,
                                                  step_counter=self.global_step)
        self._keep_probabilities = bool(cfg.trainer.log_probabilities)
        self._probabilities = tf.Variable(tf.zeros([0, cfg.model.num_classes]), trainable=False,
                                          shape=tf.TensorShape([None, cfg.model.num_classes]))
        self.stop_reason: str | None = None  # set by `request_stop`
        self._eval_data: dict[str, tf.data.Dataset] = {}
        self.start_step = self._restore()

    # -- model_dir ---------------------------------------------------------------------------------
    def _restore(self) -> int:
        latest = self.manager.latest_checkpoint
        if latest is None:
            return 0
        try:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as exc:
            # TensorFlow's message names the variable and both shapes.
            raise UserError(f"trainer.model_dir={self.model_dir} holds a checkpoint of another network or "
                            f"optimizer ({first_line(exc, 300)}); use a new trainer.model_dir for these "
                            "settings") from exc
        step = int(self.global_step.numpy())
        log.info("restored %s: resuming at global step %d", latest, step)
        return step

    @property
    def last_checkpoint_step(self) -> int | None:
        latest = self.manager.latest_checkpoint
        return None if latest is None else int(latest.rsplit("-", 1)[1])

    def save(self) -> str:
        """Checkpoint the current step; a network that is no longer finite is never saved."""
        if not bool(self._weights_are_finite()):
            raise self._diverged("the weights", "not finite")
        for hook in self.hooks:
            hook.before_checkpoint(self, int(self.global_step.numpy()))
        path = self.manager.save(checkpoint_number=self.global_step)
        crashpoint("trainer.mid_checkpoint")
        for hook in self.hooks:
            hook.after_checkpoint(self, int(self.global_step.numpy()), path)
        crashpoint("trainer.after_checkpoint")
        return path

    def _diverged(self, what: str, value: object) -> NonFiniteLossError:
        kept = self.last_checkpoint_step
        where = (f"the last finite checkpoint, step {kept}, stays in trainer.model_dir={self.model_dir}"
                 if kept is not None else "no checkpoint was saved before it")
        return NonFiniteLossError(f"{what} became {value} by step {int(self.global_step.numpy())}; lower "
                                  f"optimizer.learning_rate ({where})")

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
            self.train_loss.update_state(spec.loss)
            self.train_accuracy.update_state(labels, spec.predictions["probabilities"])
            if self._keep_probabilities:
                self._probabilities.assign(spec.predictions["probabilities"])

    @tf.function
    def _weights_are_finite(self):
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in self.network.trainable_variables])

    @tf.function(reduce_retracing=True)
    def _eval_batch(self, features, labels):
        spec = model_fn(self.network, features, labels, Mode.EVAL)
        self.eval_loss.update_state(spec.loss, sample_weight=tf.shape(labels)[0])  # a mean over examples
        self.eval_accuracy.update_state(labels, spec.predictions["probabilities"])

    @tf.function(reduce_retracing=True)
    def _predict_batch(self, features):
        return model_fn(self.network, features, None, Mode.PREDICT).predictions

    # -- public API --------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Stop after the current chunk, like a hook's `run_context.request_stop()`."""
        self.stop_reason = reason

    def last_probabilities(self) -> np.ndarray:
        return self._probabilities.numpy()

    def evaluate(self, split: str) -> dict[str, float]:
        """Mean loss and accuracy over a whole split (`validation` or `test`), dropout off."""
        prefix = METRIC_PREFIXES[split]
        images, labels = getattr(self.splits, f"{split}_images"), getattr(self.splits, f"{split}_labels")
        step = int(self.global_step.numpy())
        for hook in self.hooks:
            hook.before_eval(self, step, prefix)
        for metric in (self.eval_loss, self.eval_accuracy):
            metric.reset_state()
        if split not in self._eval_data:  # one pipeline per split, iterated again at each evaluation
            self._eval_data[split] = eval_input_fn(images, labels, self.cfg.data.eval_batch_size)
        for features, batch_labels in self._eval_data[split]:
            self._eval_batch(features, batch_labels)
        metrics = {f"{prefix}/{m.name}": float(m.result()) for m in (self.eval_loss, self.eval_accuracy)}
        for hook in self.hooks:
            hook.after_eval(self, step, prefix, metrics)
        return metrics

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batches = [self._predict_batch(f) for f in eval_input_fn(images, None, self.cfg.data.eval_batch_size)]
        return {key: np.concatenate([b[key].numpy() for b in batches]) for key in ("classes", "probabilities")}

    def _read_and_reset_train_metrics(self, elapsed: float, steps_done: int) -> dict[str, float]:
        logs = {m.name: float(m.result()) for m in (self.train_loss, self.train_accuracy)}
        logs["global_step_per_sec"] = steps_done / elapsed if elapsed > 0 else float("nan")
        for metric in (self.train_loss, self.train_accuracy):
            metric.reset_state()
        return logs

    def train(self) -> dict[str, float]:
        """Train to `steps`, evaluating and checkpointing on the way; return the last metrics."""
        t = self.cfg.trainer
        metrics: dict[str, float] = {}
        with running(self):
            step = self.start_step
            iterator = iter(train_input_fn(self.splits.train_images, self.splits.train_labels,
                                           self.cfg.data.batch_size, t.seed, self.cfg.data.shuffle_buffer,
                                           start_step=step))
            tick, tick_step = time.perf_counter(), step
            for chunk_end in chunk_ends(step, t):
                if self.stop_reason is not None:
                    break
                self._train_chunk(iterator, tf.constant(chunk_end - step, tf.int64))
                step = chunk_end
                # Every chunk, not only at log points: no evaluation or checkpoint of a diverged network.
                loss = float(self.train_loss.result())
                if not np.isfinite(loss):
                    raise self._diverged("the training loss", loss)
                at_end = step == self.steps
                if step % t.log_every == 0 or at_end:
                    now = time.perf_counter()
                    logs = self._read_and_reset_train_metrics(now - tick, step - tick_step)
                    for hook in self.hooks:
                        hook.after_log(self, step, logs)
                    tick, tick_step = time.perf_counter(), step
                crashpoint("trainer.mid_training")
                if step % t.eval_every == 0 or at_end:
                    metrics.update(self.evaluate("validation"))
                if step % t.checkpoint_every == 0 or at_end:
                    self.save()
            if self.stop_reason is not None:
                log.info("stopped at step %d: %s", step, self.stop_reason)
            else:
                if "val/accuracy" not in metrics:  # resumed a run whose last checkpoint is at `steps`
                    metrics.update(self.evaluate("validation"))
                if t.evaluate_test:
                    metrics.update(self.evaluate("test"))
            return metrics


def check_batch_size(cfg: DictConfig, splits: Splits) -> None:
    """A training batch must fit in the training split (batches never wrap around an epoch)."""
    available = len(splits.train_images)
    if cfg.data.batch_size > available:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                          f"({available} images after data.validation_size={cfg.data.validation_size}); "
                          f"use at most {available}")


def _settings(cfg: DictConfig) -> dict:
    """What decides a run's result: the resolved config without where it is written or shown."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    del settings["paths"], settings["trainer"]["model_dir"], settings["trainer"]["progress_bar"]
    del settings["tracking"]["uri"]  # may carry a password; the store is not a setting of the run
    return json.loads(json.dumps(settings))  # the form it takes in the record


def finished_metrics(cfg: DictConfig) -> dict[str, float] | None:
    """The metrics of the run in `trainer.model_dir` if it reached `trainer.steps` with these settings."""
    path = Path(cfg.trainer.model_dir) / FINISHED_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["metrics"] if record["settings"] == _settings(cfg) else None


def record_finished(cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Record, atomically and last of all, that the run in `trainer.model_dir` finished with `metrics`."""
    write_atomically(Path(cfg.trainer.model_dir) / FINISHED_FILE,
                     json.dumps({"settings": _settings(cfg), "metrics": metrics}, indent=1))
