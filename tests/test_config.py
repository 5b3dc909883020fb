import keras
import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import compose_config
from tfsweep.config import flatten, validate
from tfsweep.errors import ConfigError

BASE = ["paths.output_dir=/tmp/out"]


def test_defaults_reproduce_the_tutorial():
    cfg = compose_config(BASE)
    assert list(cfg.model.filters) == [32, 64] and cfg.model.kernel_size == 5
    assert cfg.model.dense_units == 1024 and cfg.model.dropout == 0.4
    assert cfg.optimizer._target_ == "keras.optimizers.SGD" and cfg.optimizer.learning_rate == 0.001
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
])
def test_bad_overrides_fail_at_compose_time(override, error):
    with pytest.raises(error):
        compose_config(BASE + [override])


def test_a_typo_inside_a_yaml_option_fails_against_the_schema():
    from omegaconf import OmegaConf
    from tfsweep.config import ModelConfig

    schema = OmegaConf.structured(ModelConfig)
    with pytest.raises((ConfigKeyError, ValidationError)):
        OmegaConf.merge(schema, {"dense_unit": 3})


@pytest.mark.parametrize("override, key", [
    ("model.dropout=1.0", "model.dropout"),
    ("model.dropout=-0.1", "model.dropout"),
    ("optimizer.learning_rate=0", "optimizer.learning_rate"),
    ("optimizer.learning_rate=-0.01", "optimizer.learning_rate"),
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.steps=0", "trainer.steps"),
    ("trainer.eval_every=-5", "trainer.eval_every"),
    ("trainer.precision=float16", "trainer.precision"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(BASE + [override]))


def test_flatten_gives_dotted_keys():
    flat = flatten(compose_config(BASE + ["model.dropout=0.25"]))
    assert flat["model.dropout"] == 0.25
    assert flat["data.train_images.sha256"].startswith("ba8910")
    assert flat["optimizer._target_"] == "keras.optimizers.SGD"
