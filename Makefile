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

.PHONY: setup data demo study test test-fast reliability-report bench-data bench-speed bench-farm bench-step gpu-bundle gpu-check-dry shards clean
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

# The depth study (docs/studies/): its lr sweep, then the study. Finished cells are skipped (their results are kept
# in docs/studies/<study>/cells), an interrupted one resumes: re-run to continue. One thread per cell; for device-hours
# comparable with the committed ones pin it to one core: taskset -c 0 make study. STUDIES=... runs others.
STUDIES ?= studies/fmnist-depth-tune.yaml studies/fmnist-depth.yaml
study: setup data
	for s in $(STUDIES); do $(BIN)/python launch/study.py $$s || exit $$?; done

test: setup data
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup data
	$(BIN)/python -m pytest -q -m "not slow"

# docs/reliability.md: the fault-injection, refusal and resume tests run, their outcomes as one table (the Slurm
# ones need root; ARGS='-m "not slurm"' leaves them out)
reliability-report: setup data
	$(BIN)/python tests/reliability_report.py $(ARGS)

# Decode + augment throughput of the ImageFolder and webdataset paths, every data.backend that runs here
# (img/s per core; docs/benchmarks.md). DALI rows need nvidia-dali-cuda130 (the test extra installs it).
# Then the device augmentation image by image vs per batch: ops and host ms per image (bench_aug.py).
bench-data: setup
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_aug.py --batch 256 --check

# Training-step img/s with and without each fast path of the speed: section (docs/benchmarks.md)
bench-speed: setup
	$(BIN)/python benchmarks/bench_speed.py

# ImageFolder tree -> webdataset shards: make shards SRC=/datasets/imagenet OUT=/datasets/imagenet-wds
shards: setup
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shards SRC=imagefolder-root OUT=shard-dir [SHARD_SIZE=1000]"; exit 2; }
	$(BIN)/python launch/make_shards.py $(SRC) $(OUT) --shard-size $(or $(SHARD_SIZE),1000)

# each module group's incubation throughput alone vs all groups at once (docs/benchmarks.md)
bench-farm: setup data
	$(BIN)/python benchmarks/bench_farm.py --groups 2 --ranks-per-group 1
	$(BIN)/python benchmarks/bench_farm.py --groups 2 --ranks-per-group 2

# CPU, one run: our loop vs a bare PyTorch loop, module-0 incubation vs the paper's step, hybrids vs the target
bench-step: setup
	$(BIN)/python benchmarks/bench_step.py

# What benchmarks/gpu_check.sh needs on a GPU machine with Python $(GPU_PY) and torch but no network: the wheels of
# DeepSpeed and of its requirements (this venv's versions; x86_64 and aarch64), and Fashion-MNIST. ~40 MB.
GPU_BUNDLE ?= build/gpu-bundle
GPU_PY ?= 3.12
GPU_DEPS := einops hjson msgpack ninja psutil py.cpuinfo pydantic pydantic.core annotated.types typing.inspection \
            typing.extensions packaging tqdm pyyaml safetensors
gpu-bundle: setup data
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels $(GPU_BUNDLE)/fashion-mnist
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -c constraints.txt deepspeed -w $(GPU_BUNDLE)/wheels
	pins="$$($(BIN)/pip freeze | grep -iE '^($(shell echo $(GPU_DEPS) | sed 's/\./[-_.]/g; s/ /|/g'))==')"; \
	for arch in x86_64 aarch64; do \
	  $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
	    --abi cp$(subst .,,$(GPU_PY)) --abi abi3 --abi none --platform manylinux2014_$$arch --platform manylinux_2_17_$$arch \
	    --platform manylinux_2_28_$$arch --platform any -d $(GPU_BUNDLE)/wheels $$pins || exit 1; \
	done
	cp $(FMNIST)/*-ubyte.gz $(GPU_BUNDLE)/fashion-mnist/
	du -sh $(GPU_BUNDLE)

# the GPU check's steps on this CPU at toy sizes (what tests/test_gpu_check.py runs)
gpu-check-dry: setup data
	bash benchmarks/gpu_check.sh --dry-run --out runs/gpu-check-dry

clean:
	rm -rf runs .pytest_cache
