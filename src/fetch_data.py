"""Fetch and verify the data sets ahead of time: `python src/fetch_data.py [mnist fashion_mnist]`."""

import argparse
import logging
import sys

from tfsweep.config import compose_config
from tfsweep.data import ensure_files
from tfsweep.errors import UserError

DATASETS = ("mnist", "fashion_mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"data sets ({', '.join(DATASETS)}; default: all) "
                        "and Hydra overrides such as data.root=/data")
    args = parser.parse_args()
    overrides = [a for a in args.names if "=" in a]
    names = [a for a in args.names if "=" not in a] or list(DATASETS)
    if unknown := set(names) - set(DATASETS):
        parser.error(f"unknown data set {', '.join(sorted(unknown))}; choose from {', '.join(DATASETS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in names:
        try:
            paths = ensure_files(compose_config("train", [f"data={name}", "paths.output_dir=.", *overrides]).data)
        except UserError as exc:
            logging.error("%s", exc)
            sys.exit(1)
        logging.info("%s: verified %s", name, ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
