# The two commands of the quick start, and the pieces they need.
#   make demo   set up and run the proxy on a fresh demo home (local vault, store "demo", key "foo"),
#               ~/.local/state/xks-proxy/demo (or $XDG_STATE_HOME/xks-proxy/demo), replaced by the next demo
#   make test   run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test install bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xks-proxy demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
