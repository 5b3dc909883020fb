"""A run's checkpoints as MLflow artifacts under `checkpoints/`: uploaded as the run trains when the
tracking store is a server, and restored into a `model_dir` on a machine that does not have them.

The artifacts never name a missing file: a checkpoint's own files go first and TensorFlow's
`checkpoint` index last, so an upload cut short leaves the index naming the previous, complete one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient

from tfsweep.crashpoints import crashpoint
from tfsweep.errors import first_line

log = logging.getLogger(__name__)

ARTIFACT_DIR = "checkpoints"
INDEX = "checkpoint"  # TensorFlow's index file: which checkpoint is the latest


def uploads_while_training(tracking_uri: str) -> bool:
    """Whether to upload each checkpoint as it is saved rather than once at the end.

    Only a tracking server needs them early: with one, a worker on another machine may retry a trial
    whose worker died, and finds its checkpoints nowhere else. A local store shares its disk with the
    `model_dir`, which a retry resumes from directly, so a local sweep uploads once, at the end.
    """
    return tracking_uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def checkpoint_files(prefix: str | Path) -> list[Path]:
    """One checkpoint's files (`ckpt-200.data-*`, then `ckpt-200.index`, which TensorFlow writes last)."""
    prefix = Path(prefix)
    files = sorted(prefix.parent.glob(prefix.name + ".*"))
    return sorted(files, key=lambda path: path.suffix == ".index")


def checkpoint_step(prefix: str | Path) -> int:
    return int(str(prefix).rsplit("-", 1)[1])


class CheckpointUploader:
    """Uploads a run's checkpoints off the training thread, one checkpoint at a time.

    `saved(path)` starts the upload of a new checkpoint in the background; `wait()` must be called
    before the next save (the checkpoint manager deletes old files while it saves) and `finish()` at
    the end, which uploads what is missing (everything, when nothing was uploaded while training).
    """

    def __init__(self, client: MlflowClient, run_id: str, while_training: bool) -> None:
        self.client, self.run_id = client, run_id
        self._uploaded: set[str] = set()  # file names already in the artifacts
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
                          if while_training else None)
        self._pending: Future | None = None

    def saved(self, model_dir: Path, path: str) -> None:
        if self._executor is None:
            return
        self.wait()
        self._pending = self._executor.submit(self._upload, Path(model_dir), [path])

    def wait(self) -> None:
        """Let the upload in flight end. A failed one costs a retry on another machine some steps, never
        the run: it is reported and the next checkpoint is uploaded as usual."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:  # MLflow raises several types for a server that failed to answer
            log.warning("could not upload a checkpoint to MLflow run %s (%s); the next one will be",
                        self.run_id, first_line(exc))

    def finish(self, model_dir: Path, kept: list[str]) -> None:
        """Upload the kept checkpoints the artifacts lack, then the index; raise if that fails."""
        self.close()
        self._upload(Path(model_dir), kept)

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _upload(self, model_dir: Path, prefixes: list[str]) -> None:
        for prefix in prefixes:
            for number, path in enumerate(checkpoint_files(prefix)):
                if path.name in self._uploaded:
                    continue
                self.client.log_artifact(self.run_id, str(path), ARTIFACT_DIR)
                self._uploaded.add(path.name)
                if number == 0:
                    crashpoint("tracking.during_checkpoint_upload")
        if (model_dir / INDEX).exists():  # none when training stopped (pruned) before its first save
            self.client.log_artifact(self.run_id, str(model_dir / INDEX), ARTIFACT_DIR)


def _latest_name(index_folder: Path) -> str | None:
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(index_folder))
    return Path(state.model_checkpoint_path).name if state and state.model_checkpoint_path else None


def local_checkpoint_step(model_dir: Path) -> int | None:
    name = _latest_name(Path(model_dir)) if (Path(model_dir) / INDEX).exists() else None
    return checkpoint_step(name) if name else None


def restore(client: MlflowClient, run_id: str, model_dir: Path) -> int | None:
    """Bring the run's latest logged checkpoint into `model_dir` unless `model_dir` holds one as recent.

    Return the step restored, or None when nothing was downloaded. A download cut short leaves
    `model_dir` as it was: the files land in a temporary folder beside it, and the index moves last.
    """
    model_dir = Path(model_dir)
    artifacts = client.list_artifacts(run_id, ARTIFACT_DIR)
    if not any(a.path == f"{ARTIFACT_DIR}/{INDEX}" for a in artifacts):
        return None
    local = local_checkpoint_step(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=".download-") as folder:
        downloaded = Path(client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{INDEX}", folder)).parent
        name = _latest_name(downloaded)
        if name is None or (local is not None and local >= checkpoint_step(name)):
            return None
        for artifact in artifacts:
            if Path(artifact.path).name.startswith(name + "."):
                client.download_artifacts(run_id, artifact.path, folder)  # into `folder`, by its file name
        files = checkpoint_files(downloaded / name)
        if not any(path.suffix == ".index" for path in files):
            log.warning("MLflow run %s names checkpoint %s but lacks its files; not restoring it", run_id, name)
            return None
        for path in [*files, downloaded / INDEX]:  # the index names files already in place
            os.replace(path, model_dir / path.name)
    log.info("restored checkpoint %s of MLflow run %s into %s", name, run_id, model_dir)
    return checkpoint_step(name)
