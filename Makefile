# The two commands of the README:
#   make html   install what is needed, then build the site into _build/html
#   make test   install what is needed, build the site, then run every test
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# nbgrader runs helper programs (alembic) found on PATH
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: html test install system-deps exercises learner-repo bench clean

$(VENV)/.installed: requirements.txt pyproject.toml bn_exercises/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.txt
	touch $@

install: $(VENV)/.installed

# Debian packages the tests need: Chromium for the browser test (Playwright cannot
# download a browser here), bubblewrap for the class grader's sandbox, PostgreSQL for
# the gradebook test (the test starts and stops its own server).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (install them as root; their tests skip outside CI)"; fi; \
	fi

# A clean build every time: nothing stale can pass. -W turns every warning
# (an error in a page, stderr from a page, a broken reference) into a failure.
html: install
	rm -rf _build
	$(BIN)/jupyter-book build . -W --keep-going

# One worker per core; a test module's functions, or a test class's methods, stay together,
# so the fixtures they share (a class graded once, a fresh environment) are built once.
test: html system-deps
	$(PY) -m pytest -n auto --dist loadscope

# Record the visible checks' answers for the learner package, then regenerate the
# released notebooks from solutions/ (commit both: tests fail when either is stale).
exercises: install
	$(PY) -m bn_reference.grading.record
	for d in solutions/*/; do $(BIN)/nbgrader generate_assignment "$$(basename $$d)" --force --log-level=WARN; done

# The public repository a graded class's launch buttons open (book/instructors.md): the released
# notebooks and Binder's environment files, nothing of solutions/ or bn_reference.
learner-repo: install
	$(PY) -m bncourse.release _build/learner-repo

# Benchmarks print ratios measured side by side. The class-grading one (a class of 12 end to end,
# then 180 notebooks on 1, 2 and 4 Dask workers and over TCP, against serial nbgrader) takes an hour
# or more on two cores.
bench: install
	$(PY) -m bn_reference.benchmarks.backprop
	$(PY) -m bn_reference.benchmarks.whitening
	$(PY) -m bncourse.benchmark --json book/_data/grading_benchmark.json

clean:
	rm -rf _build submitted autograded feedback downloaded reports gradebook.db bn_exercises/build
