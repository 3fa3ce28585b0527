# fraudscore developer entry points. The virtualenv lives in .venv; override the
# interpreter used to create it with `make PYTHON=python3.12 ...`.
PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=

.PHONY: install demo test lint stack-up stack-down stack-status

# Rebuilt only when pyproject.toml changes (the stamp file records the install).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q --upgrade pip && $(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/fraudscore demo

# One shell line, so the exports printed by `stack.sh up` reach pytest. The
# output is captured first because `eval "$(cmd)"` succeeds even when cmd fails
# (eval of an empty string is 0), which would run the suite without a stack.
# Extra pytest arguments: make test PYTEST_ARGS='-k kafka -x'
test: $(VENV)/.installed
	stack_env="$$(scripts/stack.sh up)" && eval "$$stack_env" && $(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

stack-up:
	scripts/stack.sh up

stack-down:
	scripts/stack.sh down

stack-status:
	scripts/stack.sh status
