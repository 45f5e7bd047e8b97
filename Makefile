# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow setup clean

demo: $(STAMP)
	$(BIN)/compress-and-export

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest --run-slow

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/apt-packages.txt
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
