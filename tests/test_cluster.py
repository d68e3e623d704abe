"""The whole pipeline on a 2-node Ray cluster (ray.cluster_utils.Cluster on this machine), driven by
the command a user runs on a real cluster: `RAY_ADDRESS=... discomv run` (one streaming pipeline:
its stages run at the same time, on both nodes)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.manifest import ManifestStore
from pipeline.tools import synth
from pipeline.tools.demo import SMALL_MODELS
from stages import STAGES

CLUSTER = """
import json, os, subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
with open(sys.argv[2], "w") as f:
    json.dump([node.node_id for node in cluster.list_all_nodes()], f)
env = dict(os.environ, RAY_ADDRESS=cluster.address)
code = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", "-c", sys.argv[1], "--no-progress"],
                      env=env).returncode
cluster.shutdown()
sys.exit(code)
"""
VIDEOS = 3


def test_every_stage_runs_on_a_two_node_cluster(tmp_path: Path, media_dir: Path, server, write_lines, synthetic_media):
    folder = media_dir / "cluster"
    names = []
    for i in range(VIDEOS):  # 12 s: one full 10 s clip each after the fan-out
        path = folder / f"mv{i}.mp4"
        if not path.exists():
            synthetic_media(path, synth.make_video, "moving", duration_s=12, seed=i, size="160x120")
        names.append(f"cluster/{path.name}")
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/slow/300/{n}" for n in names])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"manifest_root": str(tmp_path / "m"), "media_root": str(tmp_path / "media"),
                "shard_root": str(tmp_path / "shards"), "weights": "random"},
        "ingest": {"inputs": [urls]},
        # one CPU per actor on 1-CPU nodes: the two download actors must land on different nodes
        "download": {"allow_private_hosts": True, "concurrency": 2, "num_cpus": 1},
        **SMALL_MODELS,
        # one row per batch: each video moves on as soon as a stage is done with it, not with a batch
        **{name: {**SMALL_MODELS.get(name, {}), "batch_size": 1} for name in ("filter", "separate", "features")},
    }))
    nodes_file = tmp_path / "nodes.json"
    proc = subprocess.run([sys.executable, "-c", CLUSTER, str(config), str(nodes_file)], capture_output=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    cluster_nodes = {node[:12] for node in json.loads(nodes_file.read_text())}  # the manifest keeps 12 chars
    assert len(cluster_nodes) == 2

    store = ManifestStore(tmp_path / "m")
    placement = {}
    for name in STAGES:
        rows = store.latest(name).to_pylist()
        assert rows and {r["status"] for r in rows} == {"ok"}, (name, [(r["key"], r["reason"]) for r in rows])
        placement[name] = {r["node"] for r in rows}
        assert placement[name] <= cluster_nodes, f"{name} rows name nodes outside the cluster: {placement[name]}"
    assert len(store.latest("shards")) == VIDEOS, "one clip per video reached the shards"
    assert set().union(*placement.values()) == cluster_nodes
    busy = {}  # (stage, node) → when its rows were worked on
    for name in STAGES:
        for r in store.latest(name).to_pylist():
            start = r["finished_at"].timestamp() - (r["elapsed_s"] or 0.0)
            lo, hi = busy.get((name, r["node"]), (start, r["finished_at"].timestamp()))
            busy[(name, r["node"])] = (min(lo, start), max(hi, r["finished_at"].timestamp()))
    at_once = [(a, b) for a in busy for b in busy if a[0] < b[0] and a[1] != b[1]
               and busy[a][0] < busy[b][1] and busy[b][0] < busy[a][1]]
    assert at_once, f"streaming: some two stages ran at the same time on the two nodes: {busy}"
