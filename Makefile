# Every target sets up .venv from pyproject.toml when needed, then runs `python -m study <command>`.
# Variables are exported to the environment and read by Python there: values with
# spaces, quotes or ';' stay data and are never pasted into a shell command line.

DATA     ?=# empty: the shared data beside the checkout (../shared/data/cifar10-cars-trucks-cats), else ./data
RESULTS  ?= results
DEVICE   ?= auto
SPACE    ?=# search: search_spaces/default.yaml, train: search_spaces/seed_final.yaml, hpo-bench: search_spaces/bench.yaml
STUDY    ?=
STORAGE  ?=# empty: sqlite:///RESULTS/optuna.db (study/options.py default_storage)
TRIALS   ?=
TIMEOUT  ?=
WORKERS  ?= 1
FUSE     ?=# default: as wide as pays on the device (cpu 16, cuda 64); 1: one trial at a time; hpo-bench: the space's n_startup_trials
PORT     ?= 8080
# HOST uses '=', not '?=': a HOST the shell exports (containers often set 0.0.0.0) must not
# open the dashboard to the network; only `make dashboard HOST=...` does.
HOST      = 127.0.0.1
TRIAL    ?=
SEEDS    ?=# final: 3 (seeds 0..2); train: 1
CANDIDATES ?=# final: the top K trials by dev (3), with the warm-start points, compete
FOLDS    ?=# final: choose among them by K-fold cross-validation over train+dev (4); 0: by dev over seeds
ENSEMBLE ?=# final: 1 (default): model.pt is the seeds' ensemble (mean softmax); 0: the median seed
EPSILONS ?=
ATTACK   ?= fgsm
CSV      ?=
PLOTS_OUT ?=# plots: output folder (empty: plots/ beside the CSV)
CHECKPOINT ?=
SPLIT    ?= dev
TTA      ?=# evaluate: test-time augmentation views (none, flip, flip_translate); empty: the checkpoint's own
EVAL_JSON ?=# evaluate: also write the evaluation to this JSON file
FUSED_KS ?=# bench: also time K fused trials for each K, e.g. 1,4,16,64
TRUST_PICKLE ?=
CORRECTIONS  ?=
FLIP_COUNT   ?=
SEED         ?=# audit: seed of the model(s), folds and flips
AUDIT_METHOD ?=# audit: training_dynamics (default) or out_of_fold
PYTEST_ARGS  ?=
THREADS      ?=
BUDGET       ?=# hpo-bench: seconds per search (160)
SEARCH_SEEDS ?=# hpo-bench: search seeds per method and data set (3)
METHODS      ?=# hpo-bench: comma list of tpe, random, default, tpe_hyperband, recipe (default: the four that search)
DATASETS     ?=# hpo-bench: PATH or PATH:CLASSES, separated by spaces or ';' (default: DATA, and ../shared/data/cifar10-deer-dog-horse as deer,dog,horse)
# The split: class order (empty: DATA/train's folder names, sorted; car,truck,cat for the user's data)
# and images per class in that order (empty: the folder as it is, or the user's counts for the shared
# cars/trucks/cats folder; COUNTS=user|all chooses), DEV_FRACTION: the folder as it is, dev's share of train/.
CLASSES      ?=
TRAIN_COUNTS ?=
DEV_COUNTS   ?=
TEST_COUNTS  ?=
COUNTS       ?=
DEV_FRACTION ?=
SPLIT_SEED   ?=

VARIABLES := DATA RESULTS DEVICE SPACE STUDY STORAGE TRIALS TIMEOUT WORKERS FUSE PORT HOST TRIAL SEEDS CANDIDATES FOLDS \
       ENSEMBLE EPSILONS ATTACK CSV PLOTS_OUT CHECKPOINT SPLIT TTA EVAL_JSON FUSED_KS TRUST_PICKLE CORRECTIONS FLIP_COUNT \
       SEED AUDIT_METHOD THREADS PYTEST_ARGS BUDGET SEARCH_SEEDS METHODS DATASETS \
       CLASSES TRAIN_COUNTS DEV_COUNTS TEST_COUNTS COUNTS DEV_FRACTION SPLIT_SEED
export $(VARIABLES)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# A variable on make's command line that is none of these (a typo, OUT for PLOTS_OUT) would reach the command
# as an environment variable that nothing reads, and the output would go to the default place: refuse it.
UNKNOWN := $(filter-out $(VARIABLES) PYTHON VENV PY STAMP,\
             $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
ifneq ($(strip $(UNKNOWN)),)
$(error $(firstword $(UNKNOWN)) is not a variable of this Makefile; the variables are listed in README.md (Variables) and in `python -m study <command> --help`)
endif

COMMANDS := search data train evaluate export plots final bench audit hpo-bench

.PHONY: help setup $(COMMANDS) dashboard test test-deps clean

help:
	@echo "make search | make test | data train evaluate dashboard export plots final bench audit hpo-bench"
	@echo "see README.md for the variables (DATA, CLASSES, RESULTS, DEVICE, SPACE, STUDY, STORAGE, ...)"
	@echo "make hpo-bench: is TPE worth it? TPE, random, warm-started default, TPE + Hyperband (BUDGET, SEARCH_SEEDS, METHODS, DATASETS)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,png]'
	touch $(STAMP)

# Each command target is the study command of the same name (python -m study <target> --help).
# exec: Python replaces the recipe's shell, so the signals make passes on (SIGTERM) reach it; and
# STUDY_PARENT_PID ($$PPID: make) makes it end with make even when make itself is SIGKILLed
# (study/lifetime.py), taking its worker processes with it.
$(COMMANDS): $(STAMP)
	STUDY_PARENT_PID=$$PPID exec $(PY) -m study $@

# The module listens beyond 127.0.0.1 only when its command line says so. "$$HOST" stays one word
# whatever it holds.
dashboard: $(STAMP)
	STUDY_PARENT_PID=$$PPID exec $(PY) -m study dashboard --host "$$HOST"

# PostgreSQL (for the shared-storage tests) and Chromium (for the report test), from Debian.
test-deps:
	@./.ci/system-deps

test: $(STAMP) test-deps
	$(PY) -m pytest -q $$PYTEST_ARGS

clean:
	rm -rf $(VENV) *.egg-info
