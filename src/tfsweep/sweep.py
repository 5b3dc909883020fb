"""`run_sweep(cfg)`: an Optuna study over the training config, one `train()` call per trial.

The story of a sweep command:
1. `check` the sweep config (typed `SweepConfig`) and the search space; open the storage and the
   study's MLflow parent run; everything a worker needs goes into one `SweepContext`.
2. Each worker (`n_workers` processes) loops: it takes the next trial of the study's queue and records
   itself as its owner, trains it (`run_trial`) and tells Optuna the result. When the queue is empty it
   recovers dead workers' trials and queues what the budget lacks, holding the study's lock alone; it
   stops when nothing is left to run (or the command's timeout passed).
3. However the workers stopped (budget, timeout, Ctrl-C, SIGTERM), the command whose workers leave last
   publishes the trials finished so far (`publish_results`): the best trial's config, its test accuracy,
   its `champion` model, and the parent run's metrics, tags and plots. Others just stop. A rerun
   continues the study and publishes again; a rerun of a finished, published study says so in one line.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tfsweep import study as studies
from tfsweep import runs_view, sweep_tracking
from tfsweep.credentials import redact_url
from tfsweep.sweep_config import SweepContext, check, command_overrides
from tfsweep.sweep_results import BEST_CONFIG, Ending, is_publisher, mark_published, publish_results, summarize
from tfsweep.sweep_trial import catch_interrupts, interrupted, is_interrupt, run_trial, short, summary_line
from tfsweep.tracking_store import experiment_id

log = logging.getLogger(__name__)

STOP_SECONDS = 10  # how long the extra workers get to end their trials after Ctrl-C
QUIET_LOGGERS = ("tfsweep.hooks", "tfsweep.trainer", "tfsweep.tracking", "absl")  # per-step lines; MLflow has them

# -- one worker ------------------------------------------------------------------------------------
def work(ctx: SweepContext, worker_index: int, show_progress: bool) -> None:
    """One worker: run trials until the study's budget is met (or this command's timeout)."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    # Our one line per trial, with the failure reason, replaces Optuna's lines and tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # The ~500,000 objects of TensorFlow, Keras and MLflow live as long as the worker: frozen, they are
    # not scanned by the garbage collection that ends every trial (Keras's clear_session), 0.5 s a trial.
    gc.freeze()
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        _run_trials(ctx, show_progress)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run_trials(ctx: SweepContext, show_progress: bool) -> None:
    sweep, started = ctx.sweep, time.monotonic()
    study = studies.load_study(sweep, studies.open_storage(sweep, tables_ready=True))  # `run_sweep` opened it
    with tqdm(total=sweep.n_trials, initial=studies.finished_trials(study), unit="trial", desc=sweep.study_name, dynamic_ncols=True,
              disable=None if show_progress else True) as bar, logging_redirect_tqdm():
        # study.optimize is not used: its n_trials is per process and MaxTrialsCallback can overshoot by
        # n_workers-1, while the budget here is exact: trials come from the study's queue (study.py).
        watched = None  # the running trials at this worker's last recovery, while the queue is empty
        while sweep.timeout is None or time.monotonic() - started < sweep.timeout:
            with studies.study_lock(sweep, shared=True):  # workers taking trials do not wait for each other
                trial = studies.next_trial(study, sweep)
            if trial is None and (watched is None or studies.may_need_recovery(study, watched)):
                # The queue is empty: recover dead workers' trials and queue what is missing. Workers find it
                # empty together, so one that waited for the lock first takes what another one queued.
                with studies.study_lock(sweep):
                    if (trial := studies.next_trial(study, sweep)) is None:
                        studies.recover(study, sweep)
                        queued = studies.queue_budget(study, sweep)
                        watched = studies.running_trials(study)
                        if queued:
                            continue
            if trial is None:
                if not studies.may_need_a_retry(study, sweep):
                    return
                time.sleep(studies.WAIT_SECONDS)  # outside the lock: the running trials' workers need it
                continue
            watched = None
            run_trial(ctx, study, trial)
            log.info("%s", summary_line(trial.storage.get_trial(trial._trial_id), sweep.metric))  # noqa: SLF001
            if not bar.disable:  # the study's progress, other workers' trials too
                bar.update(studies.finished_trials(study) - bar.n)
            if interrupted():  # the interrupt was caught on its way up by a library's own handler
                raise KeyboardInterrupt


def _helper_worker(ctx: SweepContext, worker_index: int) -> None:
    """Entry of an extra worker process (spawned: TensorFlow does not survive a fork)."""
    logging.basicConfig(level=logging.INFO, format=f"[worker {worker_index}] %(message)s")
    catch_interrupts()
    try:
        work(ctx, worker_index, show_progress=False)
    except BaseException as exc:
        if is_interrupt(exc):
            sys.exit(130)  # its trial told Optuna it was interrupted; the command publishes
        raise


