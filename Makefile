# The same targets locally and in CI (.ci/run calls `make test`).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Two stamps: the runtime package alone (make run), and with the test and bench extras
# (make test). Installing the extras also satisfies the runtime stamp.
RUN_STAMP := $(VENV)/.runtime-stamp
STAMP  := $(VENV)/.installed-stamp
# Debian packages some tests and the benchmark drive as real peers.
SYSTEM_PACKAGES := strace prometheus nginx-light wrk age redis-server

.PHONY: run test test-fast lint system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/zrproxy serve

# Installs the Debian tools the tests need when they are missing and we are root.
# Without root or apt-get the tests that need them skip and say why.
system-deps:
	@missing=""; \
	for tool in strace:strace prometheus:prometheus promtool:prometheus nginx:nginx-light wrk:wrk age:age redis-server:redis-server; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	      || echo "WARNING: could not install$$missing; tests needing them will skip"; \
	  else \
	    echo "WARNING: not root or no apt-get; cannot install$$missing; tests needing them will skip"; \
	  fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check zrproxy tests bench
	$(VENV)/bin/ruff format --check zrproxy tests bench
	$(VENV)/bin/mypy

# The whole suite: lint, the functional pass, then the memray pass (capture files on
# /dev/shm so even test artefacts never touch disk; the system allocator so memray
# sees every allocation and free, as its docs advise for leak checks).
MEMRAY_DIR := /dev/shm/zrproxy-memray
test: $(STAMP) system-deps lint
	$(PY) -m pytest -m "not memray" -p no:memray
	rm -rf $(MEMRAY_DIR)
	PYTHONMALLOC=malloc $(PY) -m pytest -m memray --memray --memray-bin-path=$(MEMRAY_DIR)
	rm -rf $(MEMRAY_DIR)

# The unit and end-to-end tiers, without the proofs (subprocesses, memory scans, strace).
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit tests/e2e -m "not memray and not slow" -p no:memray -x -q

bench: $(STAMP) system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
