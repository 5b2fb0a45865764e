# fedfusion — two commands on a fresh machine: `make simulate` and `make test`.
# Each creates or reuses .venv and installs exactly what it needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip takes the local CPU wheel for exactly this spec. Any other torch
# spec, or an unpinned torch pulled in later, downloads the CUDA build: every later
# install is therefore constrained to the torch that was installed here.
TORCH_SPEC ?= torch==2.13.0
# The Indiana University reports of the embedded default data ship inside this package.
# It must be installed without its declared dependencies (they pull a broken torchvision).
TXV_SPEC ?= torchxrayvision==1.5.7
ARGS ?=

.PHONY: simulate test check bench bench-utility audit docs lint fmt clean venv wheelhouse wheelhouse-cuda \
	container-test mlflow-ui

simulate: $(VENV)/.runtime
	$(BIN)/fedfusion simulate $(ARGS)

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

# The edit-test loop: lint and every fast test (no federation, no real training; a tenth
# of the property-test examples) on two workers, under 3 minutes on 2 cores.
check: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	FEDFUSION_TEST_TIER=fast $(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider -n 2 $(ARGS)

# DP step cost, SecAgg+ and deployment cost, 10/50/100 hospitals, time to first result,
# bytes per encoder mode: benchmarks/results/perf.json and perf.md (the latest run only).
bench: $(VENV)/.runtime
	$(BIN)/python -m benchmarks $(ARGS)

# Utility: centralized vs federated vs DP vs SecAgg+, fused vs single branch, 3 seeds.
bench-utility: $(VENV)/.runtime
	$(BIN)/python -m benchmarks --suite utility $(ARGS)

# Membership-inference audit: an overfitted non-private model vs the DP one.
audit: $(VENV)/.runtime
	$(BIN)/python -m benchmarks --suite audit $(ARGS)

# Every wheel the container images need (torch's CPU build included) in deploy/wheelhouse,
# so that `docker build -f deploy/Dockerfile` installs from there and reaches no network.
# wheelhouse-cuda: the same in deploy/wheelhouse-cuda for a hospital with NVIDIA GPUs, with
# the package index's own torch 2.13.0 (built for CUDA 13.0) and its NVIDIA libraries
# (`docker build ... --build-arg WHEELHOUSE=deploy/wheelhouse-cuda`).
WHEELHOUSE := deploy/wheelhouse
WHEELHOUSE_TORCH = -c $(VENV)/constraints.txt $(TORCH_SPEC)
wheelhouse-cuda: WHEELHOUSE := deploy/wheelhouse-cuda
# `===`, and no find-links: only the index's build, never the local CPU wheel
wheelhouse-cuda: WHEELHOUSE_TORCH = "torch===2.13.0"
wheelhouse-cuda: export PIP_FIND_LINKS =
wheelhouse wheelhouse-cuda: $(VENV)/.runtime
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELHOUSE) $(WHEELHOUSE_TORCH) .
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELHOUSE) --no-deps $(TXV_SPEC)
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELHOUSE) $$($(BIN)/python -c \
	  "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])")
	rm -f $(WHEELHOUSE)/fedfusion-*.whl

# Builds the server and hospital images and runs a TLS federation of them on loopback
# (3 hospitals, DP, SecAgg+, one hospital container killed in the last round). Needs a
# running Docker engine; takes 15-40 minutes; not part of `make test`. ARGS=--cuda-hospital
# also builds the CUDA hospital image (make wheelhouse-cuda first) and runs one hospital
# from it. Summary:
# benchmarks/results/containers.json and docs/containers.md.
container-test: $(VENV)/.dev wheelhouse
	$(BIN)/python -m tests.support.container_test $(ARGS)

# Open the MLflow UI on the runs `make simulate` logged (runs/mlflow.db), at
# http://127.0.0.1:5000. Its own environment (.venv-mlflow): the UI's server needs far
# more than fedfusion's MLflow client does.
mlflow-ui: $(VENV)/.runtime
	test -x .venv-mlflow/bin/mlflow || ($(PYTHON) -m venv .venv-mlflow && \
	  .venv-mlflow/bin/pip install --quiet "mlflow==$$($(BIN)/python -c 'import mlflow; print(mlflow.__version__)')")
	MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true .venv-mlflow/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --host 127.0.0.1 --port 5000 $(ARGS)

# The doc tables that mirror code: docs/configuration.md (every key and its help), the
# fault table in docs/faults.md and what a hospital sends in docs/privacy.md.
# tests/test_docs.py fails when one is stale.
docs: $(VENV)/.dev
	$(BIN)/python -m tests.support.docs

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

venv: $(VENV)/.runtime

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	touch $@

$(VENV)/.runtime: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e .
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt --no-deps $(TXV_SPEC)
	touch $@

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) .venv-mlflow runs .pytest_cache .ruff_cache .hypothesis deploy/wheelhouse/*.whl