# -- the command -----------------------------------------------------------------------------------
def run_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Run (or continue) the study `cfg.sweep` describes; return `summarize`'s outcome with `wall_seconds`
    (this call), `mlflow_parent_run_id`, `published` (whether this command published the study's results)
    and, once published, the best trial's `best_test_accuracy` and `best_config` (the yaml `src/train.py`
    takes).

    However the command ends (the budget met, `sweep.timeout`, Ctrl-C or SIGTERM), the results of the
    trials finished so far are published by the last worker to leave; Ctrl-C then raises
    KeyboardInterrupt. Everything is checked (search space, sampler, pruner, storage, MLflow) before the
    first trial; a problem raises a UserError and leaves an existing study as it was.
    """
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "Using an existing study" and the like
    sweep = check(cfg)
    storage = studies.open_storage(sweep)
    ctx = SweepContext(sweep, command_overrides(cfg), cfg.tracking.experiment_name,
                       cfg.tracking.uri if cfg.tracking.enabled else None)
    client = ctx.client()
    study = studies.load_study(sweep, storage)
    already_finished = studies.is_finished(study, sweep.n_trials)
    if client is not None:
        settings = sweep_tracking.study_params(sweep, redact_url(sweep.storage))  # no database password
        ctx.parent_run_id = sweep_tracking.parent_run(client, ctx.experiment, study, settings)
        runs_view.save_view(client, experiment_id(client, ctx.experiment), sweep.params)
    best = studies.best_trial(study)
    if already_finished and client is not None and best and sweep_tracking.is_published(
            client, ctx.parent_run_id, studies.finished_trials(study), best.number):
        result = summarize(study)
        result.update(best_test_accuracy=sweep_tracking.recorded_test_accuracy(
            client, ctx.parent_run_id, best.number),
            best_config=str(Path(sweep.dir) / BEST_CONFIG), published=False)
        log.info("study %s is finished (%d of %d trials) and its results are on MLflow run %s; nothing to do: "
                 "raise sweep.n_trials to extend it", study.study_name, studies.finished_trials(study),
                 sweep.n_trials, ctx.parent_run_id)
        return {**result, "wall_seconds": time.perf_counter() - started, "mlflow_parent_run_id": ctx.parent_run_id}
    log.info("study %s in %s: %d of %d trials done", study.study_name, redact_url(sweep.storage),
             studies.finished_trials(study), sweep.n_trials)
    if client is not None:
        sweep_tracking.set_status(client, ctx.parent_run_id, RunStatus.RUNNING)

    stopped, status = False, RunStatus.FAILED
    previous = catch_interrupts()
    try:
        try:
            _run_workers(ctx)
        except BaseException as exc:
            if not is_interrupt(exc):
                raise
            stopped = True
            log.warning("interrupted: publishing the trials finished so far (Ctrl-C again to skip)")
        study = studies.load_study(sweep, storage)
        ended = Ending.of(study, sweep.n_trials, stopped)
        result = summarize(study)
        result["published"] = is_publisher(study, sweep, already_finished)
        if result["published"]:
            result.update(publish_results(cfg, ctx, study, client, result, ended))
            mark_published(study, sweep)
        status = ended.run_status if result["published"] or not studies.any_running(study) else None
    except KeyboardInterrupt:  # a second Ctrl-C, while publishing
        status = RunStatus.KILLED
        raise
    finally:
        if client is not None and status is not None:
            sweep_tracking.set_status(client, ctx.parent_run_id, status)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    result["wall_seconds"] = time.perf_counter() - started
    result["mlflow_parent_run_id"] = ctx.parent_run_id
    _report(sweep, study, result)
    if stopped:
        raise KeyboardInterrupt
    return result


def _run_workers(ctx: SweepContext) -> None:
    """This command's workers: the extra processes and this one, until the budget or the timeout ends
    them; on Ctrl-C or SIGTERM the extra ones are stopped too, each telling Optuna its trial's end."""
    helpers = [multiprocessing.get_context("spawn").Process(
        target=_helper_worker, name=f"sweep-worker-{i}", args=(ctx, i)) for i in range(1, ctx.sweep.n_workers)]
    for process in helpers:
        process.start()
    stopping = True
    try:
        work(ctx, 0, show_progress=True)
        stopping = False
    finally:
        for process in helpers:
            process.join(timeout=STOP_SECONDS if stopping else None)
            if process.is_alive():  # SIGTERM reached this process only; Ctrl-C reaches the whole group
                process.terminate()
                process.join()
            if process.exitcode:
                log.warning("%s exited with code %s; its trial, if any, is retried next time",
                            process.name, process.exitcode)


def _report(sweep, study: optuna.Study, result: dict[str, Any]) -> None:
    if not result["published"]:
        log.info("study %s: %d of %d trials done; %s", sweep.study_name, studies.finished_trials(study),
                 sweep.n_trials, "the worker that finishes the last running one publishes the results"
                 if studies.any_running(study) else "run the same command again to continue")
        return
    log.info("study %s: %d complete, %d pruned, %d failed, %d interrupted in %.0f s", sweep.study_name,
             result["n_complete"], result["n_pruned"], result["n_failed"], result["n_interrupted"],
             result["wall_seconds"])
    if result["best_trial"] is None:
        log.warning("no trial is complete yet, so there is no best trial to publish; run the same command "
                    "again to continue the study")
        return
    log.info("best trial %d: %s=%.4f, test accuracy %.4f, %s", result["best_trial"], sweep.metric,
             result["best_value"], result["best_test_accuracy"],
             " ".join(f"{k}={short(v)}" for k, v in result["best_params"].items()))
    log.info("retrain it: python src/train.py --config-dir %s --config-name %s",
             Path(result["best_config"]).parent, Path(result["best_config"]).stem)
    if not studies.is_finished(study, sweep.n_trials):
        log.info("%d of %d trials done; run the same command again to continue the study and publish again",
                 studies.finished_trials(study), sweep.n_trials)
