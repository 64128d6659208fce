# The commands people type. Each target installs what it needs into .venv on first use.
# Artifacts are cached: a second `make demo` only redoes what is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# pip's -c file: the torch release these machines use (pyproject.toml itself admits any current one).
CONSTRAINTS ?= constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | cksum | cut -d' ' -f1)

WORLD    := data/world
TEACHER  := artifacts/teacher
FEATURES := artifacts/features
STUDENT  := artifacts/student
BUNDLE   := artifacts/bundle
INDEX    := artifacts/index

# make distill CONFIG=configs/paper.json OUT=runs/f30k ARGS="--set data.features=..."
CONFIG ?= configs/demo.json
OUT    ?= runs/student
ARGS   ?=

.PHONY: help install lock lint bench test demo world teacher features recall student distill evaluate export index serve clean

help:
	@echo "make demo    - the whole pipeline on the demo world: teacher, features, student (recall side by side),"
	@echo "               ONNX export, index, then the search server on http://127.0.0.1:8000/"
	@echo "make distill - train a student: CONFIG=configs/demo.json OUT=runs/student ARGS='--set key=value ...'"
	@echo "make export  - export the demo student to an ONNX bundle (others: dsmd export student RUN --out DIR --data DATA)"
	@echo "make index   - index the demo test images and captions (others: dsmd index build DIR --bundle B --folder F)"
	@echo "make serve   - the search server and web page on the demo index (PORT=8000)"
	@echo "make test    - run the test suite (a subset: make test PYTEST_ARGS='-m \"not slow\"')"
	@echo "make lint    - ruff over the repository (zero findings expected)"
	@echo "make bench   - serving under load (wrk) and encoder latency, demo and base presets (tens of minutes);"
	@echo "               results in a new folder bench/results/bench-DATE-TIME/"
	@echo "make clean  - remove generated data and artifacts (keeps .venv)"
	@echo "Everything else: $(BIN)/dsmd --help"

# torchscale/fairscale: BEiT-3's reference implementation, for the parity tests only; their own
# pins are too old to install with dependencies.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[train,test]'
	$(BIN)/pip install -q --no-deps torchscale==0.3.0 fairscale==0.4.0
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The serve image's pinned dependencies (Dockerfile), from pyproject.toml's [serve] extra.
lock: | $(STAMP)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile --quiet --extra serve --generate-hashes --no-emit-index-url --no-emit-find-links \
		--strip-extras --output-file requirements-serve.lock pyproject.toml

# The web-page test drives a real headless browser: Debian's chromium and its driver, installed with apt
# where that works (Debian, as root). Elsewhere the test is skipped with the reason printed,
# unless DSMD_NO_SKIPS=1 (set by .ci/run) makes any skip a failed run.
BROWSER := $(VENV)/.chromium
$(BROWSER): | $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then touch $@; \
	elif ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
		echo "note: no chromium here and no apt-get as root to install it: the web-page test will be skipped"; \
		echo "      (install chromium and chromedriver yourself to run it)"; \
	else \
		echo "installing chromium and chromium-driver (apt) for the web-page test"; \
		{ apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && \
		  apt-get install -y -q chromium chromium-driver >/dev/null; }; } && touch $@ || \
		echo "note: could not install chromium with apt: the web-page test will be skipped"; fi

# make test PYTEST_ARGS='-m "not slow"' runs the quick part; PYTEST_ARGS=tests/test_serve.py one file.
PYTEST_ARGS ?=
test: $(STAMP) $(BROWSER)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

$(WORLD)/dataset_world.json: | $(STAMP)
	$(BIN)/dsmd generate --out $(WORLD)

$(TEACHER)/manifest.json: $(WORLD)/dataset_world.json | $(STAMP)
	$(BIN)/dsmd train-teacher --data $(WORLD) --out $(TEACHER)

# A finished store older than the teacher is stale: remove it. An unfinished one resumes.
$(FEATURES)/manifest.json: $(TEACHER)/manifest.json | $(STAMP)
	if [ -f $@ ]; then rm -rf $(FEATURES); fi
	$(BIN)/dsmd features --teacher demo --teacher-path $(TEACHER) --data $(WORLD) --out $(FEATURES)

