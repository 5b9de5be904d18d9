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
BUILD := $(BUILD_ROOT)/$(PROFILE)$(if $(DATA),-$(basename $(notdir $(DATA))))
DATA_ARG := $(if $(DATA),--data $(DATA))
# A profile may name its dataset itself (`data: path/to/dataset.yaml`); then it builds under build/PROFILE/.
PROFILE_DATA := $(if $(DATA),,$(shell sed -n 's/^data:[[:space:]]*\([^[:space:]#]*\).*/\1/p' params/$(PROFILE).yaml 2>/dev/null))
STAGE1_NAME := $(if $(DATA)$(PROFILE_DATA),01_data_card,01_synthetic_ehr)
PROFILES := $(basename $(notdir $(wildcard params/*.yaml)))

ifeq ($(filter $(PROFILE),$(PROFILES)),)
$(error PROFILE=$(PROFILE) has no params/$(PROFILE).yaml; profiles: $(PROFILES))
endif
ifneq ($(DATA),)
ifeq ($(wildcard $(DATA)),)
$(error DATA=$(DATA): no such dataset YAML; see docs/bring_your_own_data.md)
endif
endif
ifneq ($(DATA)$(PROFILE_DATA),)
# The dataset YAML and the tables it names: a change reruns the data card and everything after it.
DATA_FILES := $(DATA)$(PROFILE_DATA) $(shell test -x $(VENV)/bin/python && $(VENV)/bin/python -m compendium data-files $(DATA)$(PROFILE_DATA) 2>/dev/null)
endif

export PYTHONHASHSEED := 0
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

COMPENDIUM_SRC := $(shell find compendium -name '*.py' 2>/dev/null)
SYNTH_SRC := $(shell find data_synth -name '*.py' 2>/dev/null)
FL_SRC := $(shell find fl -name '*.py' 2>/dev/null)

STAGE1 := $(BUILD)/$(STAGE1_NAME)/manifest.json
STAGE2 := $(BUILD)/02_local_baselines/manifest.json
STAGE3 := $(BUILD)/03_federated_training/manifest.json
STAGE4 := $(BUILD)/04_privacy_evaluation/manifest.json
STAGE5 := $(BUILD)/05_report/manifest.json
SITE := $(BUILD)/site/index.html
REPORT_SRC := $(shell find report -type f 2>/dev/null)

.PHONY: all smoke test bench help venv lock clean lab chromium stage1 stage2 stage3 stage4 report scan check-params federation

all: $(SITE) scan ## bootstrap .venv if missing, run every stage for PROFILE (default: default), build the report
	@echo "done: report in $(BUILD)/05_report/, reviewer site $(BUILD)/site/index.html"

smoke: ## the whole pipeline with the small smoke profile
	@$(MAKE) --no-print-directory all PROFILE=smoke

stage1: $(STAGE1) ## stage 1 only: synthetic EHR and cohort (with DATA: the provided data's data card)

$(STAGE1): $(STAMP) params/$(PROFILE).yaml notebooks/$(STAGE1_NAME).ipynb $(SYNTH_SRC) $(COMPENDIUM_SRC) $(if $(DATA_FILES),$(DATA_FILES) $(FL_SRC))
	$(PY) -m compendium run $(STAGE1_NAME) --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

stage2: $(STAGE2) ## stage 2: local baselines, pooled model, references

$(STAGE2): $(STAGE1) notebooks/02_local_baselines.ipynb $(FL_SRC)
	$(PY) -m compendium run 02_local_baselines --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

stage3: $(STAGE3) ## stage 3: federated training with Flower, message ledger

$(STAGE3): $(STAGE2) notebooks/03_federated_training.ipynb $(FL_SRC)
	$(PY) -m compendium run 03_federated_training --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

RESUME ?=
STRATEGY ?= fedavg

federation: $(STAGE3) ## stage 3's federation on Flower's deployment engine: SuperLink + a SuperNode per site, TLS, node auth (RESUME=1 continues)
	$(PY) -m fl.flower.deployment --profile $(PROFILE) --build-root $(BUILD_ROOT) --strategy $(STRATEGY) $(if $(RESUME),--resume) $(DATA_ARG)

stage4: $(STAGE4) ## stage 4: privacy evaluation (membership inference, attacks on updates)

$(STAGE4): $(STAGE3) notebooks/04_privacy_evaluation.ipynb $(FL_SRC)
	$(PY) -m compendium run 04_privacy_evaluation --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

report: $(SITE) ## stage 5: the pilot report (HTML, PDF, en + sv) and the reviewer site

$(STAGE5): $(STAGE4) notebooks/05_report.ipynb $(REPORT_SRC) | chromium
	$(PY) -m compendium run 05_report --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

chromium: ## make sure headless Chromium is there for the PDF (installs Debian's package as root)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report PDF ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "error: the report PDF needs Chromium; install it (Debian: sudo apt-get install chromium)" >&2; exit 2; \
	  fi; }

$(SITE): $(STAGE5)
	$(PY) -m report site --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

scan: $(SITE) ## leak scan of every rendered page and PDF (fails on a finding)
	$(PY) -m report scan --profile $(PROFILE) --build-root $(BUILD_ROOT) $(DATA_ARG)

lab: $(STAMP) ## start JupyterLab on notebooks/ with the project's kernel ("fedhf")
	$(PY) -m ipykernel install --sys-prefix --name fedhf --display-name "Python (fedhf compendium)" >/dev/null
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

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

clean: ## remove build/PROFILE (keeps .venv)
	rm -rf $(BUILD)

help: ## list the targets
	@grep -E '^[a-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort | awk -F'\t' '{printf "  make %-14s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=$(PROFILES) (default: default); DATA=path/to/dataset.yaml (provided data)"
