# Two commands on a fresh clone: `make demo` and `make test`. Each creates .venv when
# it is missing and installs what it needs (re-installing when pyproject.toml changes).
#
# PyTorch: without an NVIDIA GPU we install the CPU build (here `torch==2.13.0` resolves
# to a local CPU wheel; a plain `torch` would pull a multi-GB CUDA build). Override with
#   make test TORCH='torch==2.14.1'            # another version
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu   # CPU wheels elsewhere

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HAS_NVIDIA_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA_GPU),yes)
TORCH ?= torch>=2.13
else
TORCH ?= torch==2.13.0
endif
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

# Tests never touch the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: test demo install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet $(PIP_TORCH_FLAGS) '$(TORCH)'
	touch $@

# [control]: OpenCV for `latentloom preprocess canny` (an optional extra for pip users; make installs it)
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e '.[control]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e '.[dev,control]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# The main job on the bundled model: a handful of prompts into demo/, offline; one 128-px upscale;
# one image steered by a control map (the bundled ControlNet puts the star where docs/control-map.png does).
DEMO_PROMPTS = "a red circle on a blue background" \
	"a large yellow star in the center of a black background" \
	"a small green square on the left" \
	"a large purple triangle at the top of a white background" \
	"a large white circle on the right of a red background"

demo: $(VENV)/.installed
	@if [ ! -f weights/default/model_index.json ]; then \
		echo "latentloom: the bundled default model is not in this checkout (weights/default/model_index.json)."; \
		echo "Nothing was generated."; \
		exit 1; \
	fi
	$(VENV)/bin/latentloom generate $(DEMO_PROMPTS) --seed 0 --no-progress --output demo/shapes.png
	$(VENV)/bin/latentloom upscale "a large yellow star in the center of a black background" \
		--image demo/shapes-1.png --seed 0 --no-progress --output demo/shapes-1-128px.png
	$(VENV)/bin/latentloom generate "a large orange star on a blue background" \
		--control-image docs/control-map.png --seed 0 --no-progress --output demo/controlled-star.png

clean:
	rm -rf $(VENV) build dist *.egg-info demo
