"""Choose a pruner by replaying an unpruned study: `python -m tfsweep.bench.replay STORAGE [STUDY] [PRUNER ...]`.

Each finished trial of the study is fed, in its order, into a new in-memory study with the candidate
pruner (Optuna's own `prune`), reporting its recorded curve until the pruner stops it. A trial that stops
at step s of S is charged its fixed cost plus (s / S) of the rest of its measured duration. The sampler's
proposals are the unpruned study's, so a real pruned study (which TPE steers by what was pruned) can
differ: `make bench` row 6 measures the chosen pruner for real.
"""

from __future__ import annotations

import argparse
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf

FIXED_SECONDS = 3.0  # a trial's cost outside training steps (`make bench` row 8: 3.6 s of a 45.9 s trial)
CANDIDATES = [
    {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": 250, "reduction_factor": rf,
     "bootstrap_count": bootstrap} for rf in (2, 3, 4, 5) for bootstrap in (0, 1, 2)
] + [{"_target_": "optuna.pruners.HyperbandPruner", "min_resource": 250, "max_resource": 1500, "reduction_factor": 3},
     {"_target_": "optuna.pruners.PercentilePruner", "percentile": 33.0, "n_startup_trials": 1, "n_warmup_steps": 250}]


def replay(trials: list[optuna.trial.FrozenTrial], pruner: optuna.pruners.BasePruner, steps: int,
           direction: str = "maximize") -> dict[str, Any]:
    """The cost (seconds) of `trials` under `pruner`, how many it lets finish, and the best of those."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction=direction, pruner=pruner)
    seconds, finished = 0.0, []
    for recorded in trials:
        trial = study.ask()
        reached = steps
        for step, value in sorted(recorded.intermediate_values.items()):
            trial.report(value, step)
            if step < steps and trial.should_prune():  # as the sweep's trials ask: never at the last step
                reached = step
                break
        duration = recorded.duration.total_seconds()
        seconds += FIXED_SECONDS + max(0.0, duration - FIXED_SECONDS) * reached / steps
        if reached == steps:
            study.tell(trial, recorded.value)
            finished.append(recorded.value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    pick = max if direction == "maximize" else min
    return {"seconds": seconds, "n_complete": len(finished), "best_value": pick(finished) if finished else None}


def compare(trials: list[optuna.trial.FrozenTrial], pruners: list[dict[str, Any]], steps: int,
            direction: str = "maximize") -> list[dict[str, Any]]:
    """One row per pruner config: its replay, its cost as a fraction of the unpruned study's, and how far
    its best value falls short of the unpruned best (in the metric's units, positive = worse)."""
    unpruned = sum(t.duration.total_seconds() for t in trials)
    pick = max if direction == "maximize" else min
    best = pick(t.value for t in trials)
    rows = []
    for spec in pruners:
        result = replay(trials, instantiate(OmegaConf.create(spec)), steps, direction)
        shortfall = None if result["best_value"] is None else abs(best - result["best_value"])
        rows.append({"pruner": spec, **result, "ratio": result["seconds"] / unpruned, "shortfall": shortfall})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("storage", help="the unpruned study's storage: a journal file or a database URL")
    parser.add_argument("study", nargs="?", help="its name, if the storage holds more than one")
    parser.add_argument("--steps", type=int, default=1500, help="the trials' trainer.steps")
    args = parser.parse_args()
    storage = args.storage
    if "://" not in storage:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    study = optuna.load_study(study_name=args.study, storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    direction = "maximize" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "minimize"
    print(f"{len(trials)} finished trials, {sum(t.duration.total_seconds() for t in trials):.0f} s, "
          f"best {max(t.value for t in trials) if direction == 'maximize' else min(t.value for t in trials):.4f}")
    for row in compare(trials, CANDIDATES, args.steps, direction):
        spec = " ".join(f"{k}={v}" for k, v in row["pruner"].items() if k != "_target_")
        name = row["pruner"]["_target_"].rsplit(".", 1)[-1]
        shortfall = "n/a" if row["shortfall"] is None else f"{row['shortfall']:.4f}"
        print(f"{row['ratio']:.2f}x  {row['n_complete']:2d} finished  best short by {shortfall}  {name} {spec}")


if __name__ == "__main__":
    main()
