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

.PHONY: setup demo test test-engine test-full bench clean-cache browser

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: setup
	$(PY) scripts/demo.py

# Debian's chromium for the browser test (tests/e2e/test_e2e_browser.py, driven by Playwright's Python package
# with executable_path=/usr/bin/chromium; Playwright never downloads a browser). Idempotent and quiet; when it
# cannot install (no apt-get, not root) the browser test reports a skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "== installing Debian's chromium for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium; } >/dev/null 2>&1 || echo "== chromium could not be installed: the browser test will be skipped"; \
	  else \
	    echo "== chromium is not installed (needs root and apt-get): the browser test will be skipped"; \
	  fi; }

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
