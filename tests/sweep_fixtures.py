"""Shared pieces of the sweep tests: a tiny synthetic MNIST, and the overrides that make a sweep of it
run in seconds with its own study, trial folders and MLflow store under a temporary folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tfsweep.data import write_idx

PROJECT_DIR = Path(__file__).resolve().parents[1]
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def synthetic_mnist(root: Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Digits as a bright 7x7 block whose position encodes the label, under noise: learnable in a few
    dozen steps, but not at once, so that trials differ. Returns the files' SHA-256 by split."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)

    def images_for(labels: np.ndarray) -> np.ndarray:
        images = rng.integers(0, 90, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            row, col = 2 + 7 * (label // 4), 2 + 6 * (label % 4)
            images[i, row:row + 7, col:col + 7] = 255
        return images

    arrays = {}
    for split, count in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images_for(labels), labels
    digests = {}
    for split, name in FILES.items():
        write_idx(arrays[split], root / name)
        digests[split] = hashlib.sha256((root / name).read_bytes()).hexdigest()
    return digests


def tiny_overrides(tmp: Path, study: str = "tiny", steps: int = 30) -> list[str]:
    """Overrides for `sweep` that train a tiny net on synthetic data and keep every file under `tmp`."""
    data_root = tmp / "data"
    digests = synthetic_mnist(data_root) if not (data_root / FILES["test_labels"]).exists() else {
        split: hashlib.sha256((data_root / name).read_bytes()).hexdigest() for split, name in FILES.items()}
    return [
        f"data.root={data_root}", "data.mirrors=[]", "data.fallback=none", "data.validation_size=100",
        "data.eval_batch_size=100", "data.shuffle_buffer=500",
        *(f"data.{split}.sha256={digest}" for split, digest in digests.items()),
        "model.filters=[4,8]", "model.dense_units=16",
        f"trainer.steps={steps}", "trainer.log_every=5", "trainer.eval_every=10", "trainer.checkpoint_every=10",
        "trainer.precision=float32",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", "tracking.log_checkpoints=false",
        f"sweep.study_name={study}", f"sweep.dir={tmp}/{study}", f"paths.root_dir={tmp}",
        "sweeps/pruner=none",
    ]


def sweep_command(overrides: list[str]) -> list[str]:
    return [sys.executable, str(PROJECT_DIR / "src" / "sweep.py"), *overrides]


def sweep_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(PROJECT_DIR / "src")}


def run_sweep_command(overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(overrides), env=sweep_env(), cwd=PROJECT_DIR, capture_output=True,
                          text=True, timeout=timeout)


def journal_trials(journal: Path, study: str) -> list:
    """The study's trials as Optuna reads them from a journal file; [] before the study exists."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name=study, storage=JournalStorage(JournalFileBackend(str(journal)))).trials
    except KeyError:
        return []
