"""Load test of the sweep's coordination layer: `python -m loadtest --workers 16 32 64` (or `make loadtest`).

Starts (or reuses) the local stack of `make stack-up`, runs the default sweep with N stand-in workers for
each N (real Optuna and MLflow calls, training replaced by milliseconds), prints the table and the
capacity estimate, and saves them as bench/results/<date>-loadtest.json.
"""

import argparse
import logging
import sys
from pathlib import Path

from tfsweep.errors import UserError
from loadtest import run_load_test
from loadtest.report import RESULTS_DIR, capacity_lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 32, 64], help="worker counts (default: 16 32 64)")
    parser.add_argument("--trials-per-worker", type=int, default=3, help="the study's n_trials is this x workers")
    parser.add_argument("--stack-dir", type=Path, default=Path(".stack"), help="the local stack's state folder")
    parser.add_argument("--mlflow-port", type=int, default=5001, help="the MLflow server's port on a new stack")
    parser.add_argument("--trial-seconds", type=float, help="a real default-sweep trial's wall time (default: "
                        "the newest full benchmark's median trial)")
    parser.add_argument("--server-cores", type=float, help="cores of the servers' machine for the estimate "
                        "(default: this machine's)")
    parser.add_argument("--train-ms", type=float, default=5, help="the stand-in's training time per trial")
    parser.add_argument("--lock-file", help="take this file lock around each worker count (a shared machine)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--proxy", action="store_true", help="workers reach the study through Optuna's storage "
                        "proxy (sweep.storage_proxy), started on the stack")
    parser.add_argument("--keep-artifacts", action="store_true", help="keep the uploaded checkpoint files")
    parser.add_argument("overrides", nargs="*", help="sweep config overrides, e.g. trainer.steps=2000")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run_load_test(args.workers, args.trials_per_worker, args.stack_dir, mlflow_port=args.mlflow_port,
                               trial_seconds=args.trial_seconds, train_seconds=args.train_ms / 1000,
                               lock_file=args.lock_file, server_cores=args.server_cores,
                               extra_overrides=args.overrides, keep_artifacts=args.keep_artifacts,
                               results_dir=args.results_dir, proxy=args.proxy)
    except UserError as exc:
        logging.error("%s", exc)
        sys.exit(1)
    print(result["table"])
    for line in capacity_lines(result):
        print(line)
    print(f"saved {result['path']}")
    failures = sum(level["errors"] + level["duplicated"] + level["lost"] for level in result["levels"])
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
