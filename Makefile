# Two commands on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NETBUILD := $(BIN)/netbuild
# Tests run in parallel on every core; PyTensor's compile cache is shared and locked.
PYTEST_WORKERS ?= auto

.PHONY: demo test test-slow fuzz data docs bench bench-threads bench-onnx bench-sweep bench-tune bench-gpu bench-data bench-data-paired clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,tune,mlflow,jax]'
	touch $(STAMP)

demo: $(STAMP)
	$(NETBUILD) check configs/digits-mlp.yaml
	$(NETBUILD) train configs/digits-mlp.yaml --overwrite
	$(NETBUILD) eval runs/digits-mlp

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q -m slow

# Many more mutated and garbage specs through `netbuild check` than `make test` runs.
fuzz: $(STAMP)
	NETBUILD_FUZZ_CASES=20000 $(BIN)/python -m pytest -q tests/test_fuzz_specs.py

# Regenerate configs/data/*.npz from the data sets scikit-learn bundles.
data: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[data]'
	$(BIN)/python configs/data/make_data.py

# netbuild against PyTorch (CPU) on an MLP, a CNN, an LSTM, a GRU and a transformer block, with
# SGD-momentum and Adam, each tool at its default threads and on one: samples/s, the speed-up from
# the second core, netbuild's jax backend beside its c backend, the MLP's matrix-product bound,
# compile times and peak memory -> bench/RESULTS.md (about 15 minutes).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench.py

# What the second core (every core) gives netbuild alone, 1- and all-thread epochs alternating in
# one process (bench/RESULTS-threads.md, about 3 minutes).
bench-threads: $(STAMP)
	$(BIN)/python bench/threads.py

# The shipped digits CNN exported to ONNX: onnxruntime against `netbuild predict` at batch 1 and
# 256, each at its default threads and on one (bench/RESULTS-onnx.md, about a minute).
bench-onnx: $(STAMP)
	$(BIN)/python bench/export.py

# Training on 8 GiB of memory-mapped shards (written by netbuild.savez, and again by numpy.savez)
# against the in-memory path on 1 GiB of the same rows: samples/s and peak resident memory
# (bench/RESULTS-data.md; needs 18 GiB of free disk, about ten minutes).
bench-data: $(STAMP)
	$(BIN)/python bench/data.py

# The same rows read in place, copied out with pread, and in memory, epochs alternating in one
# process (bench/RESULTS-data-paired.md; needs 3 GiB of free disk, a few minutes).
bench-data-paired: $(STAMP)
	$(BIN)/python bench/data_paired.py

# Wall time of an 8-point `netbuild sweep` on 1 and 2 local Dask workers (bench/RESULTS-sweep.md).
bench-sweep: $(STAMP)
	$(BIN)/python bench/sweep.py

# `netbuild tune --trials 40` (TPE, Hyperband) against the full 48-point `netbuild sweep` grid over
# the same four ranges of digits-mlp: best validation accuracy and epochs trained
# (bench/RESULTS-tune.md, several minutes).
bench-tune: $(STAMP)
	$(BIN)/python bench/tune.py

# netbuild's jax backend against PyTorch on one GPU, at sizes worth one (bench/RESULTS-gpu.md,
# about 3 minutes). Needs JAX's and PyTorch's CUDA builds installed; stops without a GPU.
bench-gpu: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench,jax]'
	$(BIN)/python bench/gpu.py

# Regenerate docs/spec.md from the JSON Schema.
docs: $(STAMP)
	$(BIN)/python -m netbuild.spec.reference > docs/spec.md

clean:
	rm -rf $(VENV) runs .pytest_cache
