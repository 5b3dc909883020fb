"""tfsweep: the TensorFlow tutorial's MNIST CNN with an Estimator-style trainer, MLflow and Optuna."""

import os

# Known-harmless library noise, silenced before the libraries load; a user's own setting wins.
# TensorFlow's INFO lines at import (CPU features, oneDNN), once per process; its warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# MLflow's progress bar for each artifact download (checkpoints of a sweep's best trial).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
