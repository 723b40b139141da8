# patholite: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# pytest-xdist workers for the test targets; each gets its share of the cores (tests/conftest.py)
TEST_WORKERS ?= 2
# CPU timing and thread defaults for a small shared machine; W&B never needs a network unless asked.
export WANDB_MODE ?= offline
export TORCH_DEVICE_BACKEND_AUTOLOAD ?= 0

.PHONY: install wheel demo test test-slow lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# a wheel in dist/ (configs included: conf/ ships as patholite.conf); `pip install dist/patholite-*.whl`
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps -w dist .

demo: $(STAMP)
	$(PY) -m patholite.train -m experiment=demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

clean:
	rm -rf outputs .pytest_cache .ruff_cache build dist
