"""Shared fixtures: a tiny synthetic IDX data set and the real configs composed around it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfsweep import config  # noqa: E402
from tfsweep.data import SPLIT_FILES, write_idx  # noqa: E402

config.register_configs()

N_TRAIN, N_TEST, N_VALIDATION = 240, 60, 40


def synthetic_digits(n: int, rng: np.random.Generator, noise: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits as a bright 7x7 block whose position encodes the label, under noise: learnable in a few
    dozen steps, but not at once, so that trials differ."""
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images = rng.integers(0, noise, size=(n, 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels):
        row, col = 2 + 7 * (label // 4), 2 + 6 * (label % 4)
        image[row:row + 7, col:col + 7] = 255
    return images, labels


def write_synthetic(root: Path, names: dict[str, str], n_train: int, n_test: int, seed: int = 0,
                    noise: int = 90) -> dict[str, str]:
    """Write a synthetic IDX data set into `root` under `names` (by split); return its SHA-256 by split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in (("train", n_train), ("test", n_test)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = synthetic_digits(count, rng, noise)
    for split in SPLIT_FILES:
        write_idx(arrays[split], root / names[split])
    return {split: hashlib.sha256((root / names[split]).read_bytes()).hexdigest() for split in SPLIT_FILES}


def make_dataset(root: Path) -> dict[str, str]:
    """Write a tiny IDX data set into `root`; return the Hydra overrides that point `data` at it."""
    names = {split: f"synthetic-{split}-idx" for split in SPLIT_FILES}
    digests = write_synthetic(root, names, N_TRAIN, N_TEST, seed=1, noise=60)
    overrides = {"data.root": str(root), "data.mirrors": "[]", "data.fallback": "none",
                 "data.validation_size": str(N_VALIDATION), "data.batch_size": "20",
                 "data.eval_batch_size": "32"}
    for split in SPLIT_FILES:
        overrides[f"data.{split}.name"] = names[split]
        overrides[f"data.{split}.sha256"] = digests[split]
    return overrides


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, str]:
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


TINY_TRAINING = {"model.filters": "[4,8]", "model.dense_units": "32", "trainer.steps": "20",
                 "trainer.log_every": "5", "trainer.eval_every": "10", "trainer.checkpoint_every": "10",
                 "trainer.progress_bar": "false", "optimizer": "adam", "optimizer.learning_rate": "0.01"}


def compose_config(overrides: dict[str, str] | list[str] = ()) -> DictConfig:
    """The train config as the command line composes it; `overrides` as a dict or as override strings."""
    items = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else list(overrides)
    return config.compose_config("train", items)


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
