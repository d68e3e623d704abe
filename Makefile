# Thin wrappers over the `discomv` CLI.  make <target> CONFIG=path.yaml SET="section.key=value ..."
PYTHON ?= python3
CONFIG ?=
SET ?=
ARGS = $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))
STAGES = ingest download filter separate clips beats tokens features shards

.PHONY: setup apt pip demo test lint run audit verify cost status train compact weights bench $(STAGES)

setup: apt pip  ## install everything: apt (ffmpeg, espeak-ng, sox) and the project with pinned deps

apt:
	@if command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null && command -v sox >/dev/null; then \
	  echo "apt: ffmpeg, espeak-ng, sox present"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng sox; \
	else \
	  echo "need ffmpeg, espeak-ng, sox: sudo apt-get install -y ffmpeg espeak-ng sox"; exit 1; \
	fi

pip:
	$(PYTHON) -m pip install -q -e ".[dev]"

demo:  ## offline end-to-end demo on synthetic music videos served from 127.0.0.1
	discomv demo --out demo

test:  ## lint + the whole test suite
	ruff check .
	$(PYTHON) -m pytest -q

lint:
	ruff check .

$(STAGES):
	discomv $@ $(ARGS)

run:  ## every stage in order
	discomv run $(ARGS)

cost:  ## extrapolate this run's per-stage CPU/GPU-seconds to DISCO-MV scale (docs/cost.md)
	discomv cost $(ARGS)

verify:  ## re-read every shard: checksums, members, arrays, one shard per sharded clip
	discomv verify $(ARGS)

audit:  ## funnel, terminal states, reasons; audit.parquet, report.html, DATASET_CARD.md
	discomv audit $(ARGS) --html report.html --card DATASET_CARD.md

status:
	discomv status $(ARGS)

compact:
	discomv compact $(ARGS)

weights:  ## download real weights (needs network) and pin their sha256 in models/weights.lock.json
	discomv weights $(ARGS)

SHARDS ?= shards
STEPS ?= 200
train:  ## train the bundled model (tiny config) on the shards; make train SHARDS=demo/shards STEPS=50
	discomv train --shards $(SHARDS) --config tiny --steps $(STEPS) --out runs/tiny

bench:
	@for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done
