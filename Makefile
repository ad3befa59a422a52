# One command per task; CI and people use the same targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest-timeout guards against a hung collective; -p no:cacheprovider keeps a fresh clone clean.
PYTEST_ARGS ?= -q -p no:cacheprovider

.PHONY: install test demo lint format bench quality gpu-check clean

install: $(STAMP)

# The pinned CPU stack: torch 2.13.0+cpu, fbgemm-gpu-cpu 1.8.0, then torchrec 1.8.0 without its
# dependency on the CUDA fbgemm-gpu (see README "GPU install" for the CUDA variant).
$(STAMP): requirements/cpu.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip 'setuptools>=77' wheel
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/cpu.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

demo: install
	$(BIN)/python -m pipelines.demo

# Paper-style quality tables: base vs PEP retrain vs magnitude pruning and the controls (uniform-k,
# frequency sizes, PEP sizes at random elements); about two hours on 2 cores.
quality: install
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.quality

# Speed and size benchmarks; each writes JSON + Markdown into benchmarks/results/.
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.train_overhead
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.prepare_spec
	$(BIN)/python -m benchmarks.kernel
	test -d out/demo/runs/search/masks || $(MAKE) demo  # the serving benchmark exports a search run
	$(BIN)/python -m benchmarks.serving --run-dir out/demo/runs/search --retrain-runs out/demo/runs/retrain_10
	$(BIN)/python -m benchmarks.serving_load --run-dir out/demo/runs/retrain_10

# On a CUDA machine with torch + Triton (no TorchRec needed): correctness and speed of the Triton
# kernels, writes benchmarks/results/gpu_check.{json,md}.
gpu-check:
	PEP_GIT_COMMIT=$$(git rev-parse --short HEAD 2>/dev/null) bash benchmarks/gpu_check.sh

# `make test` runs it first: lint errors and unformatted files fail CI.
lint: install
	$(BIN)/ruff check pep_torchrec pipelines tests benchmarks
	$(BIN)/ruff format --check pep_torchrec pipelines tests benchmarks

format: install
	$(BIN)/ruff format pep_torchrec pipelines tests benchmarks

clean:
	rm -rf out runs
