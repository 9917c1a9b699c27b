# make demo: the main job (dvc repro) on the embedded demo dataset. make test: the whole test suite.
# Both create and install .venv (Python 3.11) when it is missing or older than pyproject.toml.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python -m mulcon ...`: the venv's python comes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

IMAGE ?= mulcon:$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

.PHONY: setup demo ablation study test bench mlflow-ui clean-demo repro image base-image

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	python -m mulcon make-demo
	dvc add --quiet data
	dvc repro
	@# the MulCon model's registered version: challenger, and champion if it beats the champion
	@python -m mulcon promote || echo "(no promotion: see the line above)"
	@cat reports/ablation.md
	@echo
	@python -c "import json; from mulcon.evaluate import format_table; print(format_table(json.load(open('reports/mulcon/metrics.json'))))"

# make ablation: the demo's Table 3 over three seeds (train.seed and train.seeds 1, 2): per-variant
# mean and standard deviation, paired mAP differences against MulCon with 95% bootstrap intervals.
# dvc exp run leaves train.seeds: [1, 2] in params.yaml (git checkout params.yaml undoes it).
ablation: $(STAMP)
	test -d data/demo || python -m mulcon make-demo
	dvc add --quiet data
	dvc exp run -S 'train.seeds=[1,2]'
	@cat reports/ablation.md

# make study: the demo study (python -m mulcon study; README "What the demo can and cannot tell"): every
# variant's trials on val, the choice, then the chosen settings over 3 seeds on test, into docs/study/.
# It resumes: a trial recorded in docs/study/trials under the same config, code and data is not rerun.
study: $(STAMP)
	test -d data/demo || python -m mulcon make-demo
	dvc add --quiet data
	dvc repro prepare
	python -m mulcon study --params docs/study/recipe.yaml

# make test: two pytest workers (README: the measured times against one worker)
test: $(STAMP)
	python -m pytest -q -n 2

# make bench: benchmarks 1-4 on the CPU (about 5 minutes on 2 cores); benchmark 5 where CUDA is
bench: $(STAMP)
	python -m benchmarks.run_all

mlflow-ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean-demo:
	rm -rf data/demo prepared/demo runs checkpoints reports

# make repro PRESET=configs/paper-coco2014.yaml: the paper's settings as params.yaml, then dvc repro
repro: $(STAMP)
	$(if $(PRESET),cp $(PRESET) params.yaml)
	dvc repro

# make image: the project image (python -m pipeline.image build) with docker or podman, whichever answers
# (docker first), from a wheelhouse that pip download fills here: the build needs no network.
# BASE=cuda: on PyTorch's CUDA image (the clusters' image, pulled); BASE=local: on the Debian 12 base of
# make base-image (mmdebstrap, no registry). Tagged localhost/mulcon:<hash of its inputs> and $(IMAGE).
BASE ?= cuda
image: $(STAMP)
	python -m pipeline.image build --base $(BASE) --tag $(IMAGE)

base-image: $(STAMP)
	python -m pipeline.image base
