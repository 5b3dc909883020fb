"""The fixed MLflow cost of one sweep trial's run, against a fresh SQLite store: connecting, creating the
run with its tags, params, config.yaml and data set inputs, the trial's own tags, and ending the run.
Checkpoint and model uploads are left out (`tracking.log_checkpoints=false`, `tracking.log_model=false`):
they scale with the model, not with the run. No network is trained: a stand-in trainer carries what the
tracking reads.

    .venv/bin/python tests/tracking_cost.py [runs]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TINY_TRAINING, compose_config, make_dataset  # noqa: E402
from tfsweep import sweep_tracking, tracking, tracking_store  # noqa: E402
from tfsweep.data import load_splits  # noqa: E402


def one_run(tmp: Path, number: int, splits) -> dict[str, float]:
    cfg = compose_config({**DATA, **TINY_TRAINING, "paths.output_dir": str(tmp / f"trial-{number:04d}"),
                          "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.log_model": "false",
                          "tracking.log_checkpoints": "false", "tracking.run_name": f"trial-{number:04d}"})
    times = {}
    started = time.perf_counter()
    client = tracking_store.connect(cfg.tracking.uri)
    times["connect"] = time.perf_counter() - started
    trainer = SimpleNamespace(cfg=cfg, splits=splits, model_dir=Path(cfg.trainer.model_dir), stop_reason=None,
                              global_step=None)
    tags = {sweep_tracking.STUDY_TAG: "cost", sweep_tracking.ROLE_TAG: "trial",
            sweep_tracking.NUMBER_TAG: str(number)}
    hook = tracking.MlflowHook(cfg, client, parent_run_id=PARENT, tags=tags)
    started = time.perf_counter()
    hook.begin(trainer)
    times["begin"] = time.perf_counter() - started
    hook.after_log(trainer, 10, {"train/loss": 1.0, "train/accuracy": 0.5})
    hook.after_eval(trainer, 20, "val", {"val/loss": 1.0, "val/accuracy": 0.5})
    started = time.perf_counter()
    hook.end(trainer, None)
    times["end"] = time.perf_counter() - started
    started = time.perf_counter()
    client.set_tag(hook.run_id, sweep_tracking.STATE_TAG, "complete")  # what the sweep adds after the trial
    times["trial_tags"] = time.perf_counter() - started
    times["total"] = sum(times.values())
    return times


if __name__ == "__main__":
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        DATA = make_dataset(tmp / "data")
        splits = load_splits(compose_config({**DATA, "paths.output_dir": str(tmp)}).data)
        client = tracking_store.connect(f"sqlite:///{tmp / 'mlflow.db'}")  # the store's tables, made once per store
        PARENT = client.create_run(tracking_store.experiment_id(client, "mnist-cnn")).info.run_id
        results = [one_run(tmp, number, splits) for number in range(runs + 1)]
    first, rest = results[0], results[1:]
    print(f"{runs} trial runs after a first one, SQLite, seconds (median, max):")
    for phase in first:
        values = [r[phase] for r in rest]
        print(f"  {phase:<11} {statistics.median(values):.3f}  {max(values):.3f}   first run {first[phase]:.3f}")
