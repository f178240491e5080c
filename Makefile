# Two entry points: `make demo` and `make test`. Both create .venv on first use and reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

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

demo: venv
	$(PY) -m pipeline.config configs/tiny_cpu.yaml

clean:
	rm -rf runs/demo data/synthetic32
