# Two entry points: `make reproduce` (the main job: the Gemma reproduction on the CPU stack)
# and `make test` (the harness's own test suite). Both install into .venv first if needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install reproduce test clean

install: $(STAMP)

# torch is pinned in pyproject.toml to the CPU build; see the README's install notes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Exit code 1 means findings: the reproduction is red while the bug exists.
reproduce: $(STAMP)
	$(VENV)/bin/python -m pytest -k gemma $(ARGS)

# pytest exits 5 when it collected no test: that is a broken suite, not a pass, and make
# fails on it like on any other non-zero code.
test: $(STAMP)
	@status=0; $(VENV)/bin/python -m pytest tests $(ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$status

clean:
	rm -rf $(VENV) .pytest_cache
