"""Browse the MLflow record: `python src/ui.py [--host 127.0.0.1] [--port 5000]` (what `make ui` runs).

Prints the address of each experiment's runs table, in the saved view that shows the objective and the
varied settings as columns (`tfsweep.runs_view`), then becomes `mlflow ui` on the store that training
writes to. MLflow 3 opens an experiment on its GenAI pages (traces, a "Detect Issues" pop-up);
`workflowType=machine_learning` in the address opens the model-training runs table instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from omegaconf import OmegaConf

from tfsweep import runs_view
from tfsweep.config import CONFIG_DIR
from tfsweep.credentials import TRACKING_URI_ENV, move_secret, redact_url
from tfsweep.errors import UserError, first_line

RUNS_TABLE = "{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
WITH_VIEW = f"&viewStateShareKey={runs_view.VIEW_ID}"  # the objective and varied settings as columns


def default_store() -> str:
    """The store that `tracking.uri` defaults to (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db), read from
    its one home, conf/tracking/mlflow.yaml."""
    return OmegaConf.load(CONFIG_DIR / "tracking" / "mlflow.yaml").uri


def runs_table_urls(store: str, base_url: str) -> dict[str, str]:
    """{experiment name: address of its runs table} for each experiment in `store` that has runs, the
    most recently updated first (MLflow's empty "Default" experiment is left out)."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=store)
        experiments = client.search_experiments(order_by=["last_update_time DESC"])
        return {e.name: RUNS_TABLE.format(base=base_url.rstrip("/"), experiment_id=e.experiment_id)
                + (WITH_VIEW if runs_view.has_view(e.tags) else "")
                for e in experiments if client.search_runs([e.experiment_id], max_results=1)}
    except Exception as exc:  # MLflow wraps driver errors in several types; each means "cannot read it"
        raise UserError(f"cannot read the tracking store {redact_url(store)}: {first_line(exc)}; check "
                        "--backend-store-uri or MLFLOW_TRACKING_URI") from exc


def print_urls(store: str, base_url: str) -> None:
    urls = runs_table_urls(store, base_url)
    print(f"MLflow runs in {redact_url(store)}; open an experiment's runs table:")
    for name, url in urls.items():
        print(f"  {name}: {url}")
    if not urls:
        print(f"  no runs yet: train one (`make train`), then open {base_url}")
    sys.stdout.flush()  # before exec replaces this process and its buffers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="(default: %(default)s)")
    parser.add_argument("--access-log", action="store_true", help="print every HTTP request (quiet by default)")
    parser.add_argument("--backend-store-uri", help="the tracking store (default: MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db, as for training)")
    args = parser.parse_args(argv)
    store = args.backend_store_uri or default_store()
    try:
        # A password in the URL goes to the variable its client reads, not onto `mlflow ui`'s command line.
        if moved := move_secret("--backend-store-uri" if args.backend_store_uri else TRACKING_URI_ENV, store):
            store, secrets = moved
            os.environ.update(secrets)
        if store.startswith(("http://", "https://")):  # already a server, with its own UI
            print_urls(store, store)
            return
        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        print_urls(store, f"http://{shown_host}:{args.port}")
    except UserError as exc:
        print(f"ui: {exc}", file=sys.stderr)
        sys.exit(1)
    # One web worker and no job runner (seven queue consumers for GenAI evaluation jobs, unused here):
    # two processes and ~0.5 GB instead of ~15 and several GB on a 2-core machine.
    quiet = [] if args.access_log else ["--uvicorn-opts", "--no-access-log"]
    os.execve(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--workers", "1", "--host", args.host,
                               "--port", str(args.port), *quiet, "--backend-store-uri", store],
              {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})


if __name__ == "__main__":
    main()
