"""The runner on a 2-node Ray cluster (ray.cluster_utils.Cluster on this machine), driven by the
same command a user runs on a real cluster: `RAY_ADDRESS=... discomv download`."""

import subprocess
import sys
from pathlib import Path

import yaml
from conftest import copy_many, write_lines

from pipeline.manifest import ManifestStore

CLUSTER = """
import os, subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
env = dict(os.environ, RAY_ADDRESS=cluster.address)
code = 0
for stage in ("ingest", "download"):
    code |= subprocess.run([sys.executable, "-m", "pipeline.cli", stage, "-c", sys.argv[1], "--no-progress"],
                           env=env).returncode
cluster.shutdown()
sys.exit(code)
"""


def test_download_spreads_over_two_nodes(tmp_path: Path, media_dir: Path, server):
    names = copy_many(media_dir / "moving.mp4", media_dir / "cluster", 8)
    urls = write_lines(tmp_path / "urls.txt", [f"{server.url}/slow/300/{n}" for n in names])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"manifest_root": str(tmp_path / "m"), "media_root": str(tmp_path / "media")},
        "ingest": {"inputs": [urls]},
        # one CPU per actor on 1-CPU nodes: the two actors must land on different nodes
        "download": {"allow_private_hosts": True, "concurrency": 2, "num_cpus": 1},
    }))
    proc = subprocess.run([sys.executable, "-c", CLUSTER, str(config)], capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stdout.decode()[-3000:] + proc.stderr.decode()[-3000:]
    rows = ManifestStore(tmp_path / "m").latest("download").to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert len({r["node"] for r in rows}) == 2, "both nodes ran downloads"
