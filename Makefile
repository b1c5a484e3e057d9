# Two entry points: `make run` (the offline demo) and `make test` (the suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pip takes this exact CUDA build from the local disk
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/xtl demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf runs .pytest_cache
