"""Shared fixtures. Ray tests run a REAL local Ray (no local_mode in Ray 2.60), started once per session."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Ray needs a short socket path and, in 2.60, no auth token for a private local cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# No idle workers started ahead of demand (Ray starts one per CPU for each driver that connects): the tests' trials
# are Tune actors, which get workers of their own, so those sat idle, ~1 CPU-s of imports each, about 18 per suite.
# Ray's own system settings (its raylet reads RAY_<name>), inherited by every Ray the tests start.
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# Quantizers defined outside geovq (tests/plugins): importable here and, through PYTHONPATH, in Ray workers.
PLUGINS = os.path.join(os.path.dirname(__file__), "plugins")
sys.path.insert(0, PLUGINS)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [PLUGINS, os.environ.get("PYTHONPATH")]))

torch.set_num_threads(1)


LOCAL_RAY = dict(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=False)


def tiny_config(methods: list[str], codebook_sizes: list[int] | None = None, **options):
    """The tests' one small sweep configuration: digits at `--tiny` (the small trunk, 2 epochs, 300 training
    images), one seed, K = 16, no prior and one trial at a time unless told; `options` are resolve_config's
    (SweepConfig fields). One at a time: a tiny trial lasts about a second, a second trial worker costs ~7 CPU-s of
    imports, and the suite's other xdist worker keeps the second core busy."""
    from geovq.config import resolve_config

    options.setdefault("prior", None)
    options.setdefault("max_concurrent_trials", 1)
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The multi-node cluster's tests (test_cluster.py) run last: their module stops the session's local Ray for a
    `Cluster` of their own, and nothing runs after them that would need the local one started again. When a test
    reads the main job's run, the main job starts now, in the background (see `MainJob`). Meanwhile the modules
    that start no Ray work of their own run first (in-process tests on one torch thread, beside the main job's
    trials), then those whose sweeps need the session's Ray, then the modules that read the main job's run."""
    waiting = {item.path for item in items if "quick_run" in item.fixturenames}
    sweeping = {item.path for item in items if "ray_local" in item.fixturenames}
    # stable: modules keep their order otherwise, and each module's tests stay together and in order
    items.sort(key=lambda item: (item.path.name == "test_cluster.py", item.path in waiting, item.path in sweeping))
    if waiting and not config.option.collectonly:
        MainJob().start()


class MainJob:
    """The main job (`geovq sweep` with `sweeps.QUICK`), run once per test run as users run it: a console process
    with its own local Ray. It starts when the tests are collected and runs beside them, so that its idle moments
    and theirs (a phase waiting on the one before, a lone trial on one of the two cores, Ray starting, a lost node
    being noticed) overlap; `quick_run` waits for it to finish. With pytest-xdist, the first worker to collect
    starts it and every worker waits for the same run: the job's folder lies in the folder the controlling process
    made for the whole test run (SHARED), its exit status is written there when it ends (`rc`)."""

    def __init__(self) -> None:
        self.dir = Path(os.environ[SHARED]) / "main-job"

    def start(self) -> None:
        from sweeps import QUICK

        with open(self.dir.parent / "main-job.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.dir.exists():  # started by another worker
                return
            self.dir.mkdir()
            # the shell writes the exit status however long the worker that started it lives
            script = '"$0" -m geovq.cli "$@" > sweep.out 2>&1; echo $? > rc.tmp; mv rc.tmp rc'
            job = subprocess.Popen(["sh", "-c", script, sys.executable, *QUICK, "--out", "digits-quick"],
                                   cwd=self.dir, stdin=subprocess.DEVNULL, start_new_session=True)
            (self.dir / "pgid").write_text(str(job.pid))

    def result(self) -> Path:
        """The finished run's directory (waits for it); a failed job fails the tests that read it."""
        if not self.dir.exists():
            self.start()
        rc = self.dir / "rc"
        deadline = time.time() + 900
        while not rc.exists():
            if time.time() > deadline:
                pytest.fail("the main job did not finish within 900 s")
            time.sleep(0.2)
        if rc.read_text().strip() != "0":
            output = (self.dir / "sweep.out").read_text()[-4000:]
            pytest.fail(f"the main job exited {rc.read_text().strip()}:\n{output}")
        return self.dir / "digits-quick"

    def stop(self) -> None:
        """When the whole test run ends: a job still running (the run was interrupted) is stopped as Ctrl-C stops
        it."""
        if not (self.dir / "pgid").exists() or (self.dir / "rc").exists():
            return
        group = int((self.dir / "pgid").read_text())
        try:
            os.killpg(group, signal.SIGINT)
            deadline = time.time() + 60
            while time.time() < deadline:
                os.killpg(group, 0)  # ProcessLookupError once the job's processes are gone
                time.sleep(0.2)
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


#: the folder the whole test run shares (pytest-xdist's workers too): made by the controlling process
SHARED = "GEOVQ_TEST_RUN_DIR"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controlling process (or the only one): xdist's workers inherit it
        os.environ[SHARED] = tempfile.mkdtemp(prefix="geovq-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        MainJob().stop()
        shutil.rmtree(os.environ.pop(SHARED), ignore_errors=True)


@pytest.fixture(scope="module")
def multi_node_cluster():
    """A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a 1-CPU head, connected to.
    One per module; each test adds its own nodes (`ray_cluster`)."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray: test_cluster.py runs last, so no later test needs it again
    # A Cluster writes its address where `ray.init()` without an address looks for one to join: in a Ray temporary
    # folder of its own, no console sweep started meanwhile (by pytest-xdist's other worker) joins it.
    temp_dir = os.environ["RAY_TMPDIR"]
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                            "object_store_memory": 128 * 1024**2,
                                                            "_system_config": FAST_NODE_DEATH})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    os.environ["RAY_TMPDIR"] = temp_dir


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
    merges a copy of it with another run, and test_priors samples a copy's VQ-VAE. A test that runs the sweep again
    does it in a copy (test_sweep's `own_quick_run`)."""
    return MainJob().result()


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
