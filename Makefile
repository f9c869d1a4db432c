# Two commands on a fresh machine: `make demo` (the offline end-to-end run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so the range in pyproject never pulls a different (CUDA) build
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/audio-residual demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks *.ipynb
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) runs cache
