# The compendium's entry points. `make help` lists them.
# Every stage runs its notebook with papermill for PROFILE (params/PROFILE.yaml)
# and writes build/PROFILE/<stage>/; stages whose inputs did not change are skipped.
# DATA=path/to/dataset.yaml runs on provided data instead (docs/bring_your_own_data.md):
# stage 1 becomes its data card and everything goes to build/PROFILE-<dataset file stem>/.

PROFILE ?= default
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD_ROOT ?= build
DATA ?=
DATA_ARG := $(if $(DATA),--data $(DATA))
PROFILES := $(basename $(notdir $(wildcard params/*.yaml)))

ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error PROFILE=$(PROFILE) has no params/$(PROFILE).yaml; profiles: $(PROFILES))
endif
ifneq ($(DATA),)
ifeq ($(wildcard $(DATA)),)
$(error DATA=$(DATA): no such dataset YAML; see docs/bring_your_own_data.md)
endif
endif

export PYTHONHASHSEED := 0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

# The stage graph is declared once, in compendium/stages.py. Make reads it from the rules file
# that `python -m compendium make-rules` writes (BUILD, STAGE1..STAGE5, stage1..stage5 and one rule
# per stage), and rewrites that file when the profile, the dataset or the stage table changes.
RULES := $(BUILD_ROOT)/.make/$(PROFILE)$(if $(DATA),-$(basename $(notdir $(DATA)))).mk
NO_RULES_GOALS := help venv lock test bench lab clean check-params chromium stages smoke
ifneq ($(filter-out $(NO_RULES_GOALS),$(or $(MAKECMDGOALS),all)),)
include $(RULES)
endif

$(RULES): $(STAMP) params/$(PROFILE).yaml compendium/stages.py compendium/makerules.py $(DATA)
	@$(PY) -m compendium make-rules --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG) --output $@

SITE := $(BUILD)/site/index.html

.PHONY: all smoke test bench help venv lock clean lab chromium report scan check-params federation trust stages

all: $(SITE) scan ## bootstrap .venv if missing, run every stage for PROFILE (default: default), build the report
	@echo "done: report in $(BUILD)/05_report/, reviewer site $(BUILD)/site/index.html"

smoke: ## the whole pipeline with the small smoke profile
	@$(MAKE) --no-print-directory all PROFILE=smoke

# stage1 .. stage5 (from the rules file): one stage and what it needs, e.g. `make stage3 PROFILE=smoke`.
# With DATA (or a profile naming its data), stage 1 is the provided data's data card.

RESUME ?=
STRATEGY ?= fedavg

federation: $(STAGE3) ## stage 3's federation on Flower's deployment engine: SuperLink + a SuperNode per site, TLS, node auth, pinned package, hospital floors (RESUME=1 continues)
	$(PY) -m fl.flower.deployment --profile $(PROFILE) --build-root $(BUILD_ROOT) --strategy $(STRATEGY) $(if $(RESUME),--resume) $(DATA_ARG)

trust: $(STAGE3) ## the malicious-server test: the same attacks against Flower's defaults and the hardened hospitals (03_federated_training/trust/)
	$(PY) -m fl.flower.trust --profile $(PROFILE) --build-root $(BUILD_ROOT)

report: $(SITE) ## stage 5: the pilot report (HTML, PDF, en + sv) and the reviewer site

stages: $(STAMP) ## list the stages in order (make stage1 .. stageN runs one with what it needs)
	@$(PY) -m compendium stages $(DATA_ARG)

chromium: ## make sure headless Chromium is there for the PDF (installs Debian's package as root)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report PDF ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "error: the report PDF needs Chromium; install it (Debian: sudo apt-get install chromium)" >&2; exit 2; \
	  fi; }

$(SITE): $(FINAL_STAGE)
	@$(PY) -m report site --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

scan: $(SITE) ## leak scan of every rendered page and PDF (fails on a finding)
	@$(PY) -m report scan --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

LAB_ARGS ?=
lab: $(STAMP) ## start JupyterLab on notebooks/ with the project's kernel ("fedhf"); LAB_ARGS="--no-browser --port=..." passes options
	$(PY) -m ipykernel install --sys-prefix --name fedhf --display-name "Python (fedhf compendium)" >/dev/null
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

check-params: $(STAMP) ## validate params/PROFILE.yaml and exit
	$(PY) -m compendium check-params $(PROFILE) $(DATA_ARG)

venv: $(STAMP) ## create .venv from requirements.lock (done automatically by other targets)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

test: $(STAMP) ## run the test suite (unit, property, integration)
	$(PY) -m pytest -n 2 --dist loadgroup

bench: $(STAMP) ## run the benchmarks; results in build/bench/*.json
	$(PY) -m benchmarks.synth
	$(PY) -m benchmarks.flower
	$(PY) -m benchmarks.privacy
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.deployment

lock: ## re-resolve requirements.in into requirements.lock and environment.yml
	rm -rf build/lock-venv && $(PYTHON_BOOT) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet -r requirements.in
	build/lock-venv/bin/pip freeze --all | $(PYTHON_BOOT) -m compendium.lockfile freeze
	$(PYTHON_BOOT) -m compendium.lockfile env
	rm -rf build/lock-venv

clean: ## remove build/PROFILE (with DATA: build/PROFILE-<dataset>) and its make rules (keeps .venv)
	rm -rf $(BUILD_ROOT)/$(PROFILE)$(if $(DATA),-$(basename $(notdir $(DATA)))) $(RULES)

help: ## list the targets
	@grep -E '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort | awk -F'\t' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILES) (default: default); DATA=path/to/dataset.yaml (provided data)"
