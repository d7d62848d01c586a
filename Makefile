# Every target installs into .venv with the pinned constraints, so nothing depends on
# what happens to be installed on the machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-all bench bench-wan clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m swarm.launch --peers 3 --outer-steps 8 --config peers/tiny.toml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=20 tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m bench.compression

# needs root: network namespaces, veths and tc (see README)
bench-wan: $(STAMP)
	$(PY) -m bench.allreduce

clean:
	rm -rf $(VENV) build *.egg-info
