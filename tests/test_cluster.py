"""A real two-node Ray cluster on this machine (a head and a worker node with distinct resources, as
`ray start` would make): trials are placed on both nodes and finish, data travels by Ray's object store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

SCRIPT = r"""
import json, logging, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from automl import Sweep

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_node": 1}})
cluster.add_node(num_cpus=1, resources={"worker_node": 1})
cluster.wait_for_nodes()
try:
    spec = {
        "name": "two-nodes", "trainer": "toy_trainers:LogisticFitter",
        "data": {"source": "sklearn:iris"}, "metric": {"name": "val_accuracy"},
        "method": "random", "budget": {"trials": 6},
        "resources": {"cpu": 1},
        "parameters": {"C": {"type": "float", "low": 0.1, "high": 10, "log": True}},
    }
    result = Sweep.from_dict(spec, base_dir=Path(sys.argv[1]), workdir=Path.cwd(), address=cluster.address).run()
    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.endswith("_node")) for n in ray.nodes() if n["Alive"]}
    print("RESULT " + json.dumps({
        "trials": [[t.state, t.node] for t in result.trials],
        "nodes": nodes,
        "slots": int(result.trials and len({t.node for t in result.trials})),
        "best": result.best.value if result.best else None,
    }))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_trials_run_on_both_nodes_of_a_two_node_cluster(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ASSETS)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert [state for state, _ in result["trials"]] == ["COMPLETE"] * 6
    used = {node for _, node in result["trials"]}
    labels = {tuple(result["nodes"][n]) for n in used}
    assert labels == {("head_node",), ("worker_node",)}  # both the head and the worker node ran trials
    assert result["best"] > 0.8
