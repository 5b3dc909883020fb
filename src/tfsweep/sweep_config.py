"""The sweep's typed schema, its Hydra composition, and the checks run before any trial starts.

A sweep definition is a yaml file in `sweeps/` (`# @package _global_`): it sets the `sweep:` node (search
space, sampler, pruner, budget, storage) and may adjust the training config every trial starts from
(`trainer.steps`, ...). The composed config is the whole training config plus `sweep`, so one command
line overrides both: `python src/sweep.py sweeps=quick sweep.n_trials=4 trainer.steps=300`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from tfsweep.config import CONFIG_DIR, Config, register_configs, validate
from tfsweep.errors import ConfigError

PROJECT_DIR = CONFIG_DIR.parent
SWEEPS_DIR = PROJECT_DIR / "sweeps"
PARAM_TYPES = ("float", "int", "categorical")
_ABSENT = object()


@dataclass
class ParamSpec:
    """One searched value. The name is a training config key (`model.dropout`) or a config group
    (`optimizer`, whose choices are option names such as `adam`)."""

    type: str = MISSING  # float | int | categorical
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False  # sample on a log scale (float and int)
    step: Optional[float] = None  # a grid step (float and int)
    choices: Optional[list[Any]] = None  # categorical only


@dataclass
class NamedSpec:
    """An Optuna sampler or pruner by name; the settings of each name sit under that name."""

    name: str = MISSING
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SweepConfig:
    study_name: str = MISSING
    dir: str = MISSING  # trial folders (checkpoints) and the default journal storage
    storage: str = MISSING  # a journal file path, or a database URL such as postgresql://...
    n_trials: int = MISSING  # finished trials (complete + pruned + failed) the study should reach
    timeout: Optional[float] = None  # seconds this command may run; the study can be resumed later
    n_workers: int = MISSING  # worker processes started by this command
    metric: str = MISSING  # a validation metric returned by training, e.g. val/accuracy
    direction: str = MISSING  # maximize | minimize
    sampler: NamedSpec = field(default_factory=NamedSpec)
    seed: Optional[int] = MISSING  # the sampler's seed (None: random)
    pruner: NamedSpec = field(default_factory=NamedSpec)
    max_retry: int = MISSING  # how often a trial interrupted by a dead worker is retried
    heartbeat_seconds: int = MISSING  # database storage only: a worker silent 2x this long is dead
    params: dict[str, ParamSpec] = field(default_factory=dict)


@dataclass
class SweepRootConfig(Config):
    """The composed sweep config: the whole training config plus the `sweep` node."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_sweep_configs() -> None:
    """Register the training schemas, the sweep schema and the primary `sweep` config.

    The primary config is stored here rather than in a yaml file because it has to put the project
    folder (an absolute path) on Hydra's search path so that `sweeps/` becomes a config group.
    """
    register_configs()
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepRootConfig)
    cs.store(name="sweep", node={
        "defaults": ["train", "sweep_schema", {"sweeps": "default"}, "_self_"],
        "hydra": {
            "searchpath": [f"file://{PROJECT_DIR}"],
            "run": {"dir": "${paths.root_dir}/outputs/sweep/${sweep.study_name}/${now:%Y-%m-%d_%H-%M-%S}"},
            "job": {"chdir": False},
        },
    })


def compose_sweep(overrides: list[str] = ()) -> DictConfig:
    """Compose the sweep config as `python src/sweep.py <overrides>` would (for tests and benchmarks)."""
    register_sweep_configs()
    if GlobalHydra.instance().is_initialized():
        return compose("sweep", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("sweep", overrides=list(overrides))


def training_part(cfg: DictConfig) -> DictConfig:
    """The training config inside a sweep config, unresolved (each trial sets its own output folder)."""
    train = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "sweep"})
    OmegaConf.set_struct(train, True)
    return train


def group_option(group: str, option: str) -> dict[str, Any]:
    """The node a config group option composes to, e.g. ("optimizer", "adam") -> {"_target_": ...}."""
    overrides = [f"{group}={option}", "paths.output_dir=."]
    register_configs()
    if GlobalHydra.instance().is_initialized():
        node = compose("train", overrides=overrides)[group]
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            node = compose("train", overrides=overrides)[group]
    return OmegaConf.to_container(node, resolve=False)


def is_group(name: str) -> bool:
    return "." not in name and (CONFIG_DIR / name).is_dir()


