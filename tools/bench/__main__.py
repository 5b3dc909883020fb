"""Benchmark the trainer and the sweep: `python -m bench [--quick]`; results go to bench/results/."""

import argparse
import logging
from pathlib import Path

from bench import report, suite


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs for development (a few minutes)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep rows (6 to 8, 10 to 12)")
    parser.add_argument("--only", nargs="+", choices=suite.GROUPS, default=suite.GROUPS, metavar="GROUP",
                        help=f"measure only these groups of rows: {', '.join(suite.GROUPS)}")
    parser.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("tfsweep.hooks", "tfsweep.trainer", "tfsweep.tracking", "tfsweep.sweep", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = suite.run("quick" if args.quick else "full", with_sweep=not args.no_sweep, groups=tuple(args.only))
    path = report.save(result, args.results_dir)
    print(result["table"])
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
