# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
RUN    := runs/demo

.PHONY: demo test install dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: re-install only when the package metadata changes.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# Train a tokenizer and a small GPT on the Python standard library, on the CPU, then sample; count a
# Kneser-Ney trigram on the same tokens, evaluate both (perplexity, a few tasks) and write the report.
demo: install
	$(BIN)/lmforge tokenizer train --vocab-size 8192 --out $(RUN)/tokenizer --overwrite
	$(BIN)/lmforge prepare --tokenizer $(RUN)/tokenizer --out $(RUN)/data --overwrite
	$(BIN)/lmforge pretrain --config configs/demo.yaml --out $(RUN)/train --data $(RUN)/data --overwrite
	$(BIN)/lmforge generate --model $(RUN)/train --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 0 --echo "def main():"
	$(BIN)/lmforge baseline --kind ngram --data $(RUN)/data --out $(RUN)/ngram --overwrite
	$(BIN)/lmforge eval --model $(RUN)/train --model $(RUN)/ngram --data $(RUN)/data \
		--tasks examples/tasks/python_syntax.yaml,brackets,arithmetic --shots 3
	$(BIN)/lmforge report $(RUN)/train

test: dev
	$(BIN)/python -m pytest tests

bench: dev
	$(BIN)/python bench/bench_gpt.py

clean:
	rm -rf runs .pytest_cache
