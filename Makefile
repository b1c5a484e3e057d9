# Two entry points: `make run` (xtl run, the quick preset) and `make test` (the suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test venv clean chromium

# pyproject.toml gives ranges (for users' own environments); constraints.txt pins every package to
# the version the project is tested with, so a fresh `make venv` rebuilds the same environment.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, alone: pip takes this exact CUDA build from the local disk
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# Quantus (the agreement tests) without its opencv-python, which would clash over cv2 with the
	# opencv-python-headless that grad-cam brings; its other needs are in the test extra
	$(PY) -m pip install -q -c constraints.txt --no-deps quantus==0.6.0
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/xtl run

# The browser tests (report, app) drive Debian's Chromium; install it when it is missing.
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get install -y -qq chromium >/dev/null || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }; }

test: $(STAMP) chromium
	$(PY) -m pytest -n 2 --dist loadgroup -q

clean:
	rm -rf runs .pytest_cache
