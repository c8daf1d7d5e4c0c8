# `make run` and `make test` each set everything up first, so a fresh clone
# needs nothing but Python 3.11 and git.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test lint test-slow bench clean remote

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The full DAG on the embedded example with the bundled model.
# Ends with the ten-line run summary (also saved as metrics/summary.json, what `dvc metrics show`
# shows) and where to go next.
run: setup
	$(BIN)/dvc repro
	@echo
	@$(BIN)/domaintune summary --write
	@echo
	@echo "model:   models/export (model card: models/export/README.md; ONNX: models/export/onnx/ and the other variants within their gates, see metrics/export.json)"
	@echo "reports: reports/eval/report.md, reports/audit/, models/drift_baseline/ (monitor reports: reports/monitor/)"
	@echo "plots:   dvc plots show  (writes dvc_plots/index.html, opens without network)"
	@echo "next:    domaintune retrain (record a version)  |  domaintune versions  |  domaintune monitor --batch FILE"

# What CI runs (.ci/run): the linters (ruff; import-linter's layer contracts), then every test
# except those marked slow, in two pytest-xdist workers (a test file stays on one worker, so its fixtures are
# built once; each worker keeps to one thread: tests/conftest.py).
test: setup lint
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test-slow: setup
	$(BIN)/python -m pytest -m slow -q

# The DVC remote versions are pushed to: a local folder next to the repo by default
# (../<repo>-dvc-remote, in .dvc/config.local); `make remote URL=s3://bucket/path` for S3.
remote: setup
	$(BIN)/domaintune remote $(if $(URL),--url $(URL))

clean:
	rm -rf data/ingested data/deduped data/audited models reports dvclive
