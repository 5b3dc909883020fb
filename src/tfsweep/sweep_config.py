"""The sweep's typed schema, its Hydra composition, each trial's config, and the checks run before any trial.

A sweep definition is a yaml file in `sweeps/` (`# @package _global_`): it sets the `sweep:` node (search
space, budget, storage), picks a sampler and a pruner from `sweeps/sampler/` and `sweeps/pruner/`, and may
adjust the training config every trial starts from (`trainer.steps`, ...). One command line overrides all
of it: `python src/sweep.py sweeps=quick sweeps/pruner=hyperband sweep.n_trials=4 trainer.steps=300`.

A trial's config is that same command line plus the trial's values as overrides (`optimizer=adam
model.dropout=0.31`), composed by Hydra: config groups and values share the command line's grammar and
schema, so a searched key that does not exist fails like a typo on the command line.
"""

from __future__ import annotations

import copy
import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from tfsweep.config import CONFIG_DIR, Config, compose_config, register_configs, require, validate
from tfsweep.errors import ConfigError, first_line
from tfsweep.storage_proxy import address

PROJECT_DIR = CONFIG_DIR.parent


class ParamType(enum.Enum):
    float = "float"
    int = "int"
    categorical = "categorical"


class Direction(enum.Enum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class ParamSpec:
    """One searched value. The name is a training config key (`model.dropout`) or a config group
    (`optimizer`, whose choices are option names such as `adam`)."""

    type: ParamType = MISSING
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False  # sample on a log scale (float and int)
    step: Optional[float] = None  # a grid step (float and int)
    choices: Optional[list[Any]] = None  # categorical only


@dataclass
class SweepConfig:
    study_name: str = MISSING
    dir: str = MISSING  # trial folders (checkpoints), best_trial.yaml and the default journal storage
    storage: str = MISSING  # a journal file path, or a database URL such as postgresql://...
    storage_proxy: Optional[str] = None  # host:port of Optuna's gRPC proxy before that database
    n_trials: int = MISSING  # finished trials (complete + pruned + failed) the study should reach
    timeout: Optional[float] = None  # seconds this command may run; the study can be resumed later
    n_workers: int = MISSING  # worker processes started by this command
    metric: str = MISSING  # a validation metric returned by training, e.g. val/accuracy
    direction: Direction = MISSING
    seed: Optional[int] = MISSING  # the sampler's seed (None: random)
    sampler: Any = MISSING  # an Optuna sampler for hydra.utils.instantiate: sweeps/sampler/*.yaml
    pruner: Any = MISSING  # an Optuna pruner, likewise: sweeps/pruner/*.yaml
    max_retry: int = MISSING  # how often a trial interrupted by a dead worker is retried
    heartbeat_seconds: int = MISSING  # database storage only: a worker silent 2x this long is dead
    params: dict[str, ParamSpec] = field(default_factory=dict)


@dataclass
class SweepContext:
    """Everything a worker needs, picklable for the spawned worker processes."""

    sweep: SweepConfig
    overrides: list[str]  # the command line; a trial's config is composed from it plus the trial's values
    experiment: str  # MLflow experiment of the parent and its children
    tracking_uri: str | None  # None when tracking is off
    parent_run_id: str | None = None

    def client(self):
        from tfsweep.tracking_store import connect

        return None if self.tracking_uri is None else connect(self.tracking_uri)


@dataclass
class SweepRootConfig(Config):
    """The composed sweep config: the whole training config plus the `sweep` node.

    This schema is merged after the training config, so groups whose options extend their schema
    (`adam_optimizer_schema`, `cosine_schedule_schema`) are left untyped here: typing them with the base
    schema again would drop the option's own keys from its type, and `validate` would call them unknown.
    """

    optimizer: Any = MISSING
    schedule: Any = MISSING
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
        # The sweep definition comes after the sampler and pruner so that it can tune their settings.
        "defaults": ["train", "sweep_schema", {"sweeps/sampler": "tpe"}, {"sweeps/pruner": "median"},
                     {"sweeps": "default"}, "_self_"],
        "hydra": {
            "searchpath": [f"file://{PROJECT_DIR}"],
            "run": {"dir": "${paths.root_dir}/outputs/sweep/${sweep.study_name}/${now:%Y-%m-%d_%H-%M-%S}"},
            "job": {"chdir": False},
        },
    })


