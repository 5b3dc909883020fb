"""The local multi-machine stack: `python src/stack.py up|down|env` (or `make stack-up` / `make stack-down`);
`proxy` runs Optuna's storage proxy in the foreground (what `up --proxy` starts in the background)."""

import argparse
import logging
import sys
from pathlib import Path

from tfsweep import stack
from tfsweep.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("up", "down", "env", "proxy"))
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state folder (default: .stack)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--mlflow-port", type=int, default=5001)
    parser.add_argument("--proxy", action="store_true", help="with up: also Optuna's gRPC storage proxy, for "
                        "many workers")
    parser.add_argument("--purge", action="store_true", help="with down: delete databases, artifacts, secrets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.action == "down":
            stack.down(args.dir, purge=args.purge)
            return
        if args.action == "proxy":
            stack.serve_proxy(args.dir)
            return
        running = stack.up(args.dir, args.host, args.mlflow_port, args.proxy) if args.action == "up" else stack.load(args.dir)
    except UserError as exc:
        logging.error("%s", exc)
        sys.exit(1)
    proxy = f" sweep.storage_proxy={running.storage_proxy}" if running.storage_proxy else ""
    print(f"# MLflow {running.tracking_uri} and PostgreSQL {running.host}:{running.pg_port} are up"
          f"{', and the storage proxy' if proxy else ''}. A worker needs:")
    print(f"set -a; . {running.worker_env_file}; set +a   # tracking URI, MLflow credentials, PGPASSFILE")
    print(f'make sweep ARGS="sweep.storage={running.storage_url()}{proxy}"')


if __name__ == "__main__":
    main()
