"""Shared fixtures. Ray tests run a REAL local Ray (no local_mode in Ray 2.60), started once per session."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch

# Ray needs a short socket path and, in 2.60, no auth token for a private local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

# Quantizers defined outside geovq (tests/plugins): importable here and, through PYTHONPATH, in Ray workers.
PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
sys.path.insert(0, PLUGINS)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PLUGINS, os.environ.get("PYTHONPATH")]))

torch.set_num_threads(1)


LOCAL_RAY = dict(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), connected to.

    The test adds nodes (`cluster.add_node(num_cpus=..., num_gpus=...)`); a GPU node here declares fake GPUs.
    The session's local Ray, if it was running, is started again afterwards.
    """
    import ray
    from ray.cluster_utils import Cluster

    restore = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "object_store_memory": 128 * 1024**2})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if restore:
        ray.init(**LOCAL_RAY)


@pytest.fixture(scope="session")
def quick_run(ray_local, tmp_path_factory):
    """The main job's run directory (`sweeps.QUICK`), swept once per session: test_sweep pins its numbers,
    test_report merges a copy of it with another run, and test_priors samples a copy's VQ-VAE. A test that changes
    it restores it (test_sweep's resume)."""
    from typer.testing import CliRunner

    from geovq.cli import app
    from sweeps import QUICK

    out = tmp_path_factory.mktemp("sweep") / "digits-quick"
    result = CliRunner().invoke(app, QUICK + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    return out
