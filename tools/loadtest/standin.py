"""The load test's stand-in for training: `tfsweep.training.train`'s signature and hooks, no TensorFlow.

`stand_in_train` drives the real hooks (the MlflowHook, the PruningHook, ...) through a `StandInTrainer`
that takes milliseconds instead of minutes and writes checkpoint files the size of the real network's.
`install_stand_in` puts it in place of `tfsweep.training`, the one module through which the sweep reaches
training, so a worker never imports TensorFlow (64 of them would not fit in a small machine).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tfsweep.hooks import Hook, LoggingHook, chunk_ends, running

log = logging.getLogger(__name__)


def checkpoint_bytes(cfg: DictConfig) -> int:
    """The size of a real checkpoint of `cfg`'s network: float32 weights plus the optimizer's slots."""
    from tfsweep.config import feature_map_size
    from tfsweep.data import IMAGE_SIZE

    model = cfg.model
    kernel, (first, second) = model.kernel_size, model.filters[:2]
    side = feature_map_size(model, IMAGE_SIZE)
    weights = (kernel * kernel * first + first + kernel * kernel * first * second + second
               + side * side * second * model.dense_units + model.dense_units
               + model.dense_units * model.num_classes + model.num_classes)
    target = str(cfg.optimizer.get("_target_", "")).lower()  # Adam keeps 2 slots per weight, momentum 1
    slots = 2 if "adam" in target else 1 if float(cfg.optimizer.get("momentum", 0) or 0) > 0 else 0
    return 4 * weights * (1 + slots)


class StandInCheckpoints:
    """What hooks read of `tf.train.CheckpointManager`: `checkpoints`, `latest_checkpoint`, `directory`.

    Files are named and indexed as TensorFlow names them (`ckpt-200.index`, `ckpt-200.data-00000-of-00001`,
    `checkpoint`) and the data file has the real size; it is sparse, so writing it costs no disk time.
    """

    def __init__(self, directory: Path, keep: int, size: int) -> None:
        self.directory, self.keep, self.size = str(directory), keep, size
        self.checkpoints: list[str] = []

    @property
    def latest_checkpoint(self) -> str | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def save(self, checkpoint_number: int) -> str:
        prefix = str(Path(self.directory) / f"ckpt-{checkpoint_number}")
        Path(prefix + ".index").write_bytes(os.urandom(256))
        with open(prefix + ".data-00000-of-00001", "wb") as data:
            data.write(os.urandom(4096))
            data.truncate(self.size)
        self.checkpoints.append(prefix)
        for old in self.checkpoints[:-self.keep]:
            for path in Path(old).parent.glob(Path(old).name + ".*"):
                path.unlink()
        self.checkpoints = self.checkpoints[-self.keep:]
        names = [Path(p).name for p in self.checkpoints]
        (Path(self.directory) / "checkpoint").write_text(
            f'model_checkpoint_path: "{names[-1]}"\n' + "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in names))
        return prefix


def synthetic_accuracy(cfg: DictConfig, step: int) -> float:
    """A validation curve that rises with the steps and depends on the trial's values, so TPE has something
    to learn and the median pruner stops some trials, as in a real sweep."""
    learning_rate = OmegaConf.select(cfg, "optimizer.learning_rate", default=1e-3)
    learning_rate = float(learning_rate) if isinstance(learning_rate, (int, float)) else 1e-3  # or a schedule
    ceiling = 0.99 - 0.08 * abs(math.log10(learning_rate) + 2.5) - 0.05 * float(cfg.model.dropout)
    return max(0.1, ceiling * (1 - math.exp(-4 * step / cfg.trainer.steps)))


class StandInTrainer:
    """Satisfies `tfsweep.hooks.Trainer` and calls the hooks at the steps the real Trainer calls them.

    `train_seconds` of sleep stand in for all the training chunks together.
    """

    def __init__(self, cfg: DictConfig, hooks: list[Hook], train_seconds: float, checkpoint_size: int) -> None:
        self.cfg, self.hooks, self.train_seconds = cfg, list(hooks), train_seconds
        self.steps, self.start_step = cfg.trainer.steps, 0
        self.model_dir = Path(cfg.trainer.model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.splits = self.network = None
        self.manager = StandInCheckpoints(self.model_dir, cfg.trainer.keep_checkpoints, checkpoint_size)
        self.stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    def last_probabilities(self):
        return np.full((1, self.cfg.model.num_classes), 1 / self.cfg.model.num_classes)

    def predict(self, images):
        raise NotImplementedError("the load test's stand-in has no network")

    def train(self) -> dict[str, float]:
        t, metrics = self.cfg.trainer, {}
        boundaries = chunk_ends(0, t)
        with running(self):
            for step in boundaries:
                if self.stop_reason is not None:
                    break
                time.sleep(self.train_seconds / len(boundaries))
                at_end, accuracy = step == self.steps, synthetic_accuracy(self.cfg, step)
                if step % t.log_every == 0 or at_end:
                    for hook in self.hooks:
                        hook.after_log(self, step, {"train/loss": 1 - accuracy, "train/accuracy": accuracy,
                                                    "global_step_per_sec": 1e4})
                if step % t.eval_every == 0 or at_end:
                    evaluation = {"val/loss": 1 - accuracy, "val/accuracy": accuracy}
                    for hook in self.hooks:
                        hook.before_eval(self, step, "val")
                    for hook in self.hooks:
                        hook.after_eval(self, step, "val", evaluation)
                    metrics.update(evaluation)
                if step % t.checkpoint_every == 0 or at_end:
                    for hook in self.hooks:
                        hook.before_checkpoint(self, step)
                    path = self.manager.save(step)
                    for hook in self.hooks:
                        hook.after_checkpoint(self, step, path)
            return metrics


STAND_IN = {"train_seconds": 0.005, "checkpoint_size": None}  # set in each worker by `install_stand_in`


def stand_in_train(cfg: DictConfig, hooks=(), parent_run_id: str | None = None,
                   run_tags: dict[str, str] | None = None) -> dict[str, float]:
    """`tfsweep.training.train` without TensorFlow: the same checks, tracking client and hooks."""
    from tfsweep import tracking, tracking_store
    from tfsweep.config import validate

    validate(cfg)
    all_hooks = [LoggingHook()]
    if cfg.tracking.enabled:
        client = tracking_store.connect(cfg.tracking.uri)
        all_hooks.append(tracking.MlflowHook(cfg, client, parent_run_id=parent_run_id, tags=run_tags))
    all_hooks.extend(hooks)
    size = STAND_IN["checkpoint_size"] or checkpoint_bytes(cfg)
    try:
        return StandInTrainer(cfg, all_hooks, STAND_IN["train_seconds"], size).train()
    except Exception:  # the sweep records one line of it; a load test wants to know where it came from
        log.exception("trial in %s failed", cfg.paths.output_dir)
        raise


def install_stand_in(train_seconds: float = 0.005, checkpoint_size: int | None = None) -> None:
    """Make `tfsweep.training` the stand-in in this process; call before anything imports `tfsweep.sweep`.

    `tfsweep.sweep_trial` and `tfsweep.sweep_results` import `train` and `evaluate_checkpoint` from
    `tfsweep.training` when they load, and that module imports TensorFlow.
    """
    if "tfsweep.training" in sys.modules and not getattr(sys.modules["tfsweep.training"], "STAND_IN", False):
        raise RuntimeError("tfsweep.training is already imported: install the stand-in first")
    STAND_IN.update(train_seconds=train_seconds, checkpoint_size=checkpoint_size)
    module = types.ModuleType("tfsweep.training", "The load test's stand-in for training (no TensorFlow).")
    module.STAND_IN = True
    module.train = stand_in_train
    module.evaluate_checkpoint = lambda cfg, split="test": {f"{split}/loss": 0.0, f"{split}/accuracy": 0.0}
    sys.modules["tfsweep.training"] = module
