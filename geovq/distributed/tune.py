"""Runs a sweep as Ray Tune trials: one trial per VAE seed, per VQ-VAE (K, seed), per post-hoc unit.

Ray starts itself locally when no `address` is given (`--address auto` or `ray://…` joins a cluster).
Two small-machine traps hang Ray forever instead of failing, so this module guards both:
- every trial reserves a fraction (80%) of the CPUs whose threads it uses, and at most
  floor(cluster CPUs / threads) trials run at once, so some CPU is always left for Ray's own tasks;
- no trial asks for GPUs (the models train on CPU so far), so none can wait forever for a GPU that a
  GPU-less cluster will never offer.
Resuming is by files, not by Tune state: a unit whose output exists is never scheduled again, so an
interrupted sweep re-run with the same command loses no finished trial.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from geovq.config import SweepConfig
from geovq.errors import GeovqError
from geovq.pipeline import END_TO_END, Unit, VaeSpec, plan_units, run_unit_stage, train_vae_stage, unit_done

log = logging.getLogger("geovq")
CPU_RESERVE_FRACTION = 0.8


def start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Local Ray on a laptop or CI box: no dashboard (it is reached by port-forwarding on clusters), and
    # a modest object store, since stages exchange files, not objects.
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None:
        kwargs["object_store_memory"] = 512 * 1024**2
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        raise GeovqError(f"cannot connect to the Ray cluster at --address {address!r} ({e})") from e


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: runs one stage of pipeline.py in the worker process."""
    import faiss
    import torch
    from ray import tune
    from ray.experimental.tqdm_ray import tqdm
    from threadpoolctl import threadpool_limits

    # Concurrent trials must not oversubscribe the cores: torch, faiss and the BLAS/OpenMP pools behind
    # scikit-learn and scipy all get the trial's thread count.
    threads = config["threads"]
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    run_dir = Path(config["run_dir"])
    cfg = SweepConfig.load(run_dir / "config.yaml")
    name: str = config["unit"]
    with threadpool_limits(threads):
        if name.startswith("vae-"):
            result = train_vae_stage(run_dir, cfg, VaeSpec.parse(name), tqdm)
        else:
            result = run_unit_stage(run_dir, cfg, Unit.parse(name), tqdm)
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _unit_logger(total: int):
    """A Tune callback that logs one line per finished or failed trial (Tune itself runs with verbose=0)."""
    from ray.tune import Callback

    class UnitLogger(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result
            psnr = f" PSNR {r['psnr']:.2f} dB" if "psnr" in r else ""
            usage = f", usage perplexity {r['usage_perplexity']:.1f}" if "usage_perplexity" in r else ""
            self.done += 1
            log.info("[%d/%d] %s finished%s%s", self.done, total, trial.config["unit"], psnr, usage)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.error("%s failed; its traceback is in %s", trial.config["unit"], trial.local_path)

    return UnitLogger()


def run_trials(run_dir: Path, cfg: SweepConfig, names: list[str], phase: str) -> None:
    """Run the named units as one Tune experiment; raise if any trial failed."""
    import ray
    from ray import tune

    if not names:
        return
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = cfg.cpus_per_trial
    if threads > cpus:
        raise GeovqError(f"--cpus-per-trial {threads} exceeds the cluster's {cpus:g} CPUs")
    trainable = tune.with_resources(_trial, {"cpu": threads * CPU_RESERVE_FRACTION})
    tuner = tune.Tuner(
        trainable,
        param_space={"unit": tune.grid_search(names), "run_dir": str(run_dir.resolve()), "threads": threads},
        # reuse_actors: a finished trial's worker (torch already imported) takes the next unit
        tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(cpus // threads)), reuse_actors=True),
        run_config=tune.RunConfig(name=f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((run_dir / "ray").resolve()), verbose=0,
                                  callbacks=[_unit_logger(len(names))],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        detail = "; ".join(f"{r.config['unit']}: {type(r.error).__name__}: {r.error}"[:500] for r in failed)
        raise RuntimeError(f"{len(failed)} trial(s) failed in phase {phase}: {detail}")


def run_sweep(run_dir: Path, cfg: SweepConfig, address: str | None) -> None:
    """Phase 1: the Gaussian VAEs, the VQ-VAEs, and post-hoc units whose VAE is already trained (a resumed
    or extended run); phase 2: the post-hoc units on the VAEs that phase 1 trained."""
    start_ray(address)
    units = plan_units(cfg)
    vaes = sorted({u.vae_spec for u in units if u.method not in END_TO_END}, key=lambda v: v.name)
    vae_ready = {v: (v.dir(run_dir) / "ceiling.json").exists() for v in vaes}
    pending = [u for u in units if not unit_done(run_dir, cfg, u)]
    phase1 = [v.name for v in vaes if not vae_ready[v]]
    phase1 += [u.name for u in pending if u.method in END_TO_END or vae_ready[u.vae_spec]]
    phase2 = [u.name for u in pending if u.method not in END_TO_END and not vae_ready[u.vae_spec]]
    log.info("units: %d planned, %d pending; %d VAE(s) to train", len(units), len(pending),
             sum(not r for r in vae_ready.values()))
    for phase, names in (("train", phase1), ("posthoc", phase2)):
        t0 = time.time()
        run_trials(run_dir, cfg, names, phase)
        log.info("phase %s: %d trials in %.1f s", phase, len(names), time.time() - t0)
