"""Shared fixtures. Ray tests run a REAL local Ray (no local_mode in Ray 2.60), started once per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

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


def tiny_config(methods: list[str], codebook_sizes: list[int] | None = None, **options):
    """The tests' one small sweep configuration: digits at `--tiny` (the small trunk, 2 epochs, 300 training
    images), one seed, K = 16 and no prior unless told; `options` are resolve_config's (SweepConfig fields)."""
    from geovq.config import resolve_config

    options.setdefault("prior", None)
    return resolve_config("digits", (1, 16, 16), methods, codebook_sizes or [16], 1, options.pop("epochs", None),
                          False, options.pop("method_params", None), tiny=True, **options)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (2 CPUs, no dashboard), started once per session."""
    import ray

    if not ray.is_initialized():
        ray.init(**LOCAL_RAY)
    yield ray
    ray.shutdown()


#: the multi-node cluster's Ray: a lost node is noticed within about a second (GCS health checks every 200 ms, three
#: misses), instead of Ray's default tens of seconds, for the tests that remove a node mid-sweep
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 200,
                   "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-node cluster's tests (test_cluster.py) run last: their module stops the session's local Ray for a
    `Cluster` of their own, and nothing runs after them that would need the local one started again. When a test
    reads the main job's run, the main job starts now, in the background (see `MainJob`). Meanwhile the modules
    that start no Ray work of their own run first (in-process tests on one torch thread, beside the main job's
    trials), then those whose sweeps need the session's Ray, then the modules that read the main job's run."""
    waiting = {item.path for item in items if "quick_run" in item.fixturenames}
    sweeping = {item.path for item in items if "ray_local" in item.fixturenames}
    # stable: modules keep their order otherwise, and each module's tests stay together and in order
    items.sort(key=lambda item: (item.path.name == "test_cluster.py", item.path in waiting, item.path in sweeping))
    if waiting:
        MAIN_JOB.start()


class MainJob:
    """The main job (`geovq sweep` with `sweeps.QUICK`), run once per session as users run it: a console process
    with its own local Ray. It starts when the session's tests are collected and runs beside them, so that its idle
    moments and theirs (a phase waiting on the one before, a lone trial on one of the two cores, Ray starting, a
    lost node being noticed) overlap; `quick_run` waits for it to finish."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.root = self.out = self.log = None

    def start(self) -> None:
        if self.process is not None:
            return
        from sweeps import QUICK

        self.root = Path(tempfile.mkdtemp(prefix="geovq-main-job-"))
        self.out, self.log = self.root / "digits-quick", self.root / "sweep.out"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "geovq.cli", *QUICK, "--out", str(self.out)],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def result(self) -> Path:
        """The finished run's directory (waits for it); a failed job fails the tests that read it."""
        self.start()
        if self.process.wait() != 0:
            pytest.fail(f"the main job exited {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
        return self.out

    def stop(self) -> None:
        """At the session's end: a job still running (the session was interrupted) is stopped as Ctrl-C stops it,
        and its directory removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


MAIN_JOB = MainJob()


def pytest_unconfigure(config: pytest.Config) -> None:
    MAIN_JOB.stop()


@pytest.fixture(scope="module")
def multi_node_cluster():
    """A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a 1-CPU head, connected to.
    One per module; each test adds its own nodes (`ray_cluster`)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray: test_cluster.py runs last, so no later test needs it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "object_store_memory": 128 * 1024**2,
                                                            "_system_config": FAST_NODE_DEATH})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_cluster(multi_node_cluster):
    """The module's cluster, to which the test adds nodes (`cluster.add_node(num_cpus=..., num_gpus=...)`; a GPU
    node here declares fake GPUs). The nodes it added are removed afterwards, so that the next test starts from the
    head alone."""
    head = set(id(node) for node in multi_node_cluster.list_all_nodes())
    yield multi_node_cluster
    for node in multi_node_cluster.list_all_nodes():
        if id(node) not in head:
            multi_node_cluster.remove_node(node)
    multi_node_cluster.wait_for_nodes()  # the head alone again, as the next test's resources must show


@pytest.fixture(scope="session")
def quick_run(ray_local):
    """The main job's run directory (`sweeps.QUICK`, see `MainJob`): test_sweep pins its numbers, test_report
    merges a copy of it with another run, and test_priors samples a copy's VQ-VAE. A test that changes it restores
    it (test_sweep's resume) on the session's Ray."""
    return MAIN_JOB.result()


@pytest.fixture(scope="session")
def plugin_sweep(ray_local, tmp_path_factory):
    """One sweep on local Ray of the two quantizers defined outside geovq (tests/plugins/geovq_toy.py), which Ray's
    workers import by the path their units carry: toy-q (spread 0.5) finishes, crash-q kills its own worker while
    fitting, with no retry (each would kill one more worker; Ray's retries are test_cluster's). Returns the run
    directory, the configuration and the sweep's RunFailed."""
    import geovq_toy  # noqa: F401  (registers toy-q and crash-q here)

    from geovq.distributed.tune import run_sweep
    from geovq.errors import RunFailed
    from geovq.stages.rundir import RunDir

    cfg = tiny_config(["toy-q", "crash-q"], method_params={"toy-q": {"spread": 0.5}}, max_failures=0)
    run = RunDir(tmp_path_factory.mktemp("plugins") / "run")
    run.root.mkdir()
    run.config.write_text(cfg.to_yaml())
    with pytest.raises(RunFailed) as failed:
        run_sweep(run, cfg, None)
    return run, cfg, failed.value
