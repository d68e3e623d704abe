"""The line a run starts with (pipeline/rayconsole.describe): where Ray runs, its size, and the
dashboard's URL, or why there is none, on this machine and on a cluster."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray

from pipeline import rayconsole

NO_LOCAL = "no dashboard (`pip install 'discomv[dashboard]'` adds one)"


@pytest.mark.parametrize(("url", "address", "tail"), [
    ("", None, NO_LOCAL),
    (None, None, NO_LOCAL),
    ("127.0.0.1:8265", None, "dashboard http://127.0.0.1:8265"),
    ("10.0.0.5:8265", "10.0.0.5:6379", "dashboard http://10.0.0.5:8265"),
    ("", "10.0.0.5:6379", "no dashboard (the cluster runs without one)"),
], ids=["local-none", "local-missing", "local-dashboard", "cluster-dashboard", "cluster-none"])
def test_first_line_names_where_ray_runs_and_its_dashboard(monkeypatch, url, address, tail):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    where = f"cluster {address}" if address else "embedded Ray on this machine"
    assert rayconsole.describe(SimpleNamespace(dashboard_url=url), address) == f"ray: {where} (2 CPUs, 1 GPU); {tail}"


def test_first_line_counts_one_cpu_and_no_gpu(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    line = rayconsole.describe(SimpleNamespace(dashboard_url=""), "h:6379")
    assert line == "ray: cluster h:6379 (1 CPU); no dashboard (the cluster runs without one)"
