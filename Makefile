# LoRA Composer developer commands. Everything installs into a cache folder outside the repo.
#   make demo   run the example graphs headless on a tiny in-memory model
#   make test   run the test suite (engine ComfyUI 0.9.2, plus a complete checkout when one is available)
#   make bench  benchmarks (ratios against ComfyUI core, measured in one process)

CACHE        ?= $(HOME)/.cache/lora-composer
VENV         ?= $(CACHE)/venv
PY           := $(VENV)/bin/python
ARCH         := $(shell uname -m)
# torch/torchvision builds that install from this machine's local wheel store (see README).
ifeq ($(ARCH),aarch64)
TORCH_PINS   ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS   ?= torch==2.14.1 torchvision==0.29.1
endif
# A complete ComfyUI checkout for the server tests, when present (COMFYUI_PATH wins).
FULL_COMFYUI ?= $(CACHE)/comfyui-0.3.64
STAMP        := $(VENV)/.lora-composer-$(shell cat requirements-dev.txt requirements.txt | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-engine test-full bench clean-cache

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) scripts/demo.py

# The engine run always happens; the complete-checkout run happens whenever one is given
# (COMFYUI_PATH) or cached at $(FULL_COMFYUI), and says so when it is skipped.
test: setup
	@if [ -n "$$COMFYUI_PATH" ]; then \
	  echo "== tests on COMFYUI_PATH=$$COMFYUI_PATH"; $(PY) -m pytest -q; \
	else \
	  echo "== tests on the ComfyUI 0.9.2 engine (provisioned by scripts/provision_comfyui.py)"; \
	  $(PY) -m pytest -q || exit $$?; \
	  if [ -f "$(FULL_COMFYUI)/comfy/lora.py" ]; then \
	    echo "== tests on the complete ComfyUI at $(FULL_COMFYUI)"; COMFYUI_PATH="$(FULL_COMFYUI)" $(PY) -m pytest -q; \
	  else \
	    echo "== SKIPPED: no complete ComfyUI checkout (set COMFYUI_PATH); server tests ran as skips above"; \
	  fi; \
	fi

bench: setup
	$(PY) bench/bench_apply.py

clean-cache:
	rm -rf $(CACHE)/comfyui-engine-0.9.2 $(VENV)
