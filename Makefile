# Quick start: `make run` (install and serve on the embedded defaults), `make test`.
PYTHON ?= python3

.PHONY: install run test test-deps bench-smoke

install:
	$(PYTHON) -m pip install -q -e .

run: install
	$(PYTHON) -m mta serve

test-deps:
	$(PYTHON) -m pip install -q -e '.[test]'
	@command -v strace >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; }

test: test-deps
	$(PYTHON) -m pytest -q

bench-smoke: install
	$(PYTHON) bench/run --smoke
