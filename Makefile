# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch pin is installed first: a range in pyproject.toml (torch>=2.2,<3) is then already satisfied and
# pip does not fetch a multi-GB CUDA build. Elsewhere, users get the build their platform offers.
TORCH  ?= torch==2.13.0

.PHONY: demo test install lint bench clean browser postgres

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" || $(BIN)/python -m pip install -q "torch>=2.2,<3"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# A real sweep on the embedded defaults (local Ray, MLflow on ./mlflow.db), then the leaderboard and export.
demo: install
	$(BIN)/automl run search_spaces/digits_mlp.yaml
	rm -rf best
	$(BIN)/automl export digits-mlp --format mlflow --out best/
	$(BIN)/python -c "import sklearn.datasets as d; d.load_digits(as_frame=True).frame.drop(columns='target').head(5).to_csv('best/rows.csv', index=False)"
	$(BIN)/automl predict best/ best/rows.csv

# The status-page test drives a real browser: Debian's chromium and its driver, installed when missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The scale-out tests run a real PostgreSQL server (initdb, pg_ctl): installed when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The suite in two parts: two workers (pytest-xdist, one test module per worker at a time, each with its own local
# Ray), then the timed contracts alone on a quiet machine. `pytest` by itself runs everything in one process.
test: install browser postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -q -m serial

lint: install
	$(BIN)/ruff check automl trainers tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts .automl best
