"""GPU scheduling and multi-node behaviour on real Ray clusters started on this machine (fake GPUs)."""

from __future__ import annotations

import pytest

from conftest import tiny_config
from geovq.errors import GeovqError, RunFailed
from geovq.stages.rundir import RunDir


def test_trials_get_the_gpu_ray_assigns_and_fail_clearly_without_cuda(ray_cluster, tmp_path):
    import ray

    from geovq.distributed.tune import resolve_gpus_per_trial, run_sweep

    gpu_node = ray_cluster.add_node(num_cpus=2, num_gpus=1)
    ray_cluster.wait_for_nodes()
    assert resolve_gpus_per_trial(None) == 1.0  # auto: the cluster has a GPU
    cfg = tiny_config(["vqvae"], gpus_per_trial=1.0)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    with pytest.raises(RunFailed) as failed:
        run_sweep(run, cfg, ray_cluster.address)
    (line,) = failed.value.lines
    # the trial was placed on the GPU node and handed GPU 0, which has no CUDA device behind it here
    assert "was assigned GPU [0] by Ray, but torch sees no CUDA device" in line
    assert gpu_node.node_id in line
    assert ray.cluster_resources()["GPU"] == 1

    from geovq.distributed.data import actor_pool

    # Ray Data actor pools on this cluster: fractional GPUs share the one GPU, whole actors count per GPU
    assert [actor_pool(gpus, False).size for gpus in (0.25, 0.5, 1.0)] == [4, 2, 1]
    assert actor_pool(0.25, False, max_actors=3).size == 3


def test_gpu_requests_no_node_can_meet_fail_at_once(ray_cluster, tmp_path, monkeypatch):
    from geovq.distributed.tune import resolve_gpus_per_trial

    assert resolve_gpus_per_trial(None) == 0.0  # auto on a GPU-less cluster: CPU trials
    with pytest.raises(GeovqError, match=r"--gpus-per-trial 1 asks more GPUs per trial than any node has: the "
                                         r"largest of 1 node\(s\) has 0 GPU\(s\); node types the autoscaler can "
                                         r"start: none"):
        resolve_gpus_per_trial(1.0)
    config = tmp_path / "bootstrap.yaml"  # what `ray up` leaves on the head node
    config.write_text("available_node_types:\n  head: {resources: {}, max_workers: 0}\n"
                      "  gpu_worker: {resources: {GPU: 1, CPU: 8}, min_workers: 0, max_workers: 4}\n")
    monkeypatch.setenv("GEOVQ_AUTOSCALER_CONFIG", str(config))
    assert resolve_gpus_per_trial(None) == 1.0  # none now, but the autoscaler can start one
    assert resolve_gpus_per_trial(0.5) == 0.5
    with pytest.raises(GeovqError, match="node types the autoscaler can start: gpu_worker: 1"):
        resolve_gpus_per_trial(2.0)


def run_in_thread(run: RunDir, cfg, address: str):
    """run_sweep in a background thread (Tune runs fine off the main thread); returns (thread, errors)."""
    import threading

    from geovq.distributed.tune import run_sweep

    errors: list[BaseException] = []

    def target():
        try:
            run_sweep(run, cfg, address)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def wait_for(condition, timeout: float, what: str) -> None:
    import time

    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def trial_nodes(run: RunDir) -> list[str]:
    import json

    return [json.loads(line)["node_id"] for path in run.root.glob("ray/*/*/result.json")
            for line in path.read_text().splitlines() if line.strip()]


def test_trials_spread_over_nodes_and_a_lost_node_loses_no_finished_unit(ray_cluster, tmp_path):
    import json

    nodes = [ray_cluster.add_node(num_cpus=1) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    # VQ-VAEs: one phase, no VAE; a post-hoc unit would add its VAE's Ray Data extraction and a second Tune
    # experiment (test_ray_data runs that stage on its own)
    cfg = tiny_config(["vqvae"], [16, 64, 256], max_failures=3, max_concurrent_trials=None)  # as the CPUs hold
    cfg.train.epochs = 3
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(cfg.to_yaml())
    thread, errors = run_in_thread(run, cfg, ray_cluster.address)
    wait_for(lambda: any(run.root.glob("units/*/row.json")), 180, "a first finished unit")
    kept = {p: p.stat().st_mtime_ns for p in run.root.glob("units/*/row.json")}
    ray_cluster.remove_node(nodes[1])  # a node lost mid-sweep, with whatever ran on it
    thread.join(timeout=400)
    assert not thread.is_alive() and not errors, errors
    rows = [json.loads(p.read_text()) for p in run.root.glob("units/*/row.json")]
    assert sorted((r["method"], r["K"]) for r in rows) == [("vqvae", 16), ("vqvae", 64), ("vqvae", 256)]
    assert len({r["unit"] for r in rows}) == len(rows)  # no row duplicated
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished units were not redone
    assert len(set(trial_nodes(run))) >= 2  # the trials ran on more than one node


def test_a_killed_trial_is_retried_and_resumes_its_training_from_the_last_epoch(ray_cluster, tmp_path):
    import os
    import signal
    import subprocess

    import torch

    from geovq.stages.units import plan_units

    ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    # a VQ-VAE: one phase (a post-hoc unit would add the latents' Ray Data job and a second Tune experiment)
    cfg = tiny_config(["vqvae"], max_failures=2)
    cfg.max_train_images = None
    cfg.train.epochs = 8
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.config.write_text(cfg.to_yaml())
    (unit,) = plan_units(cfg)
    training = run.unit(unit)  # where its training keeps its resume point, state.pt
    thread, errors = run_in_thread(run, cfg, ray_cluster.address)
    wait_for(lambda: (training / "state.pt").exists(), 180, "the first epoch's resume point")
    raylets = ",".join(str(node.all_processes["raylet"][0].process.pid) for node in ray_cluster.list_all_nodes())
    children = subprocess.run(["ps", "--ppid", raylets, "-o", "pid=,args="], capture_output=True,
                              text=True).stdout.splitlines()  # this cluster's workers, not another test's
    (pid,) = [int(line.split()[0]) for line in children if "ImplicitFunc" in line]
    epoch_at_kill = int(torch.load(training / "state.pt", weights_only=True)["epoch"])
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=400)
    assert not thread.is_alive() and not errors, errors
    assert epoch_at_kill < 8
    resumed = [line for line in run.log.read_text().splitlines() if "resuming from epoch" in line]
    assert resumed, run.log.read_text()
    epoch = int(resumed[0].split("resuming from epoch ")[1].split()[0])
    assert epoch_at_kill <= epoch < 8  # not from epoch 0
    assert int(torch.load(training / "state.pt", weights_only=True)["epoch"]) == 8
    assert (run.unit(unit) / "row.json").exists()


def test_a_node_that_cannot_see_the_run_directory_is_named_before_anything_is_written(ray_cluster, tmp_path,
                                                                                     monkeypatch):
    from typer.testing import CliRunner

    from geovq.cli import app
    from geovq.distributed.preflight import BLIND_NODES_ENV, check_storage

    blind = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    seen = tmp_path / "seen"
    seen.mkdir()
    check_storage(seen, str(tmp_path))  # every node shares this machine's disk: passes
    assert list(seen.iterdir()) == []  # the probe is removed
    monkeypatch.setenv(BLIND_NODES_ENV, blind.node_id)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["sweep", "digits", "--quick", "--address", ray_cluster.address,
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"node {blind.node_id}" in result.output and f"cannot see the run directory {out}" in result.output
    assert "Traceback" not in result.output and not out.exists()
