# Newcomer entry points: `make demo` (set up + run the offline CPU demo), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline

.PHONY: setup setup-debs setup-sandbox demo test test-slow test-scale test-cluster clean
setup: $(VENV)/.installed setup-sandbox

# HumanEval runs model-written code under bubblewrap (eval/code_exec.py refuses without it).
# Installed when missing and root; otherwise say how (idempotent: nothing to do once present).
setup-sandbox:
	@command -v bwrap >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap; \
	else echo "bubblewrap missing: run 'sudo apt-get install bubblewrap' (HumanEval's sandbox)"; fi; }

# Debian docs for the demo corpus's textbook and math domains (root). Without them the corpus
# builder falls back to text that is always present and records that in its manifest.
DEMO_DEBS := python3-doc python-sympy-doc pari-doc maxima-doc gap-doc debian-reference-en abs-guide
setup-debs:
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEMO_DEBS)

$(VENV)/.installed: pyproject.toml requirements-cpu.txt requirements-offline.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q --no-deps -r requirements-offline.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The corpus builder installs DEMO_DEBS itself when run as root (--install-debs).
data/demo_corpus/manifest.json: | setup
	$(BIN)/python -m tools.demo_corpus --out data/demo_corpus $(if $(filter 0,$(shell id -u)),--install-debs,)

# HumanEval executes model-written code (sandboxed); the demo confirms it here and in its config.
demo: setup data/demo_corpus/manifest.json
	HF_ALLOW_CODE_EVAL=1 $(BIN)/attninf +experiment=demo

# One pytest-xdist worker per core, a test file per worker at a time (module fixtures such as the
# smoke pipeline run once): most of the suite is process start-up and Python, not arithmetic.
test: setup
	$(BIN)/python -m pytest -q -n logical --dist loadfile

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The data path at paper shape: 1M synthetic documents in 400 parquet files, ingest and mix as
# 8 array tasks; prints the per-task bytes, blend sizes, memory and rates (tests/test_scale.py).
test-scale: setup
	$(BIN)/python -m pytest -q -s -m scale

# Real Slurm jobs on a two-node Slurm started here (two slurmd on this machine; root; installs slurm-wlm + munge when
# missing) and stopped again whatever the tests do. CI runs this, the time-limit test included.
test-cluster: setup
	slurm/local_cluster.sh up 2
	$(BIN)/python -m pytest -q -m slurm; rc=$$?; slurm/local_cluster.sh down; exit $$rc

clean:
	rm -rf $(VENV) runs multirun outputs
