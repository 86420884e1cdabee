# imagekit: every target runs `setup` first; `setup` is idempotent and quick once done.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
IMAGEKIT  := $(VENV)/bin/imagekit
STAMP_APT := $(VENV)/.apt-done
STAMP_PIP := $(VENV)/.pip-done
STAMP_NPM := $(VENV)/.npm-done
# Debian packages imagekit needs (qemu, libguestfs + its Python binding, DIB's helpers).
APT_PACKAGES := qemu-utils qemu-system-x86 libguestfs-tools python3-guestfs python3-venv \
  linux-image-amd64 debootstrap sudo xorriso curl ca-certificates fdisk gdisk kpartx \
  dosfstools squashfs-tools zstd util-linux
APT_PACKAGES += fish  # tests/test_completion.py has fish itself complete imagekit's words (complete -C)
# imagekit ci: the registry for the shared step cache (tests), a bootable test image (syslinux, busybox),
# gitlab-ci-local's file sync (rsync) and npm, headless Chromium for the status page test.
APT_PACKAGES += docker-registry syslinux syslinux-common mtools busybox-static rsync chromium git  # imagekit ci
# gitlab-ci-local runs the emitted GitLab pipelines in the tests (4.73.0: the newest that runs on Node 20).
GITLAB_CI_LOCAL := gitlab-ci-local@4.73.0
APT_PACKAGES += wimtools ovmf swtpm swtpm-tools python3-hivex libhivex-bin  # Windows builds: install.wim editions (wimlib), UEFI + Secure Boot firmware, TPM 2.0, registry hives (hivex)
APT_PACKAGES += genisoimage mtools  # Windows tests: a UDF install ISO like Microsoft's; the FAT image of the UEFI-shell stand-in guest
APT_PACKAGES += python3-libnbd libnbd-bin libzstd1  # qcow2 writer: NBD input (libnbd's Python binding), zstd clusters
APT_PACKAGES += rabbitmq-server  # the message queue of the test Nova (snapshot tests; started on private ports)
# Debian's python3. The venv is isolated from its dist-packages (no Debian python3-* package
# shadows a pinned dependency, and no system .pth file runs at every start); only the guestfs
# binding, which is not on PyPI, is linked into it.
SYSTEM_PYTHON := /usr/bin/python3
PYTEST_ARGS ?=

.PHONY: help setup test demo bench lint clean mutate

help:
	@echo "make demo   - run the main job end to end on local defaults"
	@echo "make test   - lint (ruff, mypy), then the whole test suite"
	@echo "make bench  - benchmarks against reference tools"
	@echo "make mutate - mutation testing of the safety-critical code (not part of make test)"
	@echo "make lint   - ruff (complexity, argument count) + mypy on imagekit/"
	@echo "make setup  - install apt packages and the venv (every target does this first)"

setup: $(STAMP_PIP) $(STAMP_NPM)

# Checked again when the Makefile changes (a new APT_PACKAGES line): only missing packages are installed.
$(STAMP_APT): Makefile
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
	for f in $$(dpkg -L python3-guestfs python3-libnbd | grep -E '/dist-packages/[^/]+\.(py|so)$$'); do ln -sfn "$$f" "$$site/"; done && \
	for f in $$(dpkg -L python3-hivex | grep -E '/dist-packages/([^/]+\.so|hivex)$$'); do ln -sfn "$$f" "$$site/"; done
	@$(PY) -c 'import guestfs' || { echo "error: the guestfs binding is not importable in $(VENV)" >&2; exit 1; }
	@$(PY) -c 'import hivex' || { echo "error: the hivex binding is not importable in $(VENV)" >&2; exit 1; }
	@$(PY) -c 'import nbd' || { echo "error: the libnbd binding is not importable in $(VENV)" >&2; exit 1; }
	@touch $@

# npm packages in a project-local prefix ($(VENV)/npm), with the machine's Node.js (Debian's nodejs/npm if none).
$(STAMP_NPM): $(STAMP_APT) Makefile
	@command -v npm >/dev/null || { echo "installing Debian's nodejs and npm"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/npm $(GITLAB_CI_LOCAL)
	@touch $@

# editable_mode=compat: a plain path in a .pth file; the default mode's import finder costs every
# imagekit command ~8 ms of start-up.
$(STAMP_PIP): $(STAMP_APT) pyproject.toml setup.py
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,server]' --config-settings editable_mode=compat
	@touch $@

test: setup lint
	@mkdir -p $(VENV)/tmp
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check imagekit tests bench
	$(VENV)/bin/mypy imagekit

# Mutation testing (docs/testing.md): mutmut, configured in pyproject.toml ([tool.mutmut]: files and the
# fast in-process tests), over the safety-critical functions named here, 2 workers. Starts afresh
# (mutants/ removed), then prints the score and every mutant not killed (tests/mutation_report.py).
# One mutant: .venv/bin/mutmut show NAME; re-run some: .venv/bin/mutmut run NAME...
MUTATE_SCOPE ?= 'imagekit.formats.qcow2.header.*' 'imagekit.formats.qcow2.l2.*' \
  'imagekit.formats.qcow2.refcounts.*' 'imagekit.formats.detect.*' 'imagekit.secrets.*' \
  'imagekit.properties.x_lint__*' 'imagekit.properties.x_check_lint__*' 'imagekit.properties.x__[a-z]*' \
  'imagekit.properties.xǁ_Props*' \
  'imagekit.convert.x__input_format__*' 'imagekit.convert.x__verify_output__*' \
  'imagekit.convert_writer.x__qemu_check__*' 'imagekit.convert_writer.x__deep_check__*' \
  'imagekit.convert_writer.x_verify_file__*' 'imagekit.convert_writer.x_compare_content__*' \
  'imagekit.convert_writer.x__check_space__*' 'imagekit.convert_writer.x__in_parallel__*' \
  'imagekit.glance.x__verify__*' 'imagekit.glance.x__verify_and_finish__*' \
  'imagekit.glance_stream.x__checked_input__*' \
  'imagekit.cloud.x_translate__*' 'imagekit.cloud.x__detail__*'
MUTATE_JOBS ?= 2

mutate: setup
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTATE_SCOPE) > mutmut-run.log 2>&1 \
	  || { tail -40 mutmut-run.log >&2; exit 1; }
	$(PY) tests/mutation_report.py $(MUTATE_SCOPE)

demo: setup
	bash scripts/demo.sh "$(IMAGEKIT)"

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