world: $(WORLD)/dataset_world.json
teacher: $(TEACHER)/manifest.json
features: $(FEATURES)/manifest.json

recall: $(FEATURES)/manifest.json
	$(BIN)/dsmd recall $(FEATURES) --split test

# The demo student. A finished run, or one started before the features or the config last
# changed, is stale; an unfinished one resumes where it was killed.
$(STUDENT)/manifest.json: $(FEATURES)/manifest.json configs/demo.json | $(STAMP)
	if [ -f $@ ] || [ $(FEATURES)/manifest.json -nt $(STUDENT)/config.json ] \
		|| [ configs/demo.json -nt $(STUDENT)/config.json ]; then rm -rf $(STUDENT); fi
	$(BIN)/dsmd distill --config configs/demo.json --out $(STUDENT)

student: $(STUDENT)/manifest.json

evaluate: $(STUDENT)/manifest.json
	$(BIN)/dsmd evaluate $(STUDENT) --data $(WORLD) --features $(FEATURES) --split test --json $(STUDENT)/test_recall.json

# Trains from CONFIG; the demo config's features are built first.
distill: $(if $(filter configs/demo.json,$(CONFIG)),$(FEATURES)/manifest.json) | $(STAMP)
	$(BIN)/dsmd distill --config $(CONFIG) --out $(OUT) $(ARGS)

# The bundle is checked against the PyTorch student on the test split while it is exported.
$(BUNDLE)/manifest.json: $(STUDENT)/manifest.json | $(STAMP)
	$(BIN)/dsmd export student $(STUDENT) --out $(BUNDLE) --data $(WORLD) --split test --variants int8,fp16

export: $(BUNDLE)/manifest.json

# The demo index: the test images and their captions. A new bundle means a new index.
$(INDEX)/manifest.json: $(BUNDLE)/manifest.json | $(STAMP)
	rm -rf $(INDEX)
	$(BIN)/dsmd index build $(INDEX) --bundle $(BUNDLE) --data $(WORLD) --split test

index: $(INDEX)/manifest.json
	$(BIN)/dsmd index info $(INDEX)
	$(BIN)/dsmd index recall $(INDEX)

# Ends with the server in the foreground (Ctrl-C stops it).
PORT ?= 8000
serve: $(INDEX)/manifest.json
	$(BIN)/dsmd serve --bundle $(BUNDLE) --index $(INDEX) --port $(PORT)

demo: evaluate export index
	@echo
	@echo "Try: curl 'http://127.0.0.1:$(PORT)/search?text=a+red+circle+left+of+a+blue+square&k=3'"
	@$(MAKE) --no-print-directory serve

# Serving under load needs wrk (a C load generator): installed with apt like chromium for the tests.
WRK := $(VENV)/.wrk
$(WRK): | $(STAMP)
	@command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && \
		apt-get install -y -q wrk >/dev/null; } || { echo "could not install wrk: run 'apt-get install wrk' as root"; \
		exit 1; }; }
	touch $@

# The serving benchmark on the demo bundle and the base preset (random weights: timing only), then
# the encoder latencies. Tens of minutes on 2 cores. Each run writes a new folder, so the results that
# BENCHMARKS.md cites (bench/results/load, load-int8, latency, beit3-bundle) are never overwritten.
BENCH_OUT := bench/results/bench-$(shell date +%Y-%m-%d-%H%M)
bench: $(BUNDLE)/manifest.json $(WRK)
	$(BIN)/python bench/load.py --presets base demo --out $(BENCH_OUT)/load
	$(BIN)/python bench/load.py --presets base --variant int8 --out $(BENCH_OUT)/load-int8
	$(BIN)/python bench/latency.py --out $(BENCH_OUT)/latency
	$(BIN)/python bench/beit3_bundle.py --out $(BENCH_OUT)/beit3-bundle
	@echo "results in $(BENCH_OUT)/"

clean:
	rm -rf data artifacts
