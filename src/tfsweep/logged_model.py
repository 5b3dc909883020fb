"""The trained network as an MLflow LoggedModel: pyfunc (`serving.py`), named after its run, logged once."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from tfsweep.crashpoints import crashpoint

log = logging.getLogger(__name__)


def model_name(run_name: str) -> str:
    """A LoggedModel's name after its run's, with the characters MLflow refuses in model names replaced."""
    return "".join("-" if char in '/:.%"\'' else char for char in run_name) or "model"


def ready_model(client: MlflowClient, run_id: str) -> str | None:
    """The id of the run's finished model, if it has one."""
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    return next((model.model_id for model in models if model.status == LoggedModelStatus.READY), None)


def log_model(uri: str, run_id: str, trainer) -> str:
    """Log the trained network as an MLflow LoggedModel (pyfunc: 28x28 images in, digit classes out),
    named after the run and linked to its current step and that step's metrics; return its id.

    Once per run: a run that has a model keeps it, and a model left unfinished by a killed process is
    replaced. A run that had already ended keeps its status and end time.
    """
    from keras import __version__ as keras_version
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from tensorflow import __version__ as tf_version

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    if (model_id := ready_model(client, run_id)) is not None:
        log.info("MLflow run %s already has its model %s", run_id, model_id)
        return model_id
    for model in client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        client.delete_logged_model(model.model_id)
    name, step = model_name(run.info.run_name), int(trainer.global_step.numpy())
    # The input states the network's own form, float32 [n, 28, 28] in [0, 1]; MLflow checks it only
    # against the input example, and leaves requests to predict, which also takes uint8 pixels,
    # [n, 28, 28, 1] and [n, 784] (the flag MLflow sets for models that validate in predict).
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int32), (-1,), "digit")]))
    signature._is_signature_from_type_hint = True
    with tempfile.TemporaryDirectory() as tmp:
        network_path = Path(tmp) / "network.keras"
        trainer.network.save(network_path)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            pending = mlflow.initialize_logged_model(name=name, source_run_id=run_id, params=run.data.params)
            crashpoint("tracking.during_model_upload")
            mlflow.pyfunc.log_model(
                name=name,
                model_id=pending.model_id,
                python_model=str(Path(__file__).with_name("serving.py")),
                artifacts={"network": str(network_path)},
                signature=signature,
                input_example=trainer.splits.test_images[:3].astype(np.float32) / 255.0,
                step=step,  # MLflow links the model to this step's metrics
                pip_requirements=[f"tensorflow-cpu=={tf_version}", f"keras=={keras_version}",
                                  f"mlflow=={mlflow.__version__}"],
            )
    if run.info.status in ("FINISHED", "FAILED", "KILLED"):
        client.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    return pending.model_id
