# The README's two commands: `make run` (set up + main job) and `make test` (set up + all tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MPLBACKEND := Agg
export WANDB_MODE ?= disabled
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# Real GLUE files for tests and the GLUE step of `make run`; override with your own GLUE-format folder.
export CONCEPT_NB_GLUE_DIR ?= $(abspath ../shared/data/glue)

.PHONY: install test test-nbs test-py sync-check lint run docs outputs bench clean-nbs export readme browser widgets-js \
  experiment-log

# Install output (pip, setuptools) goes to .venv/install.log, printed only when the install fails.
$(STAMP): constraints.txt settings.ini setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (log: $(VENV)/install.log) ..."
	@{ $(BIN)/pip install -q --upgrade pip && \
	   $(BIN)/pip install -q -c constraints.txt torch==2.13.0 && \
	   $(BIN)/pip install -q -c constraints.txt -e ".[dev]" && \
	   $(BIN)/python -m ipykernel install --sys-prefix --name python3; } >$(VENV)/install.log 2>&1 || \
	  { cat $(VENV)/install.log; echo "install failed: the log above is $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Notebooks are clean and the library is what nbdev_export makes of them.
sync-check: install
	bash .ci/sync_check.sh $(BIN)

# ruff (rules in pyproject.toml: F, E9, B, E501 at 120 characters) over the exported library, tests and benchmarks;
# .ci/lint.py drops only the long lines nbdev writes itself (each module's `__all__` block and one-line docstring).
lint: install
	$(BIN)/python .ci/lint.py $(BIN)/ruff concept_nb tests benchmarks

# Notebooks that commit outputs run in tests/test_outputs.py instead, which also compares their outputs.
WITH_OUTPUTS = $(BIN)/python -c "import re; from concept_nb.docs import notebooks_with_outputs as f; \
  print('^(' + '|'.join(re.escape(p.name) for p in f()) + ')$$')"
test-nbs: install
	OMP_NUM_THREADS=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/nbdev_test --n_workers 2 --timing \
	  --skip_file_re "$$($(WITH_OUTPUTS))"

# Debian's Chromium for the docs browser test (skipped with a reason when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  || echo "chromium not installed: the docs browser test will be skipped"; }

# @jupyter-widgets/html-manager (npm) renders saved widget state offline for the live-explorer browser test (skipped
# with a reason when it cannot be fetched).
HTML_MANAGER := .cache/html-manager/package/dist/embed.js
widgets-js:
	@test -f $(HTML_MANAGER) || { command -v npm >/dev/null 2>&1 && mkdir -p .cache/html-manager && \
	  (cd .cache/html-manager && npm pack -q @jupyter-widgets/html-manager@1.0.15 >/dev/null 2>&1 && \
	   tar xzf jupyter-widgets-html-manager-1.0.15.tgz) \
	  || echo "@jupyter-widgets/html-manager not installed: the live-explorer browser test will be skipped"; }

test-py: install browser widgets-js
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest tests -q -x --durations=10

test: sync-check lint test-nbs test-py

run: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/concept-nb main

experiment-log: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/concept-nb experiment-log

# The searchable site in _docs/ from the committed outputs (concept_nb.docs.build_docs; config in nbs/mkdocs.yml).
docs: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/concept-nb docs

# Re-execute the notebooks that commit outputs (index and module notebooks), in place; commit the result.
outputs: install
	OMP_NUM_THREADS=1 PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -c \
	  "from concept_nb.docs import update_outputs; update_outputs()"

# The benchmark scripts (benchmarks/README.md); BENCH=step etc. for one of them.
BENCH ?= all
bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/concept-nb bench $(BENCH)

export: install
	$(BIN)/nbdev_export
clean-nbs: install
	$(BIN)/nbdev_clean

readme: install
	$(BIN)/python -c "from concept_nb.docs import write_readme; print(write_readme())"
