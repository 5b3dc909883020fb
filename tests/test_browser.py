"""`make ui` in a real browser: a tiny sweep, the UI started as `make ui` starts it (src/ui.py), and
Debian's headless Chromium (driven by Playwright) on the address it prints.

Set TFSWEEP_SCREENSHOTS=docs to refresh the README's screenshots; otherwise they go to a temporary folder.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweep_fixtures import PROJECT_DIR, sweep_command, sweep_env, tiny_overrides

CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it); Playwright downloads no browser
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def sweep_record(tmp_path):
    """A finished 4-trial sweep on synthetic data, some trials pruned; MLflow's store and artifacts under tmp_path."""
    # Few steps, so that the trials still differ when they end; a pruner that stops a trial below the
    # median of the earlier ones at any evaluation.
    overrides = tiny_overrides(tmp_path, study="browse", steps=12) + [
        "sweep.n_trials=4", "trainer.log_every=2", "trainer.eval_every=4", "trainer.checkpoint_every=4",
        "sweeps/pruner=median", "sweep.pruner.n_startup_trials=1", "sweep.pruner.n_warmup_steps=0"]
    done = subprocess.run(sweep_command(overrides), env=sweep_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # And a training run in the same experiment: named by its command line, with CPU and memory samples.
    training = [o for o in overrides if not o.startswith(("sweep.", "sweeps/"))] + [
        f"paths.output_dir={tmp_path}/train", "trainer.steps=40", "tracking.system_metrics_every=0.5",
        "model.dropout=0.3"]
    done = subprocess.run([sys.executable, str(PROJECT_DIR / "src" / "train.py"), *training], env=sweep_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def ui_server(sweep_record, tmp_path):
    """`src/ui.py` on a free port; yields the runs-table address it printed for the sweep's experiment."""
    port = free_port()
    server = subprocess.Popen([sys.executable, str(PROJECT_DIR / "src" / "ui.py"), "--port", str(port),
                               "--backend-store-uri", sweep_record], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=(tmp_path / "ui.log").open("w"), text=True, start_new_session=True)
    try:
        printed = []
        for line in server.stdout:  # ui.py prints the addresses, then becomes `mlflow ui`
            printed.append(line)
            if "://" in line and "workflowType" in line:
                break
        assert printed and "workflowType=machine_learning" in printed[-1], "".join(printed)
        poll(lambda: answers(f"http://127.0.0.1:{port}/health"), "the MLflow UI answering")
        yield printed[-1].split(": ", 1)[1].strip()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session started above: ui.py, now mlflow, and its workers
        server.wait(timeout=30)


def close_assistant(page) -> None:
    """MLflow's chat panel would cover a third of each screenshot."""
    button = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if button.count():
        button.click()


def test_the_printed_address_shows_the_sweep_and_its_trials_in_the_runs_table(ui_server, sweep_record, tmp_path):
    from playwright.sync_api import sync_playwright

    client = MlflowClient(sweep_record)
    [experiment] = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep.role") == "study"]
    [training] = [r for r in runs if "sweep.role" not in r.data.tags]
    trials = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                    key=lambda r: r.info.run_name)
    assert len(trials) == 4
    pruned = [t for t in trials if t.data.tags["optuna.state"] == "pruned"]
    assert pruned and all(" pruned@" in t.info.run_name for t in pruned)
    shots = Path(os.environ.get("TFSWEEP_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    base = ui_server.split("#")[0]
    run_page = f"{base}#/experiments/{experiment.experiment_id}/runs"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 2600, "height": 720})  # the grid draws visible columns only
            page.goto(ui_server)
            parent_link = page.locator(f'a[href$="/runs/{parent.info.run_id}"]')
            parent_link.wait_for(timeout=60_000)
            assert parent_link.inner_text() == parent.info.run_name
            assert page.get_by_role("button", name="Model training").count() == 1  # not the GenAI pages
            close_assistant(page)
            # The saved view: the objective, the test accuracy, the outcome and the searched params as
            # columns, without a click.
            header = page.locator('[role="columnheader"]')
            for name in ("val/accuracy", "test/accuracy", "optuna.state", "model.dropout",
                         "optimizer.learning_rate", "data.batch_size"):
                header.filter(has_text=name).first.wait_for(timeout=30_000)
            page.set_viewport_size({"width": 1600, "height": 720})
            for trial in trials:  # children stay folded under their parent until its button is pressed
                assert not page.locator(f'a[href$="/runs/{trial.info.run_id}"]').is_visible()
            page.screenshot(path=shots / "runs-table.png")

            page.locator('[role="gridcell"]', has=parent_link).get_by_role("button").click()
            for trial in trials:
                link = page.locator(f'a[href$="/runs/{trial.info.run_id}"]')
                link.wait_for(timeout=30_000)
                assert link.inner_text() == trial.info.run_name  # a pruned one's says at which step
            page.screenshot(path=shots / "runs-table-expanded.png")

            # The parent's page opens on the answer: its description names the best trial.
            page.goto(f"{run_page}/{parent.info.run_id}?workflowType=machine_learning")
            page.get_by_text(f"Best: trial {parent.data.tags['best.trial_number']}").wait_for(timeout=30_000)

            # The champion's registered version states its input (float32 [-1, 28, 28]) in its schema.
            page.goto(f"{base}#/models/{parent.data.tags['best.model_uri'].split('/')[1]}/versions/"
                      f"{parent.data.tags['best.model_uri'].split('/')[2]}")
            page.get_by_text("Inputs (1)").wait_for(timeout=30_000)

            # A training run: named by its command line, CPU and memory on its "System metrics" tab, and
            # curves.png with its train and validation curves together.
            assert training.info.run_name.endswith(" dropout=0.3")
            page.goto(f"{run_page}/{training.info.run_id}/system-metrics?workflowType=machine_learning")
            page.get_by_text("cpu_utilization_percentage").first.wait_for(timeout=30_000)
            page.goto(f"{run_page}/{training.info.run_id}/artifacts/curves.png?workflowType=machine_learning")
            curves = page.locator('img[alt="curves.png"]')
            curves.wait_for(timeout=30_000)
            poll(lambda: curves.evaluate("image => image.complete && image.naturalWidth > 0"), "curves.png drawn")

            # A run's pages take the same parameter, or MLflow shows them among its GenAI pages.
            page.set_viewport_size({"width": 1280, "height": 1060})  # train and val charts, one above the other
            page.goto(f"{run_page}/{trials[0].info.run_id}/model-metrics?workflowType=machine_learning")
            page.locator('[data-testid="experiment-view-compare-runs-section-header"]', has_text="val").wait_for(
                timeout=30_000)
            poll(lambda: page.locator(".js-plotly-plot").count() >= 4, "4 metric charts drawn")
            close_assistant(page)
            page.screenshot(path=shots / "run-metrics.png")

            page.set_viewport_size({"width": 1280, "height": 720})
            page.goto(f"{run_page}/{parent.info.run_id}/artifacts/plots/optimization_history.png"
                      "?workflowType=machine_learning")
            plot = page.locator('img[alt="plots/optimization_history.png"]')
            plot.wait_for(timeout=30_000)
            poll(lambda: plot.evaluate("image => image.complete && image.naturalWidth > 0"), "the plot drawn")
            close_assistant(page)
            page.screenshot(path=shots / "sweep-plots.png")
        finally:
            browser.close()
    # `make ui` is quiet: the server's start, not a line per request (--access-log prints them).
    served = (tmp_path / "ui.log").read_text()
    assert "Uvicorn running" in served or "Application startup complete" in served, served[-2000:]
    assert '"GET /' not in served, served[-2000:]
