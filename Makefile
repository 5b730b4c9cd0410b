# The commands README.md names. `make demo` and `make test` set up a fresh machine first.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed>=0.15
AXOLOTL ?= axolotl==0.19.0

.PHONY: setup demo test test-unit lint format bench dictd

setup: $(VENV)/.installed dictd

# Offline reference data for the bench's knowledge-retention questions (Debian's dictd
# databases); installed with apt-get when missing, skipped (the bench says so) without apt-get.
DICTD_PACKAGES := dict-elements dict-gcide
dictd:
	@if [ -f /usr/share/dictd/elements.index ] && [ -f /usr/share/dictd/gcide.index ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(DICTD_PACKAGES) >/dev/null \
		|| echo "warning: could not install $(DICTD_PACKAGES): the bench skips its knowledge control"; \
	else echo "note: no apt-get: the bench's knowledge control needs $(DICTD_PACKAGES)"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $@

# DeepSpeed, for the ZeRO-2/3 tests, ships only a source package that imports torch to build:
# build it against the torch above, not an isolated (CUDA) one.
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-build-isolation "$(DEEPSPEED)"
	touch $@

# Axolotl, for the test that feeds the axolotl export to Axolotl's own freeze_layers_except:
# without its dependencies (its matcher and plugin manager need only torch, transformers,
# accelerate, pydantic and the small addict package).
$(VENV)/.axolotl: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps "$(AXOLOTL)" addict
	touch $@

demo: setup
	$(VENV)/bin/kappatune demo

test: setup $(VENV)/.deepspeed $(VENV)/.axolotl
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

# The fast tier: everything but the tests that launch several processes or load real
# pre-trained weights (marked `integration`); `make test` runs both tiers.
test-unit: setup
	$(VENV)/bin/pytest -q -m "not integration"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks
