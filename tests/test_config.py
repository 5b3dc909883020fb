import shutil

import keras
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from conftest import compose_config
from tfsweep.config import CONFIG_DIR, Precision, feature_map_size, flatten, validate
from tfsweep.errors import ConfigError

BASE = ["paths.output_dir=/tmp/out"]


def test_defaults_reproduce_the_tutorial():
    cfg = compose_config(BASE)
    assert list(cfg.model.filters) == [32, 64] and cfg.model.kernel_size == 5
    assert cfg.model.dense_units == 1024 and cfg.model.dropout == 0.4
    assert cfg.optimizer._target_ == "keras.optimizers.SGD" and cfg.optimizer.learning_rate == 0.001
    assert cfg.optimizer.name == "sgd"
    schedule = instantiate(cfg.schedule)  # constant: the tutorial's learning rate at every step
    assert {float(schedule(step)) for step in (0, 1, 10000, 19999, 20000)} == {float(keras.ops.cast(0.001, "float32"))}
    assert cfg.data.name == "mnist" and cfg.data.batch_size == 100 and cfg.data.validation_size == 5000
    assert cfg.trainer.steps == 20000 and cfg.trainer.log_every == 50 and cfg.trainer.precision == "float32"
    validate(cfg)


@pytest.mark.parametrize("name, cls, extra", [
    ("sgd", keras.optimizers.SGD, {}),
    ("momentum", keras.optimizers.SGD, {"momentum": 0.9}),
    ("adam", keras.optimizers.Adam, {"beta_1": 0.9}),
])
def test_every_optimizer_option_instantiates(name, cls, extra):
    cfg = compose_config(BASE + [f"optimizer={name}", "optimizer.learning_rate=0.05"])
    optimizer = instantiate(cfg.optimizer)
    assert type(optimizer) is cls
    assert float(optimizer.learning_rate) == pytest.approx(0.05)
    for key, value in extra.items():
        assert getattr(optimizer, key) == pytest.approx(value)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_every_optimizer_is_named_after_its_option(name):
    cfg = compose_config(BASE + [f"optimizer={name}"])
    assert cfg.optimizer.name == name and instantiate(cfg.optimizer).name == name


@pytest.mark.parametrize("option, overrides, expected", [
    # (step, learning rate) pairs for trainer.steps=1000 and optimizer.learning_rate=0.1
    ("constant", [], [(0, 0.1), (500, 0.1), (1000, 0.1)]),
    ("exponential", [], [(0, 0.1), (500, 0.1 * 0.1 ** 0.5), (1000, 0.01)]),
    ("exponential", ["schedule.decay_rate=0.5"], [(0, 0.1), (1000, 0.05)]),
    ("cosine", [], [(0, 0.1), (500, 0.05), (1000, 0.0)]),
    ("cosine", ["schedule.warmup_steps=200", "schedule.alpha=0.1"],
     [(0, 0.0), (100, 0.05), (200, 0.1), (600, 0.055), (1000, 0.01)]),
])
def test_every_schedule_spans_trainer_steps_and_peaks_at_the_optimizer_rate(option, overrides, expected):
    cfg = compose_config(BASE + [f"schedule={option}", "trainer.steps=1000", "optimizer.learning_rate=0.1",
                                 *overrides])
    validate(cfg)
    schedule = instantiate(cfg.schedule)
    assert isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)
    assert [(step, pytest.approx(float(schedule(step)), abs=1e-7)) for step, _ in expected] == expected


@pytest.mark.parametrize("override, key", [
    ("schedule=cosine schedule.warmup_steps=1000", "schedule.warmup_steps"),
    ("schedule=cosine schedule.warmup_steps=-1", "schedule.warmup_steps"),
    ("schedule=cosine schedule.alpha=1.5", "schedule.alpha"),
    ("schedule=exponential schedule.decay_rate=0", "schedule.decay_rate"),
    ("schedule=exponential schedule.decay_rate=nan", "schedule.decay_rate"),
])
def test_a_schedule_out_of_range_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(BASE + ["trainer.steps=1000", *override.split()]))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_every_data_option_composes(name):
    cfg = compose_config(BASE + [f"data={name}"])
    assert cfg.data.name == name and cfg.data.root.endswith(f"datasets/{name}")
    assert len({cfg.data[s].sha256 for s in ("train_images", "train_labels", "test_images", "test_labels")}) == 4
    validate(cfg)


def test_tracking_uri_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert compose_config(BASE).tracking.uri == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert compose_config(BASE).tracking.uri == "sqlite:///mlflow.db"


