# `make test` and `make demo` each build .venv on first use, install the
# package into it (editable, with the test, offline-data and sweep extras) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,data,sweep]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/smnist_qat.py

bench: $(STAMP)
	$(PY) benchmarks/bench_s4d.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
