# Quick start: `make run` (install and serve on the embedded defaults), `make test`.
PYTHON ?= python3
# Debian packages the integration tests drive as real peers and tools, as package:command.
TEST_DEBS = strace:strace haproxy:haproxy postfix:postfix prometheus:promtool swaks:swaks
# Perl modules swaks needs for STARTTLS, as package:module.
TEST_PERL = libnet-ssleay-perl:Net::SSLeay
# Modules of the system Python (/usr/bin/python3) the tests run peers with, as package:module.
TEST_SYSPY = python3-milter:Milter

.PHONY: install run test test-deps bench-smoke

install:
	$(PYTHON) -m pip install -q -e .

run: install
	$(PYTHON) -m mta serve

test-deps:
	$(PYTHON) -m pip install -q -e '.[test]'
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; for pair in $(TEST_DEBS); do command -v $${pair#*:} >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	for pair in $(TEST_PERL); do perl -M$${pair#*:} -e1 2>/dev/null || missing="$$missing $${pair%%:*}"; done; \
	for pair in $(TEST_SYSPY); do /usr/bin/python3 -c "import $${pair#*:}" 2>/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: test-deps
	$(PYTHON) -m pytest -q

bench-smoke: install
	$(PYTHON) bench/run --smoke
