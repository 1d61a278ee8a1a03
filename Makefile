# The two quick-start commands are `make serve` and `make test`; everything they need
# installs on first use. uv itself comes from PyPI when it is missing.
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "$(HOME)/.local/bin/uv")
MODEL ?= model_repo/tiny
PORT ?= 8080

.PHONY: serve test install llamacpp tiny vllm-env torchaudio-env vllm-start vllm-stop system-packages images-cpu

$(UV):
	python3 -m pip install --user --quiet uv

# --inexact: what `make test` added (llama.cpp, below) stays for `make serve`
install: $(UV)
	$(UV) sync --frozen --inexact

$(MODEL)/model.json: | install
	$(UV) run onellm make-tiny --out $(MODEL)

tiny: $(MODEL)/model.json

serve: install tiny
	$(UV) run onellm serve --model $(MODEL) --port $(PORT)

vllm-env:
	scripts/vllm-env.sh

# torchaudio, for the test that checks the resampler against the authors' (tests only)
torchaudio-env:
	scripts/torchaudio-env.sh

vllm-start: vllm-env
	scripts/vllm-serve.sh start $(MODEL) $(or $(VLLM_PORT),8000)

vllm-stop:
	scripts/vllm-serve.sh stop $(or $(VLLM_PORT),8000)

# The real programs the tests drive, from Debian: Chromium for the page (Playwright's own
# browser download is not used), Node.js for the fetch() SSE example, redis-server and haproxy
# for the scale-out tier, promtool
# (package prometheus) for the alerting rules, dockerd and debootstrap for the container tier
# (which runs a Docker engine of its own), and g++ for llama-cpp-python, which PyPI has as source only.
SYSTEM_COMMANDS := chromium node redis-server haproxy promtool dockerd debootstrap g++
SYSTEM_PACKAGES := chromium nodejs redis-server haproxy prometheus docker.io debootstrap g++
system-packages:
	@for command in $(SYSTEM_COMMANDS); do command -v $$command >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null; fi

# The images of the CPU layout (docker/compose.cpu.yml) on a local Debian base, for machines
# with no GPU and no container registry; DOCKER_HOST says which Docker engine builds them.
images-cpu:
	docker/cpu/build.sh

# llama.cpp serves quantized weights (`onellm quantize`); it compiles for this CPU (~4 min, once)
llamacpp: install system-packages
	$(UV) sync --frozen --inexact --extra llamacpp

test: install vllm-env torchaudio-env system-packages llamacpp
	$(UV) run pytest
