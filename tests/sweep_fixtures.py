"""Shared pieces of the sweep tests: a tiny synthetic MNIST under its real file names, and the overrides
that make a sweep of it run in seconds with its own study, trial folders and MLflow store under a
temporary folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_synthetic

PROJECT_DIR = Path(__file__).resolve().parents[1]
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def synthetic_mnist(root: Path, n_train: int = 500, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Synthetic digits under MNIST's own file names; returns the files' SHA-256 by split."""
    return write_synthetic(root, FILES, n_train, n_test, seed)


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
