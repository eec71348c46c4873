# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST ?= /usr/share/datasets/fashion-mnist
# torch + torchvision pair that runs here (CUDA builds, also fine on CPU); aarch64 has a CPU pair.
ifeq ($(shell uname -m),aarch64)
TORCH  ?= torch==2.9.1 torchvision==0.24.1
else
TORCH  ?= torch==2.14.1 torchvision==0.29.1
endif
# Everything runs as in the activated venv (its ninja builds DeepSpeed's JIT ops, as in the Slurm jobs).
export PATH := $(abspath $(BIN)):$(PATH)
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)

.PHONY: setup data demo test test-fast reliability-report bench-data bench-farm shards clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	# DeepSpeed's setup imports torch: build it against the torch installed above.
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -e '.[test]'
	touch $@

data:
	@if [ ! -f $(FMNIST)/t10k-labels-idx1-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing from $(FMNIST): run 'sudo apt-get install dataset-fashion-mnist'," \
	         "or put the four *-ubyte.gz files of zalandoresearch/fashion-mnist in a directory and pass" \
	         "FMNIST=that/dir (and data.root=that/dir to the recipe)"; exit 1; \
	  fi; \
	fi

demo: setup data
	$(BIN)/python launch/pipeline.py recipes/demo-fmnist.yaml data.root=$(FMNIST)

test: setup data
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow"

# docs/reliability.md: the fault-injection, refusal and resume tests run, their outcomes as one table (the Slurm
# ones need root; ARGS='-m "not slurm"' leaves them out)
reliability-report: setup data
	$(BIN)/python tests/reliability_report.py $(ARGS)

# Decode + augment throughput of the ImageFolder and webdataset paths (img/s per core; docs/benchmarks.md).
bench-data: setup
	$(BIN)/python benchmarks/bench_data.py

# ImageFolder tree -> webdataset shards: make shards SRC=/datasets/imagenet OUT=/datasets/imagenet-wds
shards: setup
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shards SRC=imagefolder-root OUT=shard-dir [SHARD_SIZE=1000]"; exit 2; }
	$(BIN)/python launch/make_shards.py $(SRC) $(OUT) --shard-size $(or $(SHARD_SIZE),1000)

# each module group's incubation throughput alone vs all groups at once (docs/benchmarks.md)
bench-farm: setup data
	$(BIN)/python benchmarks/bench_farm.py --groups 2 --ranks-per-group 1
	$(BIN)/python benchmarks/bench_farm.py --groups 2 --ranks-per-group 2

clean:
	rm -rf runs .pytest_cache
