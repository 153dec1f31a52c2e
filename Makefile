# seismo: the two commands of the README.
#   make demo   set up from nothing and run the qk-layernorm instability study, ending in figures
#   make test   set up from nothing and run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-random demo lint bench clean

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "seismo needs $(PYTHON) (Python 3.11+); set PYTHON=..."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null  # notebooks run in the venv
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q -p no:randomly

# The same suite in a random order (pytest-randomly; the seed is printed, -p randomly:SEED repeats it).
test-random: install
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports

demo: install
	$(BIN)/seismo sweep configs/studies/qk_layernorm.yaml --out runs/qk_layernorm
	$(BIN)/seismo report runs/qk_layernorm

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache
