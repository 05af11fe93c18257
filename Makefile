# The course's two commands. Both bootstrap .venv (pip + venv) on first use; a re-run with
# pyproject.toml unchanged skips the install.
#   make lab    # install, warm the model cache, start JupyterLab (opens notebooks/00_setup.ipynb)
#   make test   # install, warm the model cache, ruff + unit tests + every notebook (nbval)
# Maintainers:
#   make check  # the fast unit tests and doctests only (no notebooks, no `slow` tests)
VENV ?= .venv
PYTHON ?= python3
LAB_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# glibc's malloc, for every process the targets below start (notebooks and tests included):
# keep freed memory for reuse instead of handing each large block back to the system and
# mapping it anew at the next training step (page faults on every page). Padding-free
# batches of four train faster with them (bench/training_speed.py measures it side by
# side); a process's resident memory stays at its peak.
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 17179869184
# Jupyter refuses to start as root (containers, CI) unless told it is intended.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test check install warm lint execute times

$(STAMP): pyproject.toml sft_helpers/install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) sft_helpers/install.py local
	touch $(STAMP)

install: $(STAMP)

warm: install
	$(PY) -m sft_helpers.models warm

lab: warm
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/00_setup.ipynb $(ROOT_FLAG) $(LAB_ARGS)

lint: install
	$(VENV)/bin/ruff check sft_helpers tests bench notebooks

# Unit tests and notebooks in one pytest run, offline; nbval-lax checks only the cells
# marked NBVAL_CHECK_OUTPUT (and that no cell raises).
test: warm lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests sft_helpers notebooks --doctest-modules --nbval-lax --nbval-current-env

# The unit tests and doctests without the `slow` ones (processes, servers, training).
check: warm lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -p no:nbval tests sft_helpers --doctest-modules -m "not slow" -q

# Re-execute notebooks in place from a clean kernel (maintainers): make execute NB=notebooks/02_loss_masking.ipynb
NB ?= notebooks/*.ipynb
execute: warm
	HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace $(NB)

# Execute every notebook from a clean kernel, then write the minutes each took (recorded in
# its cells' metadata) into its badge and the README (maintainers): make times
times: warm
	for nb in notebooks/*.ipynb; do \
		HF_HUB_OFFLINE=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace $$nb || exit 1; \
	done
	$(PY) -m sft_helpers.course times
