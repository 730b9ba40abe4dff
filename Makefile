# imagen: `make test` (Python 3.11), `make test-all` (3.8..3.13), `make bench`, `make pyz`,
# `make install`, `make lint`. Every target sets up its own venv; `make deps` installs the
# Debian packages some tests use, which `make test` only checks for.

PY_VERSIONS := 3.8 3.9 3.10 3.11 3.12 3.13
PREFIX      ?= $(HOME)/.local
PYZ         ?= dist/imagen.pyz
PYZ_BUILD   ?= build/pyz
PYTEST_ARGS ?= -q
# pytest-xdist processes for the suite: half of it waits on subprocesses, sockets and a
# browser, so 2 pay even on 2 CPUs; 0 runs it in one process (pdb, a quick -k).
TEST_JOBS   ?= 2
PYTHON      ?= python3
# The tests' temporary files (images, each fsynced as imagen writes it, ledgers, a
# PostgreSQL cluster, a browser profile) on the RAM disk when there is one with 2 GiB
# free: on a busy disk those waits cost the suite 5-10 s. TEST_TMPDIR= keeps $$TMPDIR.
TEST_TMPDIR ?= $(shell df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 && $$4 > 2097152 { print "/dev/shm" }')
# Debian packages the tests use, each as package:command-that-proves-it-is-there.
DEBIAN_DEPS := tmux:tmux postgresql:/usr/lib/postgresql/*/bin/initdb openssl:openssl chromium:chromium

SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter for version $(1): pyenv's newest $(1).x, else python$(1) on PATH.
find_python = $$( (v=$(1); \
	if command -v pyenv >/dev/null 2>&1; then \
	  full=$$(pyenv versions --bare 2>/dev/null | grep -E "^$${v//./\\.}\.[0-9]+$$" | sort -V | tail -n 1); \
	  [ -n "$$full" ] && PYENV_VERSION=$$full pyenv which python 2>/dev/null && exit 0; \
	fi; command -v python$$v) )

# A venv per version with PyYAML, pytest, pytest-xdist (TEST_JOBS) and openai (whose
# official client one test runs against the fake): .venv for 3.11, .venv-3.X for the
# others. From Python 3.10 on also the MCP Python SDK (mcp), which the `imagen mcp` tests
# use as a real client; it needs 3.10, so on 3.8 and 3.9 those tests skip. A venv is made
# anew when this file changes, so a package added here reaches venvs made before.
venv_dir = $(if $(filter 3.11,$(1)),.venv,.venv-$(1))

help:
	@echo "make deps | test | test-all | bench | screenshot | pyz | install [PREFIX=~/.local] | lint | clean"

.venv/.ready: Makefile ; @$(MAKE) -s VENV_VERSION=3.11 VENV_DIR=.venv venv
.venv-%/.ready: Makefile ; @$(MAKE) -s VENV_VERSION=$* VENV_DIR=.venv-$* venv

venv:
	@v=$(VENV_VERSION); dir=$(VENV_DIR); \
	py=$(call find_python,$$v); \
	if [ -z "$$py" ]; then echo "make: no Python $$v found (pyenv install $$v)"; exit 1; fi; \
	echo "make: $$dir from $$py"; \
	$$py -m venv --clear $$dir && \
	$$dir/bin/python -m pip install -q --disable-pip-version-check pyyaml pytest pytest-xdist openai && \
	if $$dir/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then \
	  $$dir/bin/python -m pip install -q --disable-pip-version-check mcp; fi && \
	touch $$dir/.ready

# The Debian packages that are not there, as " pkg pkg" (empty when all are).
missing_debian = missing=""; for pair in $(DEBIAN_DEPS); do pkg=$${pair%%:*}; probe=$${pair\#*:}; \
	  compgen -G "$$probe" >/dev/null || command -v "$$probe" >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done

# Installs the Debian packages the tmux, PostgreSQL, TLS and browser tests use (apt-get, as
# root or through sudo). Only this target installs anything system-wide.
deps:
	@$(missing_debian); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "make: cannot install$$missing: run as root or with sudo"; exit 1; fi; \
	  echo "make: installing$$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi

# Installs nothing: says which Debian packages are missing. Their tests skip, naming the
# package, outside CI; under CI (which runs `make deps` first) a missing one fails.
check-deps:
	@$(missing_debian); \
	if [ -n "$$CI" ] && [ -n "$$missing" ]; then \
	  echo "make: missing Debian packages:$$missing (CI runs \`make deps\` first)"; exit 1; \
	elif [ -n "$$missing" ]; then \
	  echo "make: missing Debian packages:$$missing (their tests will skip; \`make deps\` installs them)"; \
	fi

# PYTHONDONTWRITEBYTECODE= lets pytest keep its rewrite of the test modules in __pycache__
# (ignored by git): every process of every run would redo it, 2.5 s of CPU each. The
# imagen processes the tests start still write none (the env fixture sets it again). Only
# a failed test's temporary directory is kept.
run_tests = PYTHONDONTWRITEBYTECODE= $(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR)) \
	$(1)/bin/python -m pytest $(PYTEST_ARGS) -o tmp_path_retention_policy=failed \
	-n $(TEST_JOBS) test_imagen.py

test: check-deps .venv/.ready
	$(call run_tests,.venv)

test-all: check-deps
	@status=0; ran=""; failed=""; \
	for v in $(PY_VERSIONS); do \
	  dir=$(call venv_dir,$$v); [ "$$v" = 3.11 ] && dir=.venv; \
	  if ! $(MAKE) -s $$dir/.ready; then \
	    if [ -n "$$CI" ]; then failed="$$failed $$v(missing)"; status=1; else echo "make: skipping Python $$v"; fi; continue; \
	  fi; \
	  echo "=== Python $$v ==="; \
	  if $(call run_tests,$$dir); then ran="$$ran $$v"; else failed="$$failed $$v"; status=1; fi; \
	done; \
	echo "make: passed on:$${ran:- none}"; [ -z "$$failed" ] || echo "make: FAILED on:$$failed"; exit $$status

bench: check-deps .venv/.ready
	.venv/bin/python test_imagen.py --bench

# gallery.png in the README: the gallery as the browser tests see it
screenshot: check-deps .venv/.ready
	IMAGEN_GALLERY_SCREENSHOT=$(CURDIR)/gallery.png .venv/bin/python -m pytest -q test_imagen.py -k test_gallery_screenshot_for_the_readme

# The source ships next to its bytecode: `imagen version` hashes the source, and an
# interpreter of another version runs the source. Only the standard library is needed.
pyz:
	rm -rf $(PYZ_BUILD) && mkdir -p $(PYZ_BUILD) $(dir $(PYZ))
	cp imagen.py $(PYZ_BUILD)/
	printf 'import sys\nimport imagen\nsys.exit(imagen.main())\n' > $(PYZ_BUILD)/__main__.py
	$(PYTHON) -m compileall -q -b $(PYZ_BUILD)
	$(PYTHON) -m zipapp $(PYZ_BUILD) -o $(PYZ) -p '/usr/bin/env python3'
	@echo "make: built $(PYZ)"

# The launcher imports the module from its cached bytecode (the fastest start), and
# takes the current directory off sys.path first: `python3 -m` or `-c` put it there, and
# an imagen.py or yaml.py lying in it would run instead. Not -I: it would also hide the
# user's site-packages (a `pip install --user pyyaml`). The cyclic garbage collector waits
# while the module loads: its thousands of new objects would set it off for nothing (what
# that saves, `make bench` prints).
install:
	mkdir -p "$(PREFIX)/lib/imagen" "$(PREFIX)/bin"
	cp imagen.py "$(PREFIX)/lib/imagen/imagen.py"
	$(PYTHON) -m compileall -q "$(PREFIX)/lib/imagen"
	{ echo '#!/bin/sh'; \
	  echo '# the current directory is taken off sys.path: nothing lying there runs instead'; \
	  echo 'exec $(PYTHON) -c '\''import gc, sys; gc.disable(); sys.path[:1] == [""] and sys.path.pop(0); sys.path.insert(0, sys.argv.pop(1)); import imagen; gc.enable(); sys.exit(imagen.main())'\'' "$(PREFIX)/lib/imagen" "$$@"'; \
	} > "$(PREFIX)/bin/imagen"
	chmod +x "$(PREFIX)/bin/imagen"
	@echo "make: installed $(PREFIX)/bin/imagen"

lint: .venv/.ready
	.venv/bin/python -m pip install -q --disable-pip-version-check vermin ruff
	.venv/bin/vermin --no-tips --violations -t=3.8- imagen.py test_imagen.py conftest.py
	.venv/bin/ruff check --select E9,F imagen.py test_imagen.py conftest.py

clean:
	rm -rf build dist .pytest_cache __pycache__

.PHONY: venv help deps check-deps test test-all bench screenshot pyz install lint clean