def trial_config(train: DictConfig, params: dict[str, Any], options: dict[str, dict[str, dict]],
                 output_dir: str) -> DictConfig:
    """The training config of one trial: `train` with the trial's values applied as overrides.

    A group parameter (`optimizer: adam`) swaps in that option's composed node first; then each value
    parameter is set on the schema-checked config, so a key that does not exist fails here.
    """
    cfg = train.copy()
    for name, value in params.items():
        if is_group(name):
            with open_dict(cfg):
                cfg[name] = options[name][str(value)]
    for name, value in params.items():
        if not is_group(name):
            OmegaConf.update(cfg, name, value, merge=False)
    OmegaConf.update(cfg, "paths.output_dir", output_dir)
    OmegaConf.update(cfg, "trainer.evaluate_test", False)  # trials never look at the test split
    return cfg


def check(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, dict[str, dict]]]:
    """Check the sweep settings and search space; return the resolved `sweep` node and the group options.

    Raise ConfigError with one sentence naming the key before anything is written.
    """
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    if not sweep["metric"].startswith("val/"):
        raise ConfigError(f"sweep.metric={sweep['metric']!r} is invalid: the objective must be a validation "
                          "metric such as val/accuracy (the test split is kept for the best trial)")
    if sweep["direction"] not in ("maximize", "minimize"):
        raise ConfigError(f"sweep.direction={sweep['direction']!r} is invalid: choose maximize or minimize")
    for key in ("n_trials", "n_workers", "heartbeat_seconds"):
        if sweep[key] < 1:
            raise ConfigError(f"sweep.{key}={sweep[key]} is invalid: it must be a positive integer")
    if sweep["timeout"] is not None and sweep["timeout"] <= 0:
        raise ConfigError(f"sweep.timeout={sweep['timeout']} is invalid: give seconds > 0, or null for no limit")
    if sweep["max_retry"] < 0:
        raise ConfigError(f"sweep.max_retry={sweep['max_retry']} is invalid: it must be zero or more")
    if not sweep["params"]:
        raise ConfigError("sweep.params is empty: give at least one training config key to search")

    train = training_part(cfg)
    options: dict[str, dict[str, dict]] = {}
    for name, spec in sweep["params"].items():
        where = f"sweep.params.{name}"
        if spec["type"] not in PARAM_TYPES:
            raise ConfigError(f"{where}.type={spec['type']!r} is invalid: choose one of {', '.join(PARAM_TYPES)}")
        if is_group(name):
            if spec["type"] != "categorical":
                raise ConfigError(f"{where} is the config group {name}: make it categorical with option "
                                  f"names as choices")
            known = sorted(p.stem for p in (CONFIG_DIR / name).glob("*.yaml"))
            unknown = [c for c in spec["choices"] or [] if str(c) not in known]
            if unknown:
                raise ConfigError(f"{where} has unknown options {unknown}: choose from {', '.join(known)}")
            options[name] = {str(c): group_option(name, str(c)) for c in spec["choices"]}
        elif OmegaConf.select(train, name, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
            raise ConfigError(f"{where} names no training config key or group: check the spelling against "
                              "`python src/train.py --cfg job`")
        if spec["type"] == "categorical":
            if not spec["choices"]:
                raise ConfigError(f"{where}.choices is empty: list at least one value")
        else:
            low, high = spec["low"], spec["high"]
            if low is None or high is None:
                raise ConfigError(f"{where} needs both low and high for a {spec['type']} range")
            if not low < high:
                raise ConfigError(f"{where} has an empty or inverted range [{low}, {high}]: make low < high")
            if spec["log"] and low <= 0:
                raise ConfigError(f"{where} is log-scaled but low={low}: a log range needs low > 0")
            if spec["log"] and spec["step"] is not None:
                raise ConfigError(f"{where} sets both log and step: Optuna supports one or the other")
    # Every corner of the space must also pass the training config's own range checks.
    for corner in ("low", "high"):
        params = {}
        for name, spec in sweep["params"].items():
            if spec["type"] == "categorical":
                params[name] = spec["choices"][0 if corner == "low" else -1]
            else:
                params[name] = int(spec[corner]) if spec["type"] == "int" else float(spec[corner])
        try:
            validate(trial_config(train, params, options, "."))
        except ConfigError as exc:
            raise ConfigError(f"sweep.params reaches an invalid training config at its {corner} end: {exc}") from exc
    return sweep, options
