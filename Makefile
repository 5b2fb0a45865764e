# fedfusion — two commands on a fresh machine: `make simulate` and `make test`.
# Each creates or reuses .venv, which holds exactly requirements/lock-cpu.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install is from a lock: each package pinned with the sha256 of its files and
# installed with --no-deps, then the project itself on top. `make lock` refreshes them.
#   lock-cpu.txt:  .venv and the container images, with torch's CPU build (2.13.0+cpu).
#   lock-cuda.txt: the same set with the package index's own torch 2.13.0 (built for
#                  CUDA 13.0) and its NVIDIA libraries: the image of a hospital with GPUs.
LOCK := requirements/lock-cpu.txt
LOCK_CUDA := requirements/lock-cuda.txt
# The torch both locks hold: for the CPU lock its local build 2.13.0+cpu, which lies in
# FIND_LINKS (pip's find-links: `pip config list`), for the CUDA lock the index's.
TORCH_SPEC ?= torch==2.13.0
FIND_LINKS ?= /opt/wheels
ARGS ?=

.PHONY: simulate test check bench bench-utility bench-gpu audit docs lint fmt clean venv lock \
	wheelhouse wheelhouse-cuda container-test mlflow-ui

simulate: $(VENV)/.runtime
	$(BIN)/fedfusion simulate $(ARGS)

# Every test, on TEST_WORKERS processes (pytest-xdist): the end-to-end tests spend much of
# their time waiting on other processes, which the second worker fills. The slow ones
# start first (tests/conftest.py). Under 12 minutes on 2 cores.
TEST_WORKERS ?= 2
test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=25 $(ARGS)

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

# On one CUDA GPU, under 5 minutes: the DP step (default model, LoRA), 3 hospitals x 2
# rounds of DP + SecAgg+ training there, predict with the exported model:
# benchmarks/results/gpu.json and gpu.md. Needs torch built for CUDA ($(LOCK_CUDA));
# without a GPU it says so and stops. ARGS="--device cpu --out DIR": every part on the CPU.
bench-gpu: $(VENV)/.runtime
	$(BIN)/python -m benchmarks --suite gpu $(ARGS)

# One-run privacy audit: the ε lower bound beside the accounted ε (--suite mia: the
# membership-inference attacks).
audit: $(VENV)/.runtime
	$(BIN)/python -m benchmarks --suite audit $(ARGS)

# The files of a lock in a folder, for an offline image build: `docker build -f
# deploy/Dockerfile` then installs from there and reaches no network. Each folder keeps a
# copy of its lock (lock.txt): the build refuses wheels made from another lock.
# wheelhouse: the CPU lock into deploy/wheelhouse (torch's CPU build from FIND_LINKS).
# wheelhouse-cuda: the CUDA lock into deploy/wheelhouse-cuda, for a hospital with NVIDIA
# GPUs (`docker build ... --build-arg LOCK=$(LOCK_CUDA) --build-arg WHEELHOUSE=$@`).
wheelhouse: $(VENV)/.locked
	$(BIN)/pip download --quiet --require-hashes --no-deps --dest deploy/wheelhouse -r $(LOCK)
	cp $(LOCK) deploy/wheelhouse/lock.txt

# Its only find-links is the folder itself: torch==2.13.0 would also match the local CPU build.
wheelhouse-cuda: $(VENV)/.locked
	PIP_FIND_LINKS=$(CURDIR)/deploy/wheelhouse-cuda $(BIN)/pip download --quiet \
	  --require-hashes --no-deps --dest deploy/wheelhouse-cuda -r $(LOCK_CUDA)
	cp $(LOCK_CUDA) deploy/wheelhouse-cuda/lock.txt

# Re-resolve both locks from pyproject.toml: its dependencies, the dev extra and the
# dependency groups `install` and `reports` (the latter without its dependencies), for
# Python 3.11 on x86_64 Linux. Pins that still fit are kept; `make lock ARGS=--upgrade`
# takes the newest versions instead. A lock is rewritten only when it changed, and .venv
# is rebuilt only then.
UV_COMPILE = $(BIN)/uv pip compile --quiet --native-tls --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" $(ARGS)
# $(call compile,LOCK,FLAGS): written to .venv first (uv keeps the pins it finds there)
define compile
new=$(VENV)/$(notdir $(1)) && cp $(1) $$new \
 && echo "$(TORCH_SPEC)" | $(UV_COMPILE) pyproject.toml --extra dev --group install \
      --constraint - $(2) --output-file $$new \
 && echo "# Without its dependencies (pyproject.toml, [dependency-groups] reports):" >> $$new \
 && $(UV_COMPILE) --group reports --no-deps --no-header >> $$new \
 && { cmp -s $$new $(1) && rm $$new || mv $$new $(1); }
endef

lock: $(VENV)/.locked
	$(call compile,$(LOCK),--find-links $(FIND_LINKS))
	$(call compile,$(LOCK_CUDA),)

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

# A fresh environment holding exactly the lock, rebuilt whenever the lock changes (so
# that nothing the lock dropped stays behind). tests/test_lock.py checks it.
$(VENV)/.locked: $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	touch $@

# The project, editable (`fedfusion server` submits the Flower app from this folder).
$(VENV)/.runtime: $(VENV)/.locked pyproject.toml
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The lock holds the dev extra too: `make test` runs in the environment `make simulate` uses.
$(VENV)/.dev: $(VENV)/.runtime
	touch $@

clean:
	rm -rf $(VENV) .venv-mlflow runs .pytest_cache .ruff_cache .hypothesis deploy/wheelhouse/*.whl \
	  deploy/wheelhouse/lock.txt
