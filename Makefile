# Two commands on a fresh machine: `make demo` (the offline end-to-end run) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow bench gpu-rehearsal docs-figures clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so the range in pyproject never pulls a different (CUDA) build
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -r requirements.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/audio-residual demo --out runs/demo

# one pytest worker per core, each on one thread: toy-sized ops only hand off between threads, and two
# multi-threaded workers (or a worker and a notebook kernel) oversubscribe the cores several times over
ONE_THREAD := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks *.ipynb
	$(ONE_THREAD) $(BIN)/python -m pytest -q -n auto -m "not slow" --durations=15

# the end-to-end runs (demo, notebooks, a whole study twice); CI runs them after `make test`
test-slow: $(STAMP)
	$(ONE_THREAD) $(BIN)/python -m pytest -q -n auto -m slow --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# benchmarks/gpu_check.sh rehearsed without CUDA (docs/gpu.md): CUDA parts skipped, the rest on toy sizes
gpu-rehearsal: $(STAMP)
	OUT=runs/gpu-rehearsal PYTHON=$(BIN)/python bash benchmarks/gpu_check.sh

# the README's demo table and the docs' figures, from the demo's output (run `make demo` first)
docs-figures: $(STAMP)
	$(BIN)/python docs/refresh_figures.py runs/demo

clean:
	rm -rf $(VENV) runs cache
