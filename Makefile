# genxai: two commands for a fresh machine.
#   make demo   set up .venv and run the main job on the embedded default, on the CPU
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test test-long lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev,peers]" $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/genxai demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not long" tests

test-long: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m long tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/attribution.py

clean:
	rm -rf $(VENV) runs .pytest_cache
