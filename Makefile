# Two commands do all set-up on a fresh machine:
#   make demo   quantizes a tiny synthetic DeepSeek-V3-layout model end to end (CPU; about 15 s once installed)
#   make test   runs the linter and the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first: anything else would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,tiktoken]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	rm -rf demo
	$(BIN)/streamq synth demo/tiny-deepseek
	$(BIN)/streamq run demo/tiny-deepseek demo/tiny-deepseek-w4a16 --num-samples 16 --seq-len 128
	$(BIN)/streamq eval demo/tiny-deepseek demo/tiny-deepseek-w4a16 --num-samples 4 --seq-len 128

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

.PHONY: install demo test
