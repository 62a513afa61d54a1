# report_builder: `make report` runs the offline demo end to end, `make test` runs the test suite.
# Both build the virtual environment first if it is missing or out of date.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SPEC   ?= specs/demo.yaml
RUN    ?= output/demo
EXECUTOR ?= local
# The PyTorch build to install; this pair installs from the local wheel store on our machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup report render validate diff bench test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,ray]'
	@touch $(STAMP)

# make report [SPEC=specs/my.yaml] [EXECUTOR=ray] [RAY_ADDRESS=auto] [WORKERS=N|auto]
report: setup
	$(PY) -m report_builder run $(SPEC) --executor $(EXECUTOR) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) $(if $(WORKERS),--workers $(WORKERS))

render: setup
	$(PY) -m report_builder render $(RUN)

validate: setup
	$(PY) -m report_builder validate $(SPEC)

# make diff A=output/run-a B=output/run-b [OUT=output/diff-run-a-vs-run-b]
diff: setup
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make diff A=output/<run-a> B=output/<run-b> [OUT=dir]"; exit 2; }
	$(PY) -m report_builder diff $(A) $(B) $(if $(OUT),--out $(OUT))

# Side-by-side timings of each optimised stage against its baseline, the full-size scale runs and the demo;
# writes output/bench/bench.json. BENCH_ARGS=--quick for a smoke run, --only scale for one section.
bench: setup
	$(PY) -m report_builder.bench $(BENCH_ARGS)

# One pytest worker per core, each test file on one worker (its module fixtures built once): most of the suite is
# single-threaded Python (imports, rendering, subprocess runs), which a single process runs on one core at a time.
# TEST_ARGS="-n 0" runs it in one process. The 15 slowest items are printed at the end (the suite's budget is 10 min).
TEST_ARGS ?= -n auto --dist loadfile --no-loadscope-reorder
test: setup
	$(PY) -m pytest -q --durations=15 $(TEST_ARGS)

clean:
	rm -rf output/*/ output/.*.partial-* .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