def compose_sweep(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the sweep config as `python src/sweep.py <overrides>` would (for tests and benchmarks).

    The overrides are kept under `hydra.overrides.task`, where Hydra's own `return_hydra_config` puts
    them, because every trial's config is composed from them again.
    """
    register_sweep_configs()
    cfg = compose_config("sweep", list(overrides))
    with open_dict(cfg):
        cfg.hydra = {"overrides": {"task": list(overrides)}}
    return cfg


def command_overrides(cfg: DictConfig) -> list[str]:
    """The command line `cfg` was composed from: inside `src/sweep.py` Hydra knows it, else compose_sweep."""
    if "hydra" in cfg:
        return list(cfg.hydra.overrides.task)
    return list(HydraConfig.get().overrides.task)


def training_part(cfg: DictConfig) -> DictConfig:
    """The training config inside a sweep config."""
    container = OmegaConf.to_container(cfg, resolve=False)
    train = OmegaConf.create({k: v for k, v in container.items() if k not in ("sweep", "hydra")})
    OmegaConf.set_struct(train, True)
    return train


def as_override(name: str, value: Any) -> str:
    """`name=value` in Hydra's override grammar (repr keeps every digit of a float)."""
    return f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"


def trial_config(overrides: list[str], params: dict[str, Any], output_dir: str, **tracking: str) -> DictConfig:
    """The training config of one trial: the sweep's command line plus the trial's values.

    `tracking` sets `tracking.<key>` (the children's experiment and run name). Trials never see the test
    split: that is evaluated once, for the best trial.
    """
    register_sweep_configs()
    groups = [as_override(name, value) for name, value in params.items() if (CONFIG_DIR / name).is_dir()]
    values = {name: value for name, value in params.items() if not (CONFIG_DIR / name).is_dir()}
    values.update({"paths.output_dir": output_dir, "trainer.evaluate_test": False},
                  **{f"tracking.{key}": value for key, value in tracking.items()})
    # Hydra composes a command line and its config-group choices once per process (a compose costs
    # ~0.12 s, a trial's other values are set on a copy); a value that does not fit is composed again,
    # so that it fails in Hydra's own words, like a typo on the command line.
    cfg = copy.deepcopy(_composed(tuple([*overrides, *groups])))
    try:
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException:
        quoted = [f"{k}='{v}'" if isinstance(v, str) else as_override(k, v) for k, v in values.items()]
        cfg = compose_config("sweep", [*overrides, *groups, *quoted])
    return training_part(cfg)


@functools.lru_cache(maxsize=16)
def _cached_compose(overrides: tuple[str, ...], hydra_instance: int | None) -> DictConfig:
    return compose_config("sweep", list(overrides))


def _composed(overrides: tuple[str, ...]) -> DictConfig:
    """`compose_config("sweep", overrides)`, cached per Hydra initialization (a test may use several)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    return _cached_compose(overrides, id(hydra.hydra) if hydra.is_initialized() else None)


def distribution(spec: ParamSpec) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of one search-space entry; Optuna checks the range."""
    if spec.type is ParamType.categorical:
        return optuna.distributions.CategoricalDistribution(spec.choices or [])
    if spec.type is ParamType.int:
        return optuna.distributions.IntDistribution(int(spec.low), int(spec.high), log=spec.log,
                                                    step=int(spec.step or 1))
    return optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log, step=spec.step)


