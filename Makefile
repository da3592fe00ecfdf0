# The two set-up commands (README quick start):
#   make study   install, then run the default study end to end (tables and figures in results/)
#   make test    install, then run the tests (what CI runs)
# Installation is a local virtualenv; torch is pinned first so pip takes the local CPU wheel
# instead of pulling a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: study test install system-deps bench dry-run clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	bash workflow/scripts/install_profiles.sh
	touch $@

# LAYERSCOPE_FORKSERVER: local jobs fork from one process that imported torch/diffusers once
# (src/layerscope/forkserver.py) instead of paying ~4 s of imports each
study: install
	LAYERSCOPE_FORKSERVER=auto PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake --profile profiles/local --cores $(CORES)

# Debian's chromium opens the Snakemake report in the report test; installed when root with apt
# (the SLURM test fixture installs its own Debian packages the same way), else those tests skip.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	fi

test: install system-deps
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q -ra

dry-run: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/snakemake -n

# every probe's benchmark (note's method vs probe: time, peak memory, ratio), then the per-probe
# table; benchmarks/gpu.sh does the same at real geometry on a GPU
bench: install
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python benchmarks/run_all.py --mode cpu --markdown benchmarks/results-cpu.md

clean:
	rm -rf results .snakemake
