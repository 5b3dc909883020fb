"""Shared fixtures: a tiny synthetic IDX data set and the real configs composed around it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfsweep.config import CONFIG_DIR, register_configs  # noqa: E402
from tfsweep.data import SPLIT_FILES, write_idx  # noqa: E402

register_configs()

N_TRAIN, N_TEST, N_VALIDATION = 240, 60, 40


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright 7x7 block at one of 10 places, on noise: easy, but must be learned."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 5)
        image[2 + row * 12: 9 + row * 12, 1 + col * 5: 8 + col * 5] = 255
    return images, labels


def make_dataset(root: Path) -> dict[str, str]:
    """Write a tiny IDX data set into `root`; return the Hydra overrides that point `data` at it."""
    root.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_digits(N_TRAIN, seed=1)
    test_images, test_labels = synthetic_digits(N_TEST, seed=2)
    arrays = dict(zip(SPLIT_FILES, (train_images, train_labels, test_images, test_labels)))
    overrides = {"data.root": str(root), "data.mirrors": "[]", "data.fallback": "none",
                 "data.validation_size": str(N_VALIDATION), "data.batch_size": "20",
                 "data.eval_batch_size": "32"}
    for split, array in arrays.items():
        path = root / f"synthetic-{split}-idx"
        write_idx(array, path)
        overrides[f"data.{split}.name"] = path.name
        overrides[f"data.{split}.sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return overrides


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, str]:
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


TINY_TRAINING = {"model.filters": "[4,8]", "model.dense_units": "32", "trainer.steps": "20",
                 "trainer.log_every": "5", "trainer.eval_every": "10", "trainer.checkpoint_every": "10",
                 "trainer.progress_bar": "false", "optimizer": "adam", "optimizer.learning_rate": "0.01"}


def compose_config(overrides: dict[str, str] | list[str] = ()) -> DictConfig:
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=items)


@pytest.fixture
def make_cfg(tmp_path, synthetic_data):
    """`make_cfg(key=value, ...)`: the real config on synthetic data, a tiny model, MLflow in tmp_path."""

    def make(*extra: str, **overrides: str) -> DictConfig:
        merged = {"optimizer": TINY_TRAINING["optimizer"], **synthetic_data, **TINY_TRAINING,
                  "paths.output_dir": str(tmp_path / "run"),
                  "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        merged.update({k.replace("__", "."): v for k, v in overrides.items()})
        return compose_config([f"{k}={v}" for k, v in merged.items()] + list(extra))

    return make
