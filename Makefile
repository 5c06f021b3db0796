# make test: every check (lint, types, tests) in a fresh .venv; make run: the main job.
#
# Two builds of the engine (setup.py): `pip install -e .` compiles its modules with mypyc
# into src/memslots/*.so; `MEMSLOTS_PURE_PYTHON=1` builds pure Python. .venv holds the
# compiled editable install, rebuilt whenever an engine source or the build changes (a
# stale .so would run instead of the edited .py); .venv/pure holds a pure install of the
# same sources (the tools too), rebuilt whenever any of them changes, for the engine's tests
# on the pure build and for the API reference of the docs. (`memslots bench` and
# benchmarks/bench_engine.py make their own pure copy: memslots.tools.bench_peers.)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PURE := $(VENV)/pure
PURE_STAMP := $(PURE)/.installed
DOCS_STAMP := $(VENV)/.docs-installed
#: the modules mypyc compiles (src/memslots/_build.py); their doctests run on the pure build
COMPILED_MODULES := $(shell $(PYTHON) -c "import runpy; \
	print(*runpy.run_path('src/memslots/_build.py')['COMPILED_MODULES'])")
ENGINE_SRC := setup.py $(wildcard src/memslots/*.py)
#: everything a pure install copies: the engine, the tools and the package data
PACKAGE_SRC := setup.py $(shell find src/memslots -type f -not -name '*.so' -not -name '*.pyc')
#: the engine's own tests, also run on the pure build
ENGINE_TESTS := tests/test_indexes.py tests/test_engine_errno.py tests/test_engine_model.py \
	tests/test_engine_protocol.py tests/test_dirty_log.py tests/test_guest_memory.py \
	tests/test_guest_memfd.py tests/test_sync.py tests/test_baseline.py tests/test_build.py \
	tests/test_dirty_ring.py tests/test_vm_api_extras.py

.PHONY: test run lint typecheck pytest pytest-pure build pure bench clean docs test-kernels

$(STAMP): pyproject.toml $(ENGINE_SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test,plot,peers]'
	touch $(STAMP)

$(PURE_STAMP): $(STAMP) $(PACKAGE_SRC)
	rm -rf $(PURE)
	MEMSLOTS_PURE_PYTHON=1 $(BIN)/python -m pip install -q --no-deps --no-build-isolation \
		--target $(PURE) .
	touch $(PURE_STAMP)

#: the docs extra of pyproject.toml, installed into .venv (the package is not rebuilt)
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -c "import subprocess, sys, tomllib; \
		deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; \
		subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', *deps['docs']])"
	touch $(DOCS_STAMP)

build: $(STAMP)

pure: $(PURE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check setup.py src tests benchmarks examples docs/conf.py
	$(BIN)/ruff format --check setup.py src tests benchmarks examples docs/conf.py

typecheck: $(STAMP)
	$(BIN)/mypy src tests benchmarks examples

pytest: $(STAMP)
	MEMSLOTS_EXPECT_BUILD=compiled $(BIN)/python -m pytest -q -rfEs

pytest-pure: $(PURE_STAMP)
	PYTHONPATH=$(PURE) MEMSLOTS_EXPECT_BUILD=pure $(BIN)/python -m pytest -q -rfEs $(ENGINE_TESTS) \
		$(addprefix $(PURE)/memslots/,$(addsuffix .py,$(COMPILED_MODULES)))

# the site: user guide (docs/*.md, README.md) and API reference, read from the pure build
# (compiled modules hide their docstrings from autodoc); warnings and unresolved
# references are errors; always built afresh (autodoc does not track the sources)
docs: $(DOCS_STAMP) $(PURE_STAMP)
	rm -rf build/docs build/doctrees
	PYTHONPATH=$(PURE) $(BIN)/python -m sphinx -W --keep-going -n -q -b html \
		-d build/doctrees docs build/docs
	rm -rf build/doctrees
	@echo "docs: build/docs/index.html"

#: every check runs even when an earlier one failed; the failed ones are named at the end
#: and make exits non-zero
TEST_STEPS := lint typecheck pytest pytest-pure docs
test: $(STAMP)
	@failed=""; for step in $(TEST_STEPS); do \
		$(MAKE) --no-print-directory $$step || failed="$$failed $$step"; \
	done; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: every step passed ($(TEST_STEPS))"

#: the kernel matrix: Debian's kernels booted under QEMU, the engine checked against each
#: (memslots conform --kernel ... and replay --kernel ...; needs QEMU, network access to
#: Debian's archive the first time, and about half a minute a kernel)
test-kernels: $(STAMP)
	MEMSLOTS_KERNEL_MATRIX=1 $(BIN)/python -m pytest -q -rfEs -p no:cacheprovider tests/kernels

run: $(STAMP)
	$(BIN)/memslots replay

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
	rm -f src/memslots/*.so
