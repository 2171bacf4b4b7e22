# Two commands on a fresh machine: `make demo` (set up, then train the lecture's convnet on Fashion-MNIST)
# and `make test` (set up, then the default test suite). Everything else is a step they share.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned release takes the CPU build where this machine keeps one on disk, and PyPI's build elsewhere.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow test-all test-fast fuzz bench notebooks docs lint venv data clean

# setup.py compiles streaming's region JPEG decoder against libjpeg-turbo; without a compiler or libjpeg's headers
# it is skipped (whole-image decoding instead), so as root with apt they are installed first. libjpeg-turbo-progs:
# cjpeg writes the test JPEGs of every chroma subsampling (tests/test_jpeg_region.py).
$(BIN)/.installed: pyproject.toml setup.py src/cnnlab/data/_jpeg_region.c
	@if [ ! -e /usr/include/jpeglib.h ] || ! command -v cc >/dev/null 2>&1 || ! command -v cjpeg >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libjpeg-dev libjpeg-turbo-progs >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libjpeg-dev libjpeg-turbo-progs; } || true; \
	  fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# The default dataset: found where it lies, else Debian's package (as root, with apt), else the publisher's files.
data: venv
	@if ! $(BIN)/python -c "from cnnlab.data import get_spec, locate; locate(get_spec('fashion-mnist'))" 2>/dev/null; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } || true; \
	  fi; \
	fi
	$(BIN)/cnnlab data fetch fashion-mnist

demo: data
	$(BIN)/cnnlab train

# The default suite: every test but the slow-marked ones (more kill points, 1,000 fuzz examples per parser, the
# largest models, predict over 10,000 files), which `make test-slow` runs and CI runs as well.
test: data
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-slow: data
	$(BIN)/python -m pytest -m slow --durations=10

test-all: data
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not integration and not slow"

# The test suite replays fixed seeds; this explores every parser with fresh random seeds and FUZZ_EXAMPLES
# inputs each, then the JPEG decoders as a target of their own (tests/fuzz_jpeg.py: mutated seeds of every kind,
# batches in child processes so that a crash is caught; findings go to fuzz-findings/). Whatever it finds
# becomes a fixed regression example in tests/test_fuzz.py.
FUZZ_EXAMPLES ?= 5000
fuzz: venv
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -m slow -k under_fuzzing
	$(BIN)/python tests/fuzz_jpeg.py --inputs $(FUZZ_EXAMPLES) --out fuzz-findings

bench: data
	$(BIN)/python bench/run.py

# The lecture's notebooks run top to bottom in fresh kernels (nbclient), each in a temporary folder; the executed
# copies, outputs included, go to build/notebooks/ for reading on a web page (GitHub and nbviewer render them).
notebooks: venv
	$(BIN)/python notebooks/execute.py --out build/notebooks

# The documentation site (mkdocs.yml, pages in docs/, the API reference from docstrings, the notebooks) into
# build/site; CI passes DOCS_FLAGS=--strict, so a broken link or reference fails the build.
DOCS_FLAGS ?=
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build $(DOCS_FLAGS)

# ruff's lint rules and formatting over the repository and mypy over src/ (configured in pyproject.toml)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
