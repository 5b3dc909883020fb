"""tfsweep: the TensorFlow tutorial's MNIST CNN with an Estimator-style trainer, MLflow and Optuna."""

import os

# Known-harmless library noise, silenced before the libraries load; a user's own setting wins.
# TensorFlow's INFO lines at import (CPU features, oneDNN), once per process; its warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# MLflow's progress bar for each artifact download (checkpoints of a sweep's best trial).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's telemetry thread sets and then, when it cannot fetch its config (no internet, as on our
# machines), deletes the variable _MLFLOW_TELEMETRY_SESSION_ID in os.environ; a thread iterating os.environ
# meanwhile (requests looking up proxies for a metric batch) dies with KeyError and fails the trial: the
# load test lost 2 of 48 trials to it. Off unless the user turns it on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's "View run at" line when a run ends reads the whole run back from the server first, one more
# request per trial; the project logs each run's address when it starts.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
