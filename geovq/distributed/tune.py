"""Runs a sweep as Ray Tune trials: one trial per VAE, per VQ-VAE unit, per post-hoc unit.

Ray at the edge: a trial receives its typed unit as a dict (with the sweep's configuration), rebuilds the
objects, picks its device from what Ray assigned it, and calls `geovq.stages.run`. Nothing below the trial
knows about Ray. Ray starts itself locally when no `address` is given (`--address auto` or `ray://…` joins a
cluster). Two small-machine traps hang Ray forever instead of failing, so this module guards both:
- every trial reserves a fraction (80%) of the CPUs whose threads it uses, and at most
  floor(cluster CPUs / threads) trials run at once, so some CPU is always left for Ray's own tasks;
- no trial asks for GPUs (yet), so none can wait forever for a GPU that a GPU-less cluster never offers.
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
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, VaeSpec, plan_units, work_from_dict

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


def trial_device():
    """The torch device of this trial: the GPU Ray assigned it, else the CPU."""
    import ray
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GeovqError(f"this trial was assigned GPU {gpus} by Ray, but torch sees no CUDA device on "
                         f"{ray.util.get_node_ip_address()} (a CPU-only torch build, or a node declaring GPUs "
                         "it does not have)")
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one VAE or one unit, given as its dict beside the sweep's configuration."""
    import faiss
    import torch
    from ray import tune
    from ray.experimental.tqdm_ray import tqdm
    from threadpoolctl import threadpool_limits

    from geovq.stages.run import run_unit, run_vae

    # Concurrent trials must not oversubscribe the cores: torch, faiss and the BLAS/OpenMP pools behind
    # scikit-learn and scipy all get the trial's thread count.
    threads = config["threads"]
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    run = RunDir(Path(config["run_dir"]))
    cfg = SweepConfig.from_dict(config["config"])
    work = work_from_dict(config["work"])
    device = trial_device()
    with threadpool_limits(threads):
        if isinstance(work, VaeSpec):
            result = run_vae(run, cfg, work, device, tqdm)
        else:
            result = run_unit(run, cfg, work, device, tqdm)
    tune.report({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _label(work: dict[str, Any]) -> str:
    return work_from_dict(work).key


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
            log.info("[%d/%d] %s finished%s%s", self.done, total, _label(trial.config["work"]), psnr, usage)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.error("%s failed; its traceback is in %s", _label(trial.config["work"]), trial.local_path)

    return UnitLogger()


def run_trials(run: RunDir, cfg: SweepConfig, works: list[VaeSpec | Unit], phase: str) -> None:
    """Run the VAEs and units as one Tune experiment; raise if any trial failed."""
    import ray
    from ray import tune

    if not works:
        return
    cpus = ray.cluster_resources().get("CPU", 1)
    threads = cfg.cpus_per_trial
    if threads > cpus:
        raise GeovqError(f"--cpus-per-trial {threads} exceeds the cluster's {cpus:g} CPUs")
    trainable = tune.with_resources(_trial, {"cpu": threads * CPU_RESERVE_FRACTION})
    tuner = tune.Tuner(
        trainable,
        param_space={"work": tune.grid_search([w.to_dict() for w in works]), "config": cfg.as_dict(),
                     "run_dir": str(run.root.resolve()), "threads": threads},
        # reuse_actors: a finished trial's worker (torch already imported) takes the next unit
        tune_config=tune.TuneConfig(max_concurrent_trials=max(1, int(cpus // threads)), reuse_actors=True),
        run_config=tune.RunConfig(name=f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str((run.root / "ray").resolve()), verbose=0,
                                  callbacks=[_unit_logger(len(works))],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    if failed:
        detail = "; ".join(f"{_label(r.config['work'])}: {type(r.error).__name__}: {r.error}"[:500] for r in failed)
        raise RuntimeError(f"{len(failed)} trial(s) failed in phase {phase}: {detail}")


def run_sweep(run: RunDir, cfg: SweepConfig, address: str | None) -> None:
    """Phase 1: the Gaussian VAEs, the VQ-VAEs, and post-hoc units whose VAE is already trained (a resumed
    or extended run); phase 2: the post-hoc units on the VAEs that phase 1 trained."""
    start_ray(address)
    units = plan_units(cfg)
    vaes = sorted({u.vae for u in units if not u.end_to_end}, key=lambda v: v.key)
    ready = {v: run.vae_done(v) for v in vaes}
    pending = [u for u in units if not run.unit_done(u, cfg.finetune_decoder)]
    phase1: list[VaeSpec | Unit] = [v for v in vaes if not ready[v]]
    phase1 += [u for u in pending if u.end_to_end or ready[u.vae]]
    phase2 = [u for u in pending if not u.end_to_end and not ready[u.vae]]
    log.info("units: %d planned, %d pending; %d VAE(s) to train", len(units), len(pending),
             sum(not r for r in ready.values()))
    for phase, works in (("train", phase1), ("posthoc", phase2)):
        t0 = time.time()
        run_trials(run, cfg, works, phase)
        log.info("phase %s: %d trials in %.1f s", phase, len(works), time.time() - t0)
