# `make test` and `make demo` each build .venv on first use, install the
# package into it (editable, with the test, offline-data, rtl and sweep extras) and run.
# CONSTRAINTS=constraints.txt installs the tested versions (.ci/run does).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS ?=

.PHONY: test demo bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,data,rtl,sweep]"
	touch $(STAMP)

test: $(STAMP)
	@command -v iverilog >/dev/null || echo "make test: iverilog not found, the RTL tests will be skipped (Debian: apt-get install -y iverilog; QS4D_REQUIRE_RTL=1 makes them fail instead)"
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/smnist_qat.py

bench: $(STAMP)
	$(PY) benchmarks/bench_s4d.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
