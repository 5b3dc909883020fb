"""`train(cfg)`: one training run from a composed config. The entry point and the sweep both call it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tfsweep.config import validate
from tfsweep.crashpoints import crashpoint
from tfsweep.data import SPLIT_FILES, Splits, load_splits
from tfsweep.errors import UserError
from tfsweep.hooks import Hook, LoggingHook, ProbabilitiesHook, ProgressBarHook
from tfsweep.trainer import Trainer, finished_metrics, record_finished

log = logging.getLogger(__name__)

_loaded: dict[str, tuple[tuple, Splits]] = {}  # the last data set this process read, by its config
BATCHING_KEYS = ("batch_size", "eval_batch_size", "shuffle_buffer")  # how the splits are fed, not what they hold


def cached_splits(data: DictConfig) -> Splits:
    """`load_splits`, reused by the next run of this process while the files are unchanged on disk.

    A sweep's trials all read the same data, whatever their batch sizes; reading and verifying MNIST
    costs 0.2-0.5 s a trial. A changed, replaced or missing file (size or modification time) is read and
    verified again.
    """
    settings = OmegaConf.to_container(data, resolve=True)
    key = json.dumps({k: v for k, v in settings.items() if k not in BATCHING_KEYS}, sort_keys=True)
    root = Path(data.root).expanduser()
    files = [root / data[split].name for split in SPLIT_FILES]
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None for p in files)
    if key in _loaded and None not in stamp and _loaded[key][0] == stamp:
        return _loaded[key][1]
    splits = load_splits(data)
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in files)  # as verified (maybe just fetched)
    _loaded.clear()
    _loaded[key] = (stamp, splits)
    return splits


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
        from tfsweep.tracking_store import connect

        client = connect(cfg.tracking.uri)
    splits = cached_splits(cfg.data)

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
    trainer = Trainer(cfg, cached_splits(cfg.data))
    if trainer.start_step == 0:
        raise UserError(f"trainer.model_dir={cfg.trainer.model_dir} holds no checkpoint to evaluate")
    return trainer


def evaluate_checkpoint(cfg: DictConfig, split: str = "test") -> dict[str, float]:
    return restore_checkpoint(cfg).evaluate(split)
