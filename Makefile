# Quick start: `make run` (install and serve on the embedded defaults), `make test`.
# Everything runs in a virtual environment, $(VENV), made with $(PYTHON) -m venv: nothing is
# ever pip-installed into the system's Python (PEP 668). A stock Debian 12 / Ubuntu 24.04
# needs only python3, python3-venv and make.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# Debian packages the integration tests drive as real peers and tools, as package:command
# (a command on PATH, or the full path of a program outside it, e.g. /usr/lib/dovecot/imap).
TEST_DEBS = strace:strace haproxy:haproxy postfix:postfix prometheus:promtool swaks:swaks groff-base:groff man-db:man opendkim:opendkim clamav-daemon:clamd tnef:tnef rspamd:rspamd dovecot-imapd:/usr/lib/dovecot/imap dovecot-pop3d:/usr/lib/dovecot/pop3 dovecot-lmtpd:/usr/lib/dovecot/lmtp dovecot-sieve:sievec dovecot-managesieved:/usr/lib/dovecot/managesieve redis-server:redis-server iproute2:ip chromium:chromium
# Perl modules swaks needs for STARTTLS, as package:module.
TEST_PERL = libnet-ssleay-perl:Net::SSLeay
# Modules of the system Python (/usr/bin/python3) the tests run peers with, as package:module.
TEST_SYSPY = python3-milter:Milter

.PHONY: venv install run test test-deps bench-smoke man

venv: $(VPY)

# A venv whose creation failed half way (no ensurepip: python3-venv missing) is removed,
# so the next run tries again instead of using a venv without pip.
$(VPY):
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
		echo "$(PYTHON) cannot make a virtual environment: install python3-venv (apt-get install python3-venv)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }

# Stamps: pip runs again only when pyproject.toml changes (or the venv is new).
$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed

run: install
	$(VPY) -m mta serve

test-deps: $(VENV)/.installed-test
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; for pair in $(TEST_DEBS); do command -v $${pair#*:} >/dev/null || missing="$$missing $${pair%%:*}"; done; \
	for pair in $(TEST_PERL); do perl -M$${pair#*:} -e1 2>/dev/null || missing="$$missing $${pair%%:*}"; done; \
	for pair in $(TEST_SYSPY); do /usr/bin/python3 -c "import $${pair#*:}" 2>/dev/null || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: test-deps
	$(VPY) -m pytest -q

bench-smoke: install
	$(VPY) bench/run --smoke

# The man pages and the bash completion under share/ (the wheel installs them), from the
# argument parser and README.md's Configuration block; tests fail while they are stale.
man: install
	$(VPY) -m mta.manpage
