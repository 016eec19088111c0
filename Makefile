# The two commands of the README: `make demo` and `make test`. Both create .venv from scratch if needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgekit-installed

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
	# constraints.txt: the versions CI last passed with; without it pip's resolver backtracks past its
	# depth limit on the [demo] extra's dependency graph ("resolution-too-deep").
	$(BIN)/python -m pip install -q torch==2.13.0 -e '.[all,test,demo]' -c constraints.txt
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/edgekit run examples/mnist_bbc --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs
