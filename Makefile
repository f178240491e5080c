# Two entry points: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The venv's tools first: DeepSpeed builds its CPU comm op with ninja, and the venv's ninja and
# the system's record builds differently, so mixing them rebuilds the op (minutes) every time.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# OpenMP threads that spin-wait for a busy core make torch many times slower on a shared machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo demo-results test test-unit lint venv clean gpu-wheels

venv: $(VENV)/.installed

# torch first, from the pinned release the machines serve locally; then the project and extras.
# onnxruntime-gpu only: it runs on the CPU too, and must never sit beside plain onnxruntime.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[train,export,app,dev]'
	touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# ruff (lint, and the formatter in --check mode) over the tree, mypy over the files pyproject.toml
# names; any finding fails. `.venv/bin/ruff format .` applies the layout.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# --- the demo: synthetic faces (or CELEBAHQ=/path/to/images) -> DeepSpeed on 2 CPU processes
# -> ONNX (EMA and online weights) -> the NumPy sampling core through onnxruntime -> scores -> benchmark.
# Data and training reuse what is done (their own checks); the rest are file targets that are
# remade only when the newest checkpoint changes.
DEMO_SYNTHETIC ?= 3000
ifdef CELEBAHQ
# A run of its own: a finished synthetic-face training must not be reused for real images.
DEMO_RUN ?= runs/demo-celebahq
DEMO_DATA ?= data/celebahq32
DEMO_SOURCE := --src $(CELEBAHQ)
else
DEMO_RUN ?= runs/demo
DEMO_DATA ?= data/synthetic32
DEMO_SOURCE := --synthetic $(DEMO_SYNTHETIC)
endif
DEMO_SAMPLES := $(DEMO_RUN)/samples
# Extra config overrides / evaluate flags (the integration test shrinks the demo with these).
DEMO_TRAIN_ARGS ?=
DEMO_EVAL_ARGS ?=
# Images per scored sample set and of the val floor: Fréchet distances only compare at equal N.
DEMO_NUM ?= 256
# The sampler that holds quality at the fewest network calls (`python -m benchmarks quality` on the demo
# model, benchmarks/results/cpu/quality): pipeline.core.sampling's default, written out for the set names.
DEMO_SAMPLER ?= unipc
DEMO_STEPS ?= 10
DEMO_FAST := $(DEMO_SAMPLER)-$(DEMO_STEPS)
SAMPLE := $(PY) -m export.sample --num $(DEMO_NUM) --batch 64 --seed 0
# Its mtime moves whenever a checkpoint is added or pruned: the exports below follow it.
CHECKPOINTS := $(DEMO_RUN)/checkpoints
SHELL := bash
.SHELLFLAGS := -eo pipefail -c

demo: venv
	$(PY) -m data_prep $(DEMO_SOURCE) --out $(DEMO_DATA) --size 32 --val-fraction 0.1
	OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m pipeline.train --config configs/tiny_cpu.yaml \
		data.shards=$(DEMO_DATA) run.dir=$(DEMO_RUN) $(DEMO_TRAIN_ARGS)
	$(MAKE) --no-print-directory demo-results

demo-results: $(DEMO_RUN)/scores.txt $(DEMO_RUN)/bench/sampler.md
	@echo
	@cat $(DEMO_RUN)/scores.txt
	@echo
	@sed -n '/^## Targets/,/^## NumPy/p' $(DEMO_RUN)/bench/sampler.md | grep '^|'
	@echo
	@echo "grid of faces:   $(DEMO_SAMPLES)/grid.png   (EMA, $(DEMO_FAST); training previews beside it)"
	@echo "checkpoint:      $$(ls -d $(CHECKPOINTS)/step_* | tail -n 1)"
	@echo "ONNX denoiser:   $(DEMO_RUN)/denoiser.onnx (+ denoiser.onnx.json); online weights: denoiser_model.onnx"
	@echo "scores:          $(DEMO_RUN)/scores.json   benchmark: $(DEMO_RUN)/bench/sampler.md"
	@echo "try it:          $(PY) -m export.app --model $(DEMO_RUN)/denoiser.onnx   (http://127.0.0.1:7860)"

