# gitlab-producer: the two gates are `make lint` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint build package bench clean redis-server-installed faketime-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's redis-server, for test runs on machines where no Redis answers on 6379.
redis-server-installed:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
	  || { echo "could not install redis-server"; exit 1; }; }

# Debian's faketime: the time tests run the simulator with its clock moved.
faketime-installed:
	@command -v faketime >/dev/null 2>&1 || { \
	  echo "installing faketime (Debian package)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime) \
	  || { echo "could not install faketime"; exit 1; }; }

demo: $(STAMP)
	$(BIN)/gitlab-producer demo

test: $(STAMP) redis-server-installed faketime-installed
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

build: $(STAMP)
	$(BIN)/pip install --quiet build
	$(BIN)/python -m build

package:
	docker build -t gitlab-producer:latest .

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) dist build var .pytest_cache .mypy_cache .ruff_cache