@pytest.mark.parametrize("override, error", [
    ("model.dropuot=0.3", ConfigCompositionException),       # unknown key
    ("optimizer=adamw", ConfigCompositionException),         # unknown group option
    ("model.dropout=abc", ConfigCompositionException),       # wrong type
    ("trainer.steps=1.5", ConfigCompositionException),
    ("trainer.precision=float16", ConfigCompositionException),  # not a Precision
])
def test_bad_overrides_fail_at_compose_time(override, error):
    with pytest.raises(error):
        compose_config(BASE + [override])


@pytest.mark.parametrize("option, line, typo", [
    ("model/cnn.yaml", "dense_units: 1024", "dense_unit: 1024"),
    ("optimizer/adam.yaml", "beta_1: 0.9", "beta1: 0.9"),      # a key of the option's own schema
    ("trainer/default.yaml", "seed: 0", "seed: zero"),         # a wrong type
])
def test_a_typo_inside_a_yaml_option_fails_against_the_schema(tmp_path, option, line, typo):
    config_dir = tmp_path / "conf"
    shutil.copytree(CONFIG_DIR, config_dir)
    path = config_dir / option
    assert line in path.read_text()
    path.write_text(path.read_text().replace(line, typo))
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match=typo.split(":")[0]):
            compose("train", overrides=BASE + [f"{option.split('/')[0]}={path.stem}"])


def test_schemas_are_not_offered_as_options():
    options = {p.stem for p in CONFIG_DIR.glob("*/*.yaml")}
    assert not {o for o in options if o.endswith("schema")}
    for group in ("model", "optimizer", "schedule", "data", "trainer", "tracking", "paths"):
        with pytest.raises(ConfigCompositionException):
            compose_config(BASE + [f"{group}={group}_schema"])


def test_a_key_added_with_plus_is_refused_by_validate():
    cfg = compose_config(BASE + ["+model.dropoutt=0.3"])  # Hydra lets `+` add a key the schema lacks
    with pytest.raises(ConfigError, match=r"model\.dropoutt is not a config key"):
        validate(cfg)


@pytest.mark.parametrize("override, key", [
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("optimizer.learning_rate=-0.01", "optimizer.learning_rate"),
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.steps=0", "trainer.steps"),
    ("trainer.eval_every=-5", "trainer.eval_every"),
    ("data.validation_size=0", "data.validation_size"),
    ("optimizer.learning_rate=inf", "optimizer.learning_rate"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate"),
    ("model.dropout=nan", "model.dropout"),
    ("optimizer=adam optimizer.epsilon=inf", "optimizer.epsilon"),
    ("model.pool_size=30", "model.pool_size=30 shrinks"),
    ("model.filters=[8,8,8,8,8]", "model.filters"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        validate(compose_config(BASE + override.split()))


@pytest.mark.parametrize("pool_size, blocks, size", [(2, 1, 14), (2, 2, 7), (2, 4, 1), (2, 5, 0), (3, 2, 3),
                                                     (28, 1, 1), (30, 1, 0)])
def test_feature_map_size_matches_keras(pool_size, blocks, size):
    cfg = compose_config(BASE + [f"model.pool_size={pool_size}", f"model.filters=[{','.join(['2'] * blocks)}]"])
    assert feature_map_size(cfg.model, 28) == size
    if size:
        from tfsweep.model import build_network

        assert build_network(cfg.model).get_layer(f"pool{blocks}").output.shape[1:3] == (size, size)


def test_precision_is_an_enum_that_keras_takes_as_its_name():
    import keras

    cfg = compose_config(BASE + ["trainer.precision=mixed_bfloat16"])
    assert cfg.trainer.precision is Precision.mixed_bfloat16
    assert keras.DTypePolicy(cfg.trainer.precision).compute_dtype == "bfloat16"
    assert flatten(cfg)["trainer.precision"] == "mixed_bfloat16"


def test_flatten_gives_dotted_keys():
    flat = flatten(compose_config(BASE + ["model.dropout=0.25"]))
    assert flat["model.dropout"] == 0.25
    assert flat["data.train_images.sha256"].startswith("ba8910")
    assert flat["optimizer._target_"] == "keras.optimizers.SGD"


def test_a_sweep_trial_keeps_the_keys_of_its_optimizer_and_schedule_options():
    from tfsweep.config import compose_config as compose_app_config
    from tfsweep.sweep_config import register_sweep_configs

    register_sweep_configs()
    cfg = compose_app_config("sweep", ["optimizer=adam", "schedule=cosine", "schedule.warmup_steps=100"])
    assert cfg.optimizer.beta_1 == 0.9 and cfg.schedule.warmup_steps == 100
    validate(cfg)  # as the preflight check does: no option key taken for a typo
