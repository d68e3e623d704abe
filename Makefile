# Thin wrappers over the `discomv` CLI.  make <target> CONFIG=path.yaml SET="section.key=value ..."
PYTHON ?= python3
CONFIG ?=
SET ?=
ARGS = $(if $(CONFIG),--config $(CONFIG)) $(foreach s,$(SET),--set $(s))
STAGES = ingest download filter separate clips beats tokens features shards

.PHONY: setup apt pip demo test lint run audit browse verify cost status train compact weights bench bench-gpu cluster-demo $(STAGES)

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
	$(PYTHON) -m pip install -q -e ".[dev,s3,gcs]"

demo:  ## offline end-to-end demo on synthetic music videos served from 127.0.0.1
	discomv demo --out demo

test:  ## lint + the whole test suite
	ruff check .
	$(PYTHON) -m pytest -q --durations=15

lint:
	ruff check .

$(STAGES):
	discomv $@ $(ARGS)

run:  ## every stage as one streaming Ray Data pipeline (SET="run.executor=stages": stage after stage)
	discomv run $(ARGS)

cost:  ## extrapolate this run's per-stage CPU/GPU-seconds to DISCO-MV scale (docs/cost.md)
	discomv cost $(ARGS)

verify:  ## re-read every shard: checksums, members, arrays, one shard per sharded clip
	discomv verify $(ARGS)

audit:  ## funnel, terminal states, reasons; audit.parquet, report.html, DATASET_CARD.md
	discomv audit $(ARGS) --html report.html --card DATASET_CARD.md

PORT ?= 8765
browse:  ## a local read-only web app over the manifests and shards: make browse CONFIG=demo/config.yaml [PORT=8765]
	discomv browse $(ARGS) --port $(PORT)

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

BENCH_ARGS ?=
bench:  ## every bench/*.py, one combined table into README.md; make bench BENCH_ARGS="--only filter,shards" or "--quick"
	$(PYTHON) bench/run_all.py $(BENCH_ARGS)

GPU_ARGS ?=
bench-gpu:  ## every GPU path in one run on a GPU machine (installs first), table in build/gpu-bench/gpu.md; GPU_ARGS="--cpu-smoke"
	PYTHON=$(PYTHON) bash bench/gpu.sh $(GPU_ARGS)

# A 2-node Ray cluster on this machine with the commands a user runs on a real one: `ray start --head`,
# `ray start --address` for a second raylet, the demo through RAY_ADDRESS, then which node ran what.
# Each `ray start --block` stays in the foreground of its own background job; killing that job (by its
# PID, on any exit) stops the processes it started and nothing else (`ray stop` would stop every Ray on
# the machine). Ports and temp dirs are per node so two raylets can share one host. Clients use the
# head's token auth (~/.ray/auth_token) as `ray start` does when that file exists.
CLUSTER_WORK ?= build/cluster-demo
CLUSTER_PORT ?= 6390
CLUSTER_VIDEOS ?= 8
# short: Ray's unix socket paths live under it
CLUSTER_TMP ?= /tmp/discomv-cluster
comma := ,
empty :=
space := $(empty) $(empty)
PLACEMENT_SQL = select stage, node, count(*) as rows, count(*) filter (where status = 'ok') as ok from \
  (select 'ingest' as stage, node, status from ingest \
  $(foreach s,$(filter-out ingest,$(STAGES)),union all select '$(s)', node, status from $(s))) \
  group by stage, node order by list_position([$(subst $(space),$(comma),$(foreach s,$(STAGES),'$(s)'))], stage), node
cluster-demo:  ## the demo on a 2-node Ray cluster on this machine; prints which node ran each stage's rows
	@set -eu; work="$(CLUSTER_WORK)"; addr="127.0.0.1:$(CLUSTER_PORT)"; head=""; worker=""; \
	rm -rf "$$work/demo"; mkdir -p "$$work"; work="$$(cd "$$work" && pwd)"; \
	trap 'echo "== stopping the cluster (pids $$head $$worker)"; kill $$worker $$head 2>/dev/null || true; wait' EXIT; \
	echo "== ray start --head --num-cpus=1 --port=$(CLUSTER_PORT)   (log: $$work/head.log)"; \
	ray start --head --block --num-cpus=1 --port=$(CLUSTER_PORT) --node-ip-address=127.0.0.1 \
	  --temp-dir="$(CLUSTER_TMP)/head" --include-dashboard=false --dashboard-agent-listen-port=0 \
	  --disable-usage-stats >"$$work/head.log" 2>&1 & head=$$!; \
	if [ -z "$${RAY_AUTH_MODE:-}" ] && [ -s "$$HOME/.ray/auth_token" ]; then export RAY_AUTH_MODE=token; fi; \
	for i in $$(seq 60); do ray status --address="$$addr" >/dev/null 2>&1 && break; sleep 2; done; \
	echo "== ray start --address=$$addr --num-cpus=1   (a second raylet; log: $$work/worker.log)"; \
	ray start --block --address="$$addr" --num-cpus=1 --node-ip-address=127.0.0.1 \
	  --temp-dir="$(CLUSTER_TMP)/worker" --dashboard-agent-listen-port=0 \
	  --disable-usage-stats >"$$work/worker.log" 2>&1 & worker=$$!; \
	for i in $$(seq 60); do [ "$$(ray status --address="$$addr" 2>/dev/null | grep -c ' node_')" -ge 2 ] && break; sleep 2; done; \
	ray status --address="$$addr" >"$$work/status.txt"; sed -n '/Node status/,/Pending/p' "$$work/status.txt"; \
	[ "$$(grep -c ' node_' "$$work/status.txt")" -ge 2 ] || { echo "the second raylet did not join; see $$work/worker.log"; exit 1; }; \
	echo "== RAY_ADDRESS=$$addr discomv demo --out $$work/demo --videos $(CLUSTER_VIDEOS)"; \
	RAY_ADDRESS="$$addr" discomv demo --out "$$work/demo" --videos $(CLUSTER_VIDEOS) --no-progress; \
	echo "== nodes"; \
	RAY_ADDRESS="$$addr" $(PYTHON) -c "import ray; ray.init(logging_level='ERROR'); \
	  [print(n['NodeID'][:12], 'head' if 'node:__internal_head__' in n['Resources'] else 'worker', n['Resources'].get('CPU')) for n in ray.nodes() if n['Alive']]"; \
	echo "== placement: rows per stage and node (discomv audit --sql)"; \
	discomv audit -c "$$work/demo/config.yaml" --sql "$(PLACEMENT_SQL)"
