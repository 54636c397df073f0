# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv services demo test test-fast lint typecheck pytest bench clean

venv: $(STAMP)

# torch first and alone: pip takes the pinned CPU build from the local disk;
# resolving it together with the rest could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dynamix demo --out demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check dynamix_ray pipelines benchmarks tests
	$(VENV)/bin/ruff format --check dynamix_ray pipelines benchmarks tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy dynamix_ray

# Services and tools the tests start themselves (tests/test_online.py runs
# its own redis-server on 127.0.0.1 and stops it; tests/test_wrk.py runs wrk
# against a loopback server): Debian's packages, installed once.
services:
	@command -v redis-server >/dev/null && command -v wrk >/dev/null || { \
	  echo "installing redis-server and wrk (Debian) for the online-store and load-client tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server wrk >/dev/null; }

pytest: $(STAMP) services
	$(PY) -m pytest

test: lint typecheck pytest

# The plain-core tests only (no Ray, no cluster, no HTTP, nothing slow): the
# markers are set from each test's fixtures in tests/conftest.py. RAY_ADDRESS
# points at a closed port, so an unmarked test that reaches for Ray fails (on
# its timeout) instead of quietly starting its own.
test-fast: $(STAMP) services
	RAY_ADDRESS=127.0.0.1:9 $(PY) -m pytest --timeout 60 \
	  -m "not ray and not cluster and not http and not slow"

bench: $(STAMP)
	$(PY) benchmarks/segment.py

clean:
	rm -rf demo_out .pytest_cache .mypy_cache .ruff_cache
