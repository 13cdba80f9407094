"""Before the first trial: can every node of the cluster see the run directory and the data root?

Trials on any node read and write the same run directory (and read the dataset), so a cluster needs shared
storage (NFS/EFS) mounted at one path on every node. The driver writes a probe file with a random token into
the run directory; one tiny task pinned to each alive node must read that same token back (a node with a local
folder of the same name would not) and find the data root. A cluster of one node, the driver's own (local
Ray), is checked by the driver itself. A node that cannot is named in a one-line error
before anything else is written, and the probe is removed either way.

$GEOVQ_PREFLIGHT_BLIND_NODES (comma-separated node ids) makes the check on those nodes behave as if the
storage were missing: nodes started on one machine share its disk, so tests simulate a blind node this way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from geovq.errors import GeovqError

BLIND_NODES_ENV = "GEOVQ_PREFLIGHT_BLIND_NODES"


def _probe(probe: str, token: str, data_root: str | None) -> tuple[str, str | None]:
    """On one node: (its id, None) if it sees the probe's token and the data root, else (its id, what is missing)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    blind = node in os.environ.get(BLIND_NODES_ENV, "").split(",")
    try:
        seen = not blind and Path(probe).read_text() == token
    except OSError:
        seen = False
    if not seen:
        return node, f"the run directory {Path(probe).parent}"
    if data_root is not None and (blind or not Path(data_root).exists()):
        return node, f"the data root {data_root}"
    return node, None


def check_storage(run_root: Path, data_root: str | None) -> None:
    """Raise GeovqError naming the first node that cannot see `run_root` (or `data_root`)."""
    import ray

    probe = run_root.resolve() / f".preflight-{secrets.token_hex(8)}"
    token = secrets.token_hex(16)
    probe.write_text(token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if [n["NodeID"] for n in nodes] == [ray.get_runtime_context().get_node_id()]:
            # one node, the driver's own (local Ray): the driver looks itself, sparing a worker start (~2 s)
            answers = [_probe(str(probe), token, data_root)]
        else:
            answers = _probe_nodes(nodes, str(probe), token, data_root)
    finally:
        probe.unlink(missing_ok=True)
    for (node, missing), info in zip(answers, nodes):
        if missing is not None:
            raise GeovqError(f"node {node} ({info.get('NodeManagerAddress')}) cannot see {missing}: every node "
                             "needs the run directory and the data root on shared storage (NFS/EFS) mounted at the "
                             "same path; see docs/cluster.md")


def _probe_nodes(nodes: list[dict], probe: str, token: str, data_root: str | None) -> list[tuple[str, str | None]]:
    """`_probe` as one tiny task pinned to each node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe_task = ray.remote(num_cpus=0)(_probe)
    env = {BLIND_NODES_ENV: os.environ.get(BLIND_NODES_ENV, "")}
    return ray.get([probe_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                       runtime_env={"env_vars": env}).remote(probe, token, data_root)
                    for n in nodes], timeout=120)
