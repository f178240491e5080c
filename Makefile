# Two entry points: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The venv's tools first: DeepSpeed builds its CPU comm op with ninja, and the venv's ninja and
# the system's record builds differently, so mixing them rebuilds the op (minutes) every time.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# OpenMP threads that spin-wait for a busy core make torch many times slower on a shared machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-unit venv clean

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

# --- the demo: synthetic faces (or CELEBAHQ=/path/to/images) -> DeepSpeed on 2 CPU processes
# -> ONNX -> NumPy DDIM through onnxruntime -> scores. Every step reuses what is already done.
DEMO_RUN ?= runs/demo
DEMO_SAMPLES := $(DEMO_RUN)/samples
ifdef CELEBAHQ
DEMO_DATA ?= data/celebahq32
DEMO_SOURCE := --src $(CELEBAHQ)
else
DEMO_DATA ?= data/synthetic32
DEMO_SOURCE := --synthetic 2000
endif
DEMO_NUM ?= 256
SAMPLE := $(PY) -m export.sample --num $(DEMO_NUM) --batch 64 --seed 0

demo: venv
	$(PY) -m data_prep $(DEMO_SOURCE) --out $(DEMO_DATA) --size 32
	OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m pipeline.train --config configs/tiny_cpu.yaml \
		data.shards=$(DEMO_DATA) run.dir=$(DEMO_RUN)
	$(PY) -m export.onnx --ckpt $(DEMO_RUN) --out $(DEMO_RUN)/denoiser.onnx
	$(PY) -m export.sample --model $(DEMO_RUN)/denoiser.onnx --sampler ddim --steps 50 --num 64 --out $(DEMO_SAMPLES)/grid.png
	$(SAMPLE) --model $(DEMO_RUN)/denoiser.onnx --sampler ddim --steps 50 --out $(DEMO_SAMPLES)/ema_ddim50.npz
	$(SAMPLE) --model $(DEMO_RUN)/denoiser.onnx --sampler ddpm --steps 250 --out $(DEMO_SAMPLES)/ema_ddpm250.npz
	$(PY) -m pipeline.evaluate --shards $(DEMO_DATA) --floor --out $(DEMO_RUN)/scores.json \
		--samples "EMA DDIM-50=$(DEMO_SAMPLES)/ema_ddim50.npz" \
		--samples "EMA DDPM-250=$(DEMO_SAMPLES)/ema_ddpm250.npz"
	$(PY) -m benchmarks sampler --quick --out $(DEMO_RUN)/bench
	@echo
	@echo "grid of faces:   $(DEMO_SAMPLES)/grid.png   (training previews beside it)"
	@echo "checkpoint:      $$(ls -d $(DEMO_RUN)/checkpoints/step_* | tail -n 1)"
	@echo "ONNX denoiser:   $(DEMO_RUN)/denoiser.onnx (+ denoiser.json)"
	@echo "scores:          $(DEMO_RUN)/scores.json     benchmark: $(DEMO_RUN)/bench/"
	@echo "try it:          $(PY) -m export.app --model $(DEMO_RUN)/denoiser.onnx   (http://127.0.0.1:7860)"

clean:
	rm -rf runs/demo data/synthetic32
