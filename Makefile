# make demo: the main job on the embedded demo dataset. make test: the whole test suite.
# Both create and install .venv (Python 3.11) when it is missing or older than pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PARAMS ?= params.yaml

.PHONY: setup demo test clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mulcon make-demo --params $(PARAMS)
	$(PY) -m mulcon prepare --params $(PARAMS)
	$(PY) -m mulcon train --params $(PARAMS) --stage pretrain
	$(PY) -m mulcon train --params $(PARAMS) --stage finetune
	$(PY) -m mulcon evaluate --params $(PARAMS)

test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf data/demo prepared/demo runs reports