$(CHECKPOINTS):
	@echo "error: $(CHECKPOINTS): no checkpoints yet; 'make demo' trains first" >&2; exit 2
$(DEMO_RUN)/denoiser.onnx: $(CHECKPOINTS)
	$(PY) -m export.onnx --ckpt $(DEMO_RUN) --out $@
$(DEMO_RUN)/denoiser_model.onnx: $(CHECKPOINTS)
	$(PY) -m export.onnx --ckpt $(DEMO_RUN) --weights model --out $@

$(DEMO_SAMPLES):  # the training writes its previews here, unless log.sample_every=0
	mkdir -p $@

# The grid and the scored sets use the fast sampler; DDIM-50 with eta 1 (50 calls) is the reference row.
$(DEMO_SAMPLES)/ema_$(DEMO_FAST).npz: $(DEMO_RUN)/denoiser.onnx | $(DEMO_SAMPLES)
	$(SAMPLE) --model $< --sampler $(DEMO_SAMPLER) --steps $(DEMO_STEPS) --out $@ --grid $(DEMO_SAMPLES)/grid.png
$(DEMO_SAMPLES)/model_$(DEMO_FAST).npz: $(DEMO_RUN)/denoiser_model.onnx | $(DEMO_SAMPLES)
	$(SAMPLE) --model $< --sampler $(DEMO_SAMPLER) --steps $(DEMO_STEPS) --out $@
$(DEMO_SAMPLES)/ema_ddim50_eta1.npz: $(DEMO_RUN)/denoiser.onnx | $(DEMO_SAMPLES)
	$(SAMPLE) --model $< --sampler ddim --steps 50 --eta 1 --out $@

DEMO_SETS := ema_$(DEMO_FAST) model_$(DEMO_FAST) ema_ddim50_eta1
$(DEMO_RUN)/scores.txt: $(DEMO_SETS:%=$(DEMO_SAMPLES)/%.npz)
	$(PY) -m pipeline.evaluation --shards $(DEMO_DATA) --floor --out $(DEMO_RUN)/scores.json $(DEMO_EVAL_ARGS) \
		--samples "EMA $(DEMO_FAST)=$(DEMO_SAMPLES)/ema_$(DEMO_FAST).npz" \
		--samples "online $(DEMO_FAST)=$(DEMO_SAMPLES)/model_$(DEMO_FAST).npz" \
		--samples "EMA DDIM-50 eta 1=$(DEMO_SAMPLES)/ema_ddim50_eta1.npz" | tee $@.tmp
	mv $@.tmp $@

# It times the demo's architecture with random weights (speed does not depend on what was learned),
# so it follows the config, not the checkpoint.
$(DEMO_RUN)/bench/sampler.md: configs/tiny_cpu.yaml
	$(PY) -m benchmarks sampler --quick --out $(DEMO_RUN)/bench

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)

# --- wheels for a lent GPU machine: Python 3.12, x86-64, no package registry, 64 MiB per call.
# What `python -m benchmarks gpu` needs beyond that machine's image, at this venv's versions.
# DeepSpeed publishes only a source archive: its pure-Python wheel is built here (ops are JIT-built
# there); pydantic-core is the one binary. TensorRT and onnxruntime-gpu are far larger: absent there.
# There: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site:.
GPU_WHEELS ?= .whl
GPU_WHEEL_PACKAGES := hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
	webdataset braceexpand submitit diffusers importlib-metadata lazy-importer
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels: venv
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) \
		deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(PY) -c 'import importlib.metadata as m, sys; \
		print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEEL_PACKAGES))
	@ls $(GPU_WHEELS)
	@size=$$(du -sm $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS) | wc -l) wheels, $$size MiB"; \
		test $$size -lt 60 || { echo "error: $(GPU_WHEELS) is $$size MiB, over the 60 MiB left of a 64 MiB call" >&2; exit 1; }
