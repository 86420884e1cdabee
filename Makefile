# imagekit: every target runs `setup` first; `setup` is idempotent and quick once done.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
IMAGEKIT  := $(VENV)/bin/imagekit
STAMP_APT := $(VENV)/.apt-done
STAMP_PIP := $(VENV)/.pip-done
# Debian packages imagekit needs (qemu, libguestfs + its Python binding, DIB's helpers).
APT_PACKAGES := qemu-utils qemu-system-x86 libguestfs-tools python3-guestfs python3-venv \
  linux-image-amd64 debootstrap sudo xorriso curl ca-certificates fdisk gdisk kpartx \
  dosfstools squashfs-tools zstd util-linux
APT_PACKAGES += rabbitmq-server  # the message queue of the test Nova (snapshot tests; started on private ports)
# Debian's python3. The venv is isolated from its dist-packages (no Debian python3-* package
# shadows a pinned dependency, and no system .pth file runs at every start); only the guestfs
# binding, which is not on PyPI, is linked into it.
SYSTEM_PYTHON := /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: help setup test demo bench lint clean

help:
	@echo "make demo   - run the main job end to end on local defaults"
	@echo "make test   - lint (ruff, mypy), then the whole test suite"
	@echo "make bench  - benchmarks against reference tools"
	@echo "make lint   - ruff (complexity, argument count) + mypy on imagekit/"
	@echo "make setup  - install apt packages and the venv (every target does this first)"

setup: $(STAMP_PIP)

$(STAMP_APT):
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg -s $$p 2>/dev/null | grep -q '^Status: install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "error: run as root (apt-get needed for: $$missing)" >&2; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi
	@test -x $(SYSTEM_PYTHON) || { echo "error: $(SYSTEM_PYTHON) missing" >&2; exit 1; }
	@test -d $(VENV) || $(SYSTEM_PYTHON) -m venv $(VENV)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])') && \
	for f in $$(dpkg -L python3-guestfs | grep -E '/dist-packages/[^/]+\.(py|so)$$'); do ln -sfn "$$f" "$$site/"; done
	@$(PY) -c 'import guestfs' || { echo "error: the guestfs binding is not importable in $(VENV)" >&2; exit 1; }
	@touch $@

# editable_mode=compat: a plain path in a .pth file; the default mode's import finder costs every
# imagekit command ~8 ms of start-up.
$(STAMP_PIP): $(STAMP_APT) pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,server]' --config-settings editable_mode=compat
	@touch $@

test: setup lint
	@mkdir -p $(VENV)/tmp
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check imagekit tests bench
	$(VENV)/bin/mypy imagekit

demo: setup
	bash scripts/demo.sh "$(IMAGEKIT)"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
