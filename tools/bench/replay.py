"""Choose a pruner by replaying an unpruned study, named by the overrides its sweep ran with:
`python -m bench.replay sweep.study_name=NAME sweep.storage=JOURNAL_OR_URL [trainer.steps=...]`.

Each finished trial of the study is fed, in its order, into a new in-memory study with the candidate
pruner (Optuna's own `prune`), reporting its recorded curve until the pruner stops it. A trial that stops
at step s of S is charged its fixed cost plus (s / S) of the rest of its measured duration.

The sampler's proposals are the unpruned study's. Under the default's RandomSampler they depend on nothing
else, and the replay is the pruned study. Under TPE a real pruned study draws the same ones only while the
trials that steer it finish: its guided proposals follow the best finished trial (its "good" group is the
top 10%, one trial in a 10-trial study), so a trial that is the best of those before a guided trial must
run to the end, or the study's later trials differ from the replayed ones and the replay no longer
predicts it. Each row lists the steering trials it stops, and the first line the least that a pruner
which stops none can cost. A first-rung-100, factor-5 successive halving that stopped steering trials 3
and 5 of the default study under TPE replayed at 0.48x with the best kept, and ran with all 10 of its
trials pruned (bench/results/2026-12-03T1632-full-sweep-pruned.journal.log). `make bench` row 6 measures
the chosen pruner for real.
"""

from __future__ import annotations

import sys
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tfsweep import study as studies
from tfsweep.sweep_config import check, compose_sweep

FIXED_SECONDS = 3.0  # a trial's cost outside training steps (`make bench` row 8: 3.6 s of a 45.9 s trial)


def candidates(eval_every: int, steps: int) -> list[dict[str, Any]]:
    """Pruner configs to compare, with their first rung at the study's first or second evaluation."""
    first_rungs = [r for r in (eval_every, 2 * eval_every) if r < steps]
    halving = [{"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": rung,
                "reduction_factor": factor, "bootstrap_count": bootstrap}
               for rung in first_rungs for factor in (2, 3, 4, 5) for bootstrap in (0, 1, 2)]
    hyperband = [{"_target_": "optuna.pruners.HyperbandPruner", "min_resource": rung, "max_resource": steps,
                  "reduction_factor": 3} for rung in first_rungs]
    percentile = [{"_target_": "optuna.pruners.PercentilePruner", "percentile": percent, "n_startup_trials": 1,
                   "n_warmup_steps": rung} for rung in first_rungs for percent in (25.0, 33.0, 50.0)]
    return halving + hyperband + percentile


def charge(recorded: optuna.trial.FrozenTrial, share: float) -> float:
    """The seconds `recorded` costs when it runs `share` of its steps: its fixed cost plus that share of the
    rest of its measured duration."""
    return FIXED_SECONDS + max(0.0, recorded.duration.total_seconds() - FIXED_SECONDS) * share


def replay(trials: list[optuna.trial.FrozenTrial], pruner: optuna.pruners.BasePruner, steps: int,
           direction: str | optuna.study.StudyDirection = "maximize") -> dict[str, Any]:
    """The cost (seconds) of `trials` under `pruner`, how many it lets finish, the best of those, and the
    numbers of the trials it stops."""
    # a fixed name: HyperbandPruner picks a trial's bracket by hashing the study name with the trial number
    study = optuna.create_study(study_name="replay", direction=direction, pruner=pruner)
    seconds, stopped = 0.0, []
    for recorded in trials:
        trial = study.ask()
        reached = steps
        for step, value in sorted(recorded.intermediate_values.items()):
            trial.report(value, step)
            if step < steps and trial.should_prune():  # as the sweep's trials ask: never at the last step
                reached = step
                break
        seconds += charge(recorded, reached / steps)
        if reached == steps:
            study.tell(trial, recorded.value)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            stopped.append(recorded.number)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return {"seconds": seconds, "n_complete": len(finished), "best_value": study.best_value if finished else None,
            "stopped": stopped}


def steering(trials: list[optuna.trial.FrozenTrial], startup: int,
             direction: str | optuna.study.StudyDirection = "maximize") -> list[int]:
    """The trials that are the best of all before them when a guided trial (number >= `startup`) is drawn."""
    maximize = direction in ("maximize", optuna.study.StudyDirection.MAXIMIZE)
    best, steer = None, []
    for k, recorded in enumerate(trials):
        if best is not None and k >= startup and best.number not in steer:
            steer.append(best.number)
        if best is None or (recorded.value > best.value if maximize else recorded.value < best.value):
            best = recorded
    return steer


def floor(trials: list[optuna.trial.FrozenTrial], steer: list[int], first_step: int, steps: int) -> float:
    """The least that a pruner which stops no steering trial can cost, as a fraction of no pruning: those
    trials run to the end, every other one stops at `first_step`."""
    return (sum(charge(t, 1 if t.number in steer else first_step / steps) for t in trials)
            / sum(charge(t, 1) for t in trials))


def compare(trials: list[optuna.trial.FrozenTrial], pruners: list[dict[str, Any]], steps: int,
            direction: str | optuna.study.StudyDirection = "maximize", startup: int = 0) -> list[dict[str, Any]]:
    """One row per pruner config: its replay, its cost as a fraction of the unpruned study's (the replay
    under Optuna's NopPruner), how far its best value falls short of the unpruned best, and the steering
    trials it stops (TPE's guided trials start at number `startup`)."""
    steer = steering(trials, startup, direction)
    unpruned = replay(trials, optuna.pruners.NopPruner(), steps, direction)
    rows = []
    for spec in pruners:
        result = replay(trials, instantiate(OmegaConf.create(spec)), steps, direction)
        shortfall = None if result["best_value"] is None else abs(unpruned["best_value"] - result["best_value"])
        rows.append({"pruner": spec, **result, "ratio": result["seconds"] / unpruned["seconds"],
                     "shortfall": shortfall, "stops_steering": [n for n in result["stopped"] if n in steer]})
    return rows


def main(overrides: list[str]) -> None:
    cfg = compose_sweep(overrides)
    sweep = check(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sweep.study_name, storage=studies.open_storage(sweep))
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    print(f"{sweep.study_name}: {len(trials)} finished trials of {cfg.trainer.steps} steps, "
          f"{sum(t.duration.total_seconds() for t in trials):.0f} s, best {study.best_value:.4f}")
    # a sampler without a random start (RandomSampler) is never steered
    startup = cfg.sweep.sampler.get("n_startup_trials", len(trials))
    steer = steering(trials, startup, study.direction)
    print(f"{floor(trials, steer, cfg.trainer.eval_every, cfg.trainer.steps):.2f}x at least for a pruner that "
          f"stops no trial steering the sampler (steering: {', '.join(map(str, steer)) or 'none'})")
    for row in compare(trials, candidates(cfg.trainer.eval_every, cfg.trainer.steps), cfg.trainer.steps,
                       study.direction, startup):
        spec = " ".join(f"{k}={v}" for k, v in row["pruner"].items() if k != "_target_")
        name = row["pruner"]["_target_"].rsplit(".", 1)[-1]
        shortfall = "n/a" if row["shortfall"] is None else f"{row['shortfall']:.4f}"
        stops = ", ".join(map(str, row["stops_steering"])) or "none"
        print(f"{row['ratio']:.2f}x  {row['n_complete']:2d} finished  best short by {shortfall}  "
              f"stops steering: {stops}  {name} {spec}")


if __name__ == "__main__":
    main(sys.argv[1:])
