"""`train(cfg)`: one training run from a composed config. The entry point and the sweep both call it."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from tfsweep.config import validate
from tfsweep.crashpoints import crashpoint
from tfsweep.data import load_splits
from tfsweep.errors import UserError
from tfsweep.hooks import Hook, LoggingHook, ProbabilitiesHook, ProgressBarHook
from tfsweep.trainer import Trainer, finished_metrics, record_finished

log = logging.getLogger(__name__)


def train(cfg: DictConfig, hooks: list[Hook] = (), parent_run_id: str | None = None,
          run_tags: dict[str, str] | None = None) -> dict[str, float]:
    """Train, evaluate and checkpoint as `cfg` says; return the final metrics (`val/accuracy`, ...).

    `hooks` run after the built-in ones; `parent_run_id` nests the MLflow run under another one.
    Everything that can be checked is checked before anything is written. A `model_dir` whose run
    already finished with the same settings is left as it is, and its recorded metrics are returned.
    """
    validate(cfg)
    finished = finished_metrics(cfg)
    if finished is not None:
        log.info("trainer.model_dir=%s already holds this run, finished at step %d; nothing to do (use a new "
                 "trainer.model_dir to train again)", cfg.trainer.model_dir, cfg.trainer.steps)
        return finished
    client = None
    if cfg.tracking.enabled:
        from tfsweep.tracking import connect

        client = connect(cfg.tracking.uri)
    splits = load_splits(cfg.data)

    all_hooks: list[Hook] = [LoggingHook()]
    if cfg.trainer.progress_bar:
        all_hooks.append(ProgressBarHook())
    if cfg.trainer.log_probabilities:
        all_hooks.append(ProbabilitiesHook())
    if client is not None:
        from tfsweep.tracking import MlflowHook

        all_hooks.append(MlflowHook(cfg, client, parent_run_id=parent_run_id, tags=run_tags))
    all_hooks.extend(hooks)
    trainer = Trainer(cfg, splits, all_hooks)
    metrics = trainer.train()
    if trainer.stop_reason is None:
        crashpoint("trainer.before_finished_record")
        record_finished(cfg, metrics)
    return metrics


def restore_checkpoint(cfg: DictConfig) -> Trainer:
    """A trainer holding the latest checkpoint of `cfg.trainer.model_dir` (to evaluate it or log its model)."""
    validate(cfg)
    trainer = Trainer(cfg, load_splits(cfg.data))
    if trainer.start_step == 0:
        raise UserError(f"trainer.model_dir={cfg.trainer.model_dir} holds no checkpoint to evaluate")
    return trainer


def evaluate_checkpoint(cfg: DictConfig, split: str = "test") -> dict[str, float]:
    """Restore the latest checkpoint of `cfg.trainer.model_dir` and evaluate it on `split`."""
    return restore_checkpoint(cfg).evaluate(split)
