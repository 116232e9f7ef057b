# Two entry points: `make run` (the whole pipeline on the embedded default) and
# `make test` (the test suite). Both create .venv and install on first use.
VENV    ?= .venv
PY      := $(VENV)/bin/python
# What `make install` installs: a hash-pinned lock of every runtime and dev dependency, for
# Linux x86-64 and CPython 3.11 (docs/reproducibility-install.md). The default is the CPU build
# of torch; on a CUDA machine: make run LOCK=requirements/cuda.lock (PyPI's CUDA torch, every
# other pin the same). `make lock` re-resolves both locks after a pyproject.toml change.
LOCK    ?= requirements/cpu.lock
# TORCH_SPEC=<spec> skips the lock: pyproject.toml's ranges (today's releases) with that torch,
# e.g. make run TORCH_SPEC=torch (PyPI's CUDA build). Not reproducible: dvc.lock hashes may change.
TORCH_SPEC ?=
# Where the +cpu torch wheel is found (PyPI has only CUDA builds): PyTorch's CPU index page, or
# this workplace's /opt/wheels, which holds the same file (same sha256).
TORCH_FIND_LINKS ?= $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
# uv (pinned in the lock, bootstrapped with pip) installs faster than pip and removes what the
# lock does not list; INSTALLER=pip does the same install with pip alone (slower). Both write the
# byte code at install: where PYTHONDONTWRITEBYTECODE is set (as on this machine) a venv without
# it recompiles every import in every process (twice the CPU of `import torch, transformers`).
INSTALLER ?= uv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run compare test test-all lock clean-outputs

# The stamp records what was installed; asking for another lock (or TORCH_SPEC) re-installs.
INSTALL_FROM := $(if $(TORCH_SPEC),ranges $(TORCH_SPEC),$(LOCK))
ifneq ($(strip $(shell cat $(VENV)/.installed 2>/dev/null)),$(strip $(INSTALL_FROM)))
.PHONY: $(VENV)/.installed
endif

$(VENV)/.installed: pyproject.toml $(if $(TORCH_SPEC),,$(LOCK))
	test -x $(PY) || python3 -m venv $(VENV)
	@# Switching builds: "torch==2.13.0" (cuda.lock) counts 2.13.0+cpu as installed, so drop it.
	if [ -s $@ ] && [ "$$(cat $@)" != "$(INSTALL_FROM)" ]; then $(PY) -m pip uninstall -y -q torch; fi
ifneq ($(TORCH_SPEC),)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
else ifeq ($(INSTALLER),pip)
	$(PY) -m pip install -q --require-hashes --find-links $(TORCH_FIND_LINKS) -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	awk '/^uv==/ {p=1; print; next} p && /^[ \t]/ {print; next} {p=0}' $(LOCK) > $(VENV)/uv.lock.txt
	$(PY) -m pip install -q --require-hashes --no-deps -r $(VENV)/uv.lock.txt
	$(VENV)/bin/uv pip sync -q --require-hashes --compile-bytecode --python $(PY) \
		--find-links $(TORCH_FIND_LINKS) $(LOCK)
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --no-build-isolation -e .
endif
	echo "$(INSTALL_FROM)" > $@

install: $(VENV)/.installed

# Re-resolve requirements/cpu.lock and cuda.lock from pyproject.toml (runtime + dev extra) and
# requirements/{cpu,cuda}.in + constraints.txt, for Linux x86-64 / CPython 3.11. Every pin that
# still satisfies the ranges is kept (uv prefers the versions already in the lock); UPGRADE=1
# takes the newest releases instead (constraints.txt's pins stay). Then `make test` (which runs
# tests/test_lock.py), and `make run` to check dvc.lock still reproduces.
UV ?= $(VENV)/bin/uv
LOCK_FLAGS = --extra dev --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -q \
	$(if $(UPGRADE),--upgrade)
# (uv reads its preferences from the output file: start from a copy of the lock; replace the
# lock only when it changed, so an unchanged lock does not trigger a re-install.)
define compile_lock
	cp requirements/$(1).lock $(VENV)/$(1).lock.new 2>/dev/null || true
	$(UV) pip compile pyproject.toml requirements/$(1).in $(LOCK_FLAGS) $(2) -o $(VENV)/$(1).lock.new
	cmp -s $(VENV)/$(1).lock.new requirements/$(1).lock || cp $(VENV)/$(1).lock.new requirements/$(1).lock
endef
lock: $(VENV)/.installed
	$(call compile_lock,cpu,--find-links $(TORCH_FIND_LINKS))
	$(call compile_lock,cuda,)

# Two BLAS/OpenMP threads, pinned: floating-point reductions depend on the thread count, so a
# fixed count is what makes a fresh `make run` reproduce the committed dvc.lock bit for bit on
# any machine of the same kind (measured: two runs at 2 threads give identical weights; 1 vs 2
# threads differ in the last bits). 2, not 1: training is 1.8x faster on this 2-core machine.
# The committed dvc.lock was made at 2. Override: make run THREADS=1
THREADS ?= 2
run: install
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV)/bin/dvc repro

# The comparison pipeline (comparison/dvc.yaml: every model of compare.models at every seed of
# compare.seeds, then the report), its model x seed runs JOBS at a time in this workspace, each at
# cores // JOBS threads (multifusion.core.parallel_repro; docs/experiments.md). JOBS=1: one at a time.
JOBS ?= 2
compare: install
	$(PY) -m multifusion.core.parallel_repro --jobs $(JOBS) comparison/dvc.yaml:compare
	$(VENV)/bin/dvc repro comparison/dvc.yaml

# The default suite: every test not marked slow (pyproject.toml), one end-to-end smoke run of the
# pipeline among them; test-all adds the slow ones (see README, "Tests").
# Two pytest-xdist workers at one BLAS/OpenMP thread each: on 2 cores the default suite takes
# 156 s this way against 272-335 s in one process (2026-12-07), which keeps a fresh clone's
# make run + make test within 12 minutes. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS))

test-all: install
	$(VENV)/bin/pytest -m ""