def build(kind: str, node: Any, **extra: Any) -> Any:
    """Instantiate `sweep.sampler` or `sweep.pruner`; raise ConfigError naming it when that fails."""
    try:
        return instantiate(node, **extra)
    except Exception as exc:  # Hydra wraps a bad _target_ and a bad argument alike
        raise ConfigError(f"sweep.{kind} is invalid ({first_line(exc)}): pick an option with "
                          f"sweeps/{kind}=<name> (see the files in sweeps/{kind}/)") from exc


def check(cfg: DictConfig) -> SweepConfig:
    """Check the sweep settings and the search space; return the typed, resolved `sweep` node.

    Raise ConfigError with one sentence naming the key before anything is written.
    """
    sweep: SweepConfig = OmegaConf.to_object(cfg.sweep)
    require(sweep.metric.startswith("val/"), "sweep.metric", sweep.metric, "the objective must be a validation "
            "metric such as val/accuracy (the test split is kept for the best trial)")
    for key in ("n_trials", "n_workers", "heartbeat_seconds"):
        require(getattr(sweep, key) >= 1, f"sweep.{key}", getattr(sweep, key), "it must be a positive integer")
    require(sweep.timeout is None or sweep.timeout > 0, "sweep.timeout", sweep.timeout,
            "give seconds > 0, or null for no limit")
    if sweep.storage_proxy:
        require("://" in sweep.storage, "sweep.storage", sweep.storage, "with sweep.storage_proxy, give the "
                "database URL the proxy serves (the study lock and the heartbeat go to it directly)")
        try:
            address(sweep.storage_proxy)
        except ValueError:
            raise ConfigError(f"sweep.storage_proxy={sweep.storage_proxy!r} is invalid: give host:port, as "
                              "`make stack-up ARGS=--proxy` prints it") from None
    require(sweep.max_retry >= 0, "sweep.max_retry", sweep.max_retry, "it must be zero or more")
    if not sweep.params:
        raise ConfigError("sweep.params is empty: give at least one training config key to search")
    build("sampler", sweep.sampler, seed=sweep.seed)
    build("pruner", sweep.pruner)

    for name, spec in sweep.params.items():
        try:
            distribution(spec)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"sweep.params.{name} is invalid: {first_line(exc)}") from exc
    check_corners(command_overrides(cfg), sweep.params)
    return sweep


def check_corners(overrides: list[str], params: dict[str, ParamSpec]) -> None:
    """Both corners of the space, and every option of a searched config group, must compose and pass
    the training config's checks. (Other values between the ends are not composed one by one: a
    compose costs about a second, and the training config's checks are ranges.)"""
    def ends(spec: ParamSpec) -> list[Any]:
        if spec.type is ParamType.categorical:
            return list(spec.choices)
        cast = int if spec.type is ParamType.int else float
        return [cast(spec.low), cast(spec.high)]

    values = {name: ends(spec) for name, spec in params.items()}
    corners = [{name: v[0] for name, v in values.items()}, {name: v[-1] for name, v in values.items()}]
    corners += [{**corners[0], name: choice} for name, v in values.items() if (CONFIG_DIR / name).is_dir()
                for choice in v[1:-1]]
    for corner in corners:
        if _problem(overrides, corner) is None:
            continue
        for name, value in corner.items():  # name the entry that breaks it, when one does on its own
            if problem := _problem(overrides, {name: value}):
                raise ConfigError(f"sweep.params.{name} reaches an invalid training config at {value!r}: {problem}")
        raise ConfigError(f"sweep.params reaches an invalid training config at {corner}: {_problem(overrides, corner)}")


def _problem(overrides: list[str], params: dict[str, Any]) -> str | None:
    try:
        validate(trial_config(overrides, params, "."))
    except (HydraException, OmegaConfBaseException) as exc:
        return f"{first_line(exc)} (check the key and option names against `python src/train.py --cfg job`)"
    except ConfigError as exc:
        return first_line(exc)
    return None
