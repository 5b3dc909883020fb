# Every target uses the project's virtual environment in .venv, creating it when missing from the
# pinned, hashed versions in requirements.lock (the versions CI tests); `make lock` upgrades them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: stack-up stack-down install lock data train test test-slow test-all sweep bench bench-quick ui clean

install: $(VENV)/.installed
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --require-hashes -r requirements.lock
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

lock: install  ## re-resolve requirements.lock to the newest versions pyproject.toml allows, then reinstall
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra test --generate-hashes --python-version 3.11 \
	  --upgrade --custom-compile-command "make lock" -o requirements.lock
	$(MAKE) install

DATASETS ?=
data: install  ## fetch and verify MNIST and Fashion-MNIST into the data cache (DATASETS="mnist" for one)
	$(PY) src/fetch_data.py $(DATASETS)

train: install  ## train with Hydra overrides: make train ARGS="model.dropout=0.4 trainer.steps=300"
	$(PY) src/train.py $(ARGS)

test: install  ## the fast suite (synthetic data, no network)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-slow: install data  ## real MNIST training and a PostgreSQL-backed sweep
	$(PY) -m pytest -m slow $(ARGS)

test-all: install data
	$(PY) -m pytest $(ARGS)

sweep: install  ## make sweep ARGS="sweep.n_trials=4 trainer.steps=300"
	$(PY) src/sweep.py $(ARGS)

bench: install data  ## the full benchmark; results in bench/results/
	$(PY) -m bench $(ARGS)

bench-quick: install data
	$(PY) -m bench --quick $(ARGS)

# Prints each experiment's runs-table address (MLflow 3 would open its GenAI pages), then serves the UI
# with one web worker and no job runner: make ui ARGS="--port 5050 --host 0.0.0.0"
ui: install  ## browse runs at http://127.0.0.1:5000 (MLFLOW_TRACKING_URI, else ./mlflow.db)
	$(PY) src/ui.py $(ARGS)

stack-up: install  ## PostgreSQL + an authenticated MLflow server in .stack/, for multi-worker sweeps (ARGS=--proxy: and Optuna's storage proxy)
	$(PY) src/stack.py up $(ARGS)

stack-down: install
	$(PY) src/stack.py down $(ARGS)

.PHONY: loadtest
loadtest: install  ## the coordination layer under 16, 32, 64 stand-in workers: make loadtest ARGS="--workers 32"
	$(PY) -m loadtest $(ARGS)

clean:
	rm -rf outputs multirun
