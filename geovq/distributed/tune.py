"""Runs a sweep as Ray Tune trials: one trial per VAE, per VQ-VAE unit, per post-hoc unit.

Ray at the edge: a trial receives its typed unit as a dict (with the sweep's configuration), rebuilds the
objects, picks its device from what Ray assigned it, and calls `geovq.stages.run`. Nothing below the trial
knows about Ray. Ray starts itself locally when no `address` is given (`--address auto` or `ray://…` joins a
cluster). Two small-machine traps hang Ray forever instead of failing, so this module guards both:
- every trial reserves a fraction (80%) of the CPUs whose threads it uses, and at most
  floor(cluster CPUs / threads) trials run at once, so some CPU is always left for Ray's own tasks;
- a GPU request that no node, and no node type the autoscaler may start, can meet fails at once
  (`resolve_gpus_per_trial`) instead of leaving trials pending forever.
A post-hoc unit waits for its VAE inside the same Tune experiment (`_prerequisites_searcher`), not behind a
phase barrier. Resuming is by files, not by Tune state: a finished unit (`RunDir.unit_done`) is never scheduled
again, so an interrupted sweep re-run with the same command loses no finished trial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovq.config import SweepConfig
from geovq.distributed.trial import GEOVQ_ERROR, trial_device, trial_process
from geovq.errors import GeovqError, RunFailed
from geovq.io import write_json, write_text
from geovq.stages.plan import RunPlan
from geovq.stages.rundir import RunDir
from geovq.stages.units import Unit, VaeSpec, work_from_dict

log = logging.getLogger("geovq")
CPU_RESERVE_FRACTION = 0.8
#: seconds to wait for a cluster address to answer before calling it unreachable
ADDRESS_TIMEOUT_S = 10


def check_address(address: str) -> None:
    """Fail within seconds on a cluster address nothing listens at (Ray itself retries for minutes)."""
    if address == "auto":  # ray.init finds a local `ray start` cluster, or fails at once
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise GeovqError(f"--address {address!r} is not a Ray cluster address; valid: auto, HOST:PORT, "
                         "ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as e:
        raise GeovqError(f"cannot reach the Ray cluster at --address {address} ({e.strerror or e}); start it "
                         "with `ray start --head` or `ray up cluster.yaml`, or omit --address to run locally") from None


def start_ray(address: str | None) -> None:
    import ray

    if address is not None:  # checked even when Ray is up already (tests, notebooks): a bad address is bad input
        check_address(address)
    if ray.is_initialized():
        return
    # Local Ray on a laptop or CI box: no dashboard (it is reached by port-forwarding on clusters), and
    # a modest object store, since stages exchange files, not objects.
    # logging_level: Ray's logger as the console set it (the CLI keeps Ray's INFO lines, such as "Started a local
    # Ray instance", for --verbose); ray.init would reset it to INFO otherwise
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                              "logging_level": logging.getLogger("ray").getEffectiveLevel()}
    if address is None:
        kwargs["object_store_memory"] = 512 * 1024**2
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise GeovqError(f"cannot connect to the Ray cluster at --address {address} "
                         f"({str(e).splitlines()[0]})") from None


def autoscaler_gpu_types(config_path: str | None = None) -> dict[str, float]:
    """GPUs per node of each node type the autoscaler may start ({type: GPUs}, types with max_workers > 0).

    On a `ray up` cluster the head holds its autoscaling config at ~/ray_bootstrap_config.yaml;
    $GEOVQ_AUTOSCALER_CONFIG points elsewhere. No config (a laptop, a fixed cluster): no such types.
    """
    import yaml

    path = Path(os.path.expanduser(config_path or os.environ.get("GEOVQ_AUTOSCALER_CONFIG",
                                                                  "~/ray_bootstrap_config.yaml")))
    if not path.is_file():
        return {}
    types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {})
    return {name: float(spec.get("resources", {}).get("GPU", 0)) for name, spec in types.items()
            if spec.get("max_workers", 0) > 0}


def resolve_gpus_per_trial(requested: float | None) -> float:
    """The GPUs each trial asks for: `requested`, or for None (auto) 1 when a node has a GPU or the autoscaler
    can start one that has, else 0. A request no node can ever satisfy fails here, at once: Ray would
    otherwise keep the trial pending forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest_node = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    types = autoscaler_gpu_types()
    largest = max([largest_node, *types.values()])
    if requested is None:
        return 1.0 if largest >= 1 else 0.0
    if requested > largest:
        scalable = ", ".join(f"{name}: {gpus:g}" for name, gpus in types.items()) or "none"
        raise GeovqError(f"--gpus-per-trial {requested:g} asks more GPUs per trial than any node has: the largest "
                         f"of {len(nodes)} node(s) has {largest_node:g} GPU(s); node types the autoscaler can start: "
                         f"{scalable}. Use --gpus-per-trial {largest:g} (0: CPU only), or add GPU nodes")
    return requested


def start_cluster(address: str | None, gpus_per_trial: float | None, cpus_per_trial: int) -> float:
    """Start local Ray or join the cluster at `address`, and check that it can run a trial of `cpus_per_trial`
    (an unreachable cluster or a trial too large for it fails here, before a command writes anything); returns the
    GPUs each trial asks for (`resolve_gpus_per_trial`)."""
    start_ray(address)
    check_cpus_per_trial(cpus_per_trial)
    return resolve_gpus_per_trial(gpus_per_trial)


def check_cpus_per_trial(threads: int) -> float:
    """The cluster's CPUs, which a trial of `threads` CPUs must fit: Tune would wait for it forever."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1)
    if threads > cpus:
        raise GeovqError(f"--cpus-per-trial {threads} exceeds the cluster's {cpus:g} CPUs")
    return cpus


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: one VAE or one unit, given as its dict beside the sweep's configuration."""
    import ray
    from ray import tune
    from ray.experimental.tqdm_ray import tqdm

    from geovq.stages.common import no_progress
    from geovq.stages.run import fit_unit, run_unit, run_vae

    job = Job.from_dict(config["job"])
    run, cfg, work = job.run, job.cfg, job.work
    progress = tqdm if config["bars"] else no_progress
    _log_to_run(run)
    where = {"node_id": ray.get_runtime_context().get_node_id()}
    try:
        with trial_process(cfg.cpus_per_trial):
            device = trial_device()
            if isinstance(work, VaeSpec):
                result = run_vae(run, cfg, work, device, progress, train_only=job.steps == "train")
            elif job.steps == "fit":
                fit_unit(run, cfg, work, device)
                result = {}
            else:
                result = run_unit(run, cfg, work, device, progress).as_dict()
    except GeovqError as e:  # recorded, and the trial ends without asking Tune for a retry (see GEOVQ_ERROR)
        record_failure(run, work, e)
        tune.report({GEOVQ_ERROR: 1, **where})
        return
    except Exception as e:  # a bug or a crash inside the stage: recorded, then retried by Tune
        record_failure(run, work, e)
        raise
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report({**scalars, **where})


def _log_to_run(run: RunDir) -> None:
    """Worker-side geovq lines (e.g. a training resuming after a retry) go to the run's sweep.log too."""
    log.setLevel(logging.INFO)
    if not any(getattr(h, "baseFilename", None) == str(run.log.resolve()) for h in log.handlers):
        handler = logging.FileHandler(run.log.resolve())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker %(process)d] %(message)s"))
        log.addHandler(handler)


def failure_paths(run: RunDir, work: VaeSpec | Unit) -> tuple[Path, Path]:
    """(full traceback, one-line message) of a failed VAE or unit: errors/{key}.txt and .json."""
    return run.root / "errors" / f"{work.key}.txt", run.root / "errors" / f"{work.key}.json"


def record_failure(run: RunDir, work: VaeSpec | Unit, error: BaseException) -> None:
    trace, message = failure_paths(run, work)
    write_text(trace, "".join(traceback.format_exception(error)))
    text = str(error) if isinstance(error, GeovqError) else f"{type(error).__name__}: {error}"
    write_json(message, {"message": text.splitlines()[0] if text else type(error).__name__})


def failure_line(run: RunDir, work: VaeSpec | Unit) -> str:
    """One line for a failure `record_failure` wrote: the unit, its message, and where its full traceback is."""
    trace, message = failure_paths(run, work)
    return f"{work.key} failed: {json.loads(message.read_text())['message']} (full traceback: {trace})"


def describe_failure(run: RunDir, work: VaeSpec | Unit, result: Any) -> str:
    """One line: the unit, what went wrong, and where its full traceback is (copied into the run directory)."""
    trace, message = failure_paths(run, work)
    if result.error is None or message.exists():  # the trial caught it: geovq's own message
        return failure_line(run, work)
    # the worker died (killed, out of memory): only Tune saw it
    text = f"its worker process died ({type(result.error).__name__}); it is retried when you re-run"
    tune_trace = Path(result.path) / "error.txt" if result.path else None
    if tune_trace is not None and tune_trace.exists():
        write_text(trace, tune_trace.read_text())
    else:
        write_text(trace, "".join(traceback.format_exception(result.error)))
    return f"{work.key} failed: {text} (full traceback: {trace})"


def _unit_logger(total: int):
    """A Tune callback that logs one line per finished trial (failures are reported once, by run_sweeps)."""
    from ray.tune import Callback

    class UnitLogger(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result
            if r.get(GEOVQ_ERROR):
                return  # reported once, with the other failures, at the end
            psnr = f" PSNR {r['psnr']:.2f} dB" if "psnr" in r else ""
            usage = f", usage perplexity {r['usage_perplexity']:.1f}" if "usage_perplexity" in r else ""
            self.done += 1
            job = Job.from_dict(trial.config["job"])
            done = {"train": "trained", "fit": "fitted"}.get(job.steps, "finished")  # a cluster's partial jobs
            log.info("[%d/%d] %s %s%s%s", self.done, total, job.label, done, psnr, usage)

    return UnitLogger()


@dataclass(frozen=True)
class Job:
    """One trial's work: a VAE or unit of one run directory (several datasets' runs share one cluster).
    `steps`: "all"; on a cluster "train" for a VAE (its latents come from the Ray Data stage) and "fit" for a unit
    whose encode runs the decoder (its codes come from the Ray Data codes stage). `after`: the label of the job
    whose outputs this one needs (a post-hoc unit's VAE), run first when it is in the same experiment, and
    taken as done when it is not (it ran in an earlier one) unless it failed there."""

    run: RunDir
    cfg: SweepConfig
    work: VaeSpec | Unit
    steps: str = "all"
    after: str | None = None

    @property
    def label(self) -> str:
        return f"{self.cfg.dataset}/{self.work.key}"

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run.root.resolve()), "config": self.cfg.as_dict(), "work": self.work.to_dict(),
                "steps": self.steps}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Job:
        return cls(RunDir(Path(raw["run_dir"])), SweepConfig.from_dict(raw["config"]), work_from_dict(raw["work"]),
                   raw["steps"])


def _trial_dirname(trial: Any) -> str:
    """ray/PHASE/TRIAL-ID-WORK: a trial's folder named by what it runs (a VAE's or unit's key)."""
    return f"{trial.trial_id}-{work_from_dict(trial.config['job']['work']).key}"


def _prerequisites_searcher(jobs: list[Job], failed: dict[str, str]):
    """A Tune searcher that hands out each job once the job it comes `after` has finished, in the given order.

    One experiment then runs a sweep's VAEs and the post-hoc units on them: a unit starts as soon as its own VAE
    is done, no worker idles until the slowest training of a phase ends, and the workers (torch already
    imported) stay for the next trial. A job whose prerequisite fails is not run and gets a failure line;
    one whose own label failed in an earlier experiment (a VAE's training on a cluster) is left out."""
    from ray.tune.search import Searcher

    # Ray's driver redraws a worker's bar with a carriage return per update: into a redirected log (`nohup geovq
    # sweep ... > log`) that is one line of megabytes. There the "geovq: [k/N] finished" lines are the progress.
    bars = sys.stderr.isatty()

    class AfterPrerequisites(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.waiting = [job for job in jobs if job.label not in failed]
            self.running: dict[str, Job] = {}
            # a prerequisite that is none of this experiment's jobs ran in an earlier one (a VAE trained before
            # a cluster's fit phase): done, unless it failed there (then `_drop_after` below)
            self.done: set[str] = ({job.after for job in jobs if job.after is not None}
                                   - {job.label for job in jobs} - set(failed))
            self.not_run: dict[str, str] = {}
            for label in failed:
                self._drop_after(label)

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            for job in self.waiting:
                if job.after is None or job.after in self.done:
                    self.waiting.remove(job)
                    self.running[trial_id] = job
                    return {"job": job.to_dict(), "bars": bars}
            return None if self.waiting else Searcher.FINISHED  # None: ask again when a trial ends

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            job = self.running.pop(trial_id)
            if error or (result or {}).get(GEOVQ_ERROR):
                self._drop_after(job.label)
            else:
                self.done.add(job.label)

        def _drop_after(self, label: str) -> None:
            for job in [job for job in self.waiting if job.after == label]:  # its VAE failed: nothing to fit on
                self.waiting.remove(job)
                self.not_run[job.label] = f"{job.label} was not run: its VAE {job.work.vae.key} failed"

        def save(self, checkpoint_path: str) -> None:
            """Nothing to save: a sweep resumes from its run directory's files, not from Tune's state."""

        def restore(self, checkpoint_path: str) -> None:
            pass

    return AfterPrerequisites()


def run_trials(jobs: list[Job], phase: str, storage: Path, failed: dict[str, str] | None = None) -> dict[str, str]:
    """Run the jobs as one Tune experiment, each after its prerequisite (`Job.after`); returns {label: one-line
    report} of the failed ones and of those not run because their prerequisite failed here or in `failed`."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    if not jobs:
        return {}
    threads = max(job.cfg.cpus_per_trial for job in jobs)
    cpus = check_cpus_per_trial(threads)
    # as many trials at once as the CPUs hold, unless a run asks for fewer (the least of the runs' --max-concurrent)
    concurrent = min([max(1, int(cpus // threads))]
                     + [job.cfg.max_concurrent_trials for job in jobs if job.cfg.max_concurrent_trials is not None])

    def resources(config: dict[str, Any]) -> dict[str, float]:
        cfg = config["job"]["config"]
        return {"cpu": cfg["cpus_per_trial"] * CPU_RESERVE_FRACTION, "gpu": cfg["gpus_per_trial"] or 0}

    searcher = _prerequisites_searcher(jobs, failed or {})
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        # reuse_actors: a finished trial's worker (torch already imported) takes the next unit
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(jobs),
                                    max_concurrent_trials=concurrent, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(storage.resolve()), verbose=0,
                                  # result.json per trial (which node ran it); no TensorBoard or CSV logger
                                  callbacks=[_unit_logger(len(searcher.waiting)), JsonLoggerCallback()],
                                  # a crashed trial (killed worker, lost node) is retried; its stages resume
                                  # from their files (a training from its last epoch)
                                  failure_config=tune.FailureConfig(max_failures=max(j.cfg.max_failures
                                                                                     for j in jobs))),
    )
    # Ctrl-C must reach the driver as KeyboardInterrupt (the CLI reports it and exits 130), not be turned by
    # Tune into a normal return with a hint to Tuner.restore: re-running the same command is how geovq resumes.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # Tune's console output (a box per phase, a TensorBoard hint on its own temporary folder, error-file paths)
    # repeats or contradicts geovq's: the legacy reporter at verbose=0 prints none of it. geovq logs one line
    # per finished or failed unit instead.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Tune's automatic loggers would add a TensorBoard run per trial, named by its whole config, beside geovq's
    # own runs (each VAE's and VQ-VAE's tb/, the rows' HParams in tb/rows): `tensorboard --logdir RUN` shows geovq's
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    for job in jobs:  # a retried unit's old failure record would describe the wrong attempt
        for path in failure_paths(job.run, job.work):
            path.unlink(missing_ok=True)
    results = tuner.fit()
    failures = dict(searcher.not_run)
    for result in results:
        if result.error is not None or (result.metrics or {}).get(GEOVQ_ERROR):
            job = Job.from_dict(result.config["job"])
            failures[job.label] = describe_failure(job.run, job.work, result)
    return failures


def run_sweep(run: RunDir, cfg: SweepConfig, address: str | None) -> None:
    """One dataset's sweep (see `run_sweeps`)."""
    run_sweeps([RunPlan.of(run, cfg)], address)


def run_sweeps(plans: list[RunPlan], address: str | None) -> None:
    """Every pending unit of every run's plan, the datasets' trials sharing the cluster at once.

    One Tune experiment runs the Gaussian VAEs, the VQ-VAEs and the post-hoc units, each post-hoc unit once its
    VAE is trained (a unit whose VAE failed is reported, not run). On a cluster (`address`), the VAEs only
    train in a first experiment; the driver then extracts their latents with the Ray Data stage, and a second
    experiment scores them and runs the post-hoc units on them.
    """
    start_ray(address)
    on_cluster = address is not None
    first: list[Job] = []  # local: everything; cluster: what needs no Ray Data latents
    fits: list[Job] = []  # cluster: the fits of units whose codes the Ray Data codes stage makes
    second: list[Job] = []  # cluster: the VAEs' scoring and the post-hoc units on them
    for plan in plans:
        run, cfg = plan.run, plan.cfg
        ready = {v: run.vae_done(v) for v in plan.vaes}
        pending = plan.pending()
        for vae in plan.vaes:
            if not ready[vae]:
                first.append(Job(run, cfg, vae, "train" if on_cluster else "all"))
                if on_cluster:
                    second.append(Job(run, cfg, vae))
        vae_of = {u: f"{cfg.dataset}/{u.vae.key}" for u in pending if not u.end_to_end}  # a post-hoc unit's VAE job
        waits = {u for u in vae_of if not ready[u.vae]}  # on a VAE this command trains
        sharded = {u for u in vae_of if on_cluster and codes_by_ray_data(run, u)}  # fit, Ray Data codes, the rest
        fits += [Job(run, cfg, u, "fit", after=vae_of[u]) for u in pending if u in sharded]
        first += [Job(run, cfg, u) for u in pending if u not in waits and u not in sharded]
        (second if on_cluster else first).extend(Job(run, cfg, u, after=vae_of[u]) for u in pending
                                                 if u in waits or u in sharded)
        to_train = sum(not r for r in ready.values())
        # the jobs this command runs, as the [k/N] lines count them: each pending unit, and each VAE it trains
        log.info("%s: %d jobs to run: %d of %d units pending, %d VAE(s) to train", cfg.dataset,
                 len(pending) + to_train, len(pending), len(plan.units), to_train)
    storage = plans[0].run.root / "ray" if len(plans) == 1 else plans[0].run.root.parent / "ray"
    failures: dict[str, str] = {}
    phases = (("train", first), ("fit", fits), ("posthoc", second)) if on_cluster else (("sweep", first),)
    for phase, jobs in phases:
        if phase == "fit":  # between the experiments: the VAEs' latents, sharded over the cluster by Ray Data
            extract_on_cluster([job for job in second if isinstance(job.work, VaeSpec) and job.label not in failures])
        if phase == "posthoc":  # and the codes of the units whose encode runs the decoder
            failures.update(encode_on_cluster([job for job in fits if job.label not in failures]))
        t0 = time.time()
        failures.update(run_trials(jobs, phase, storage, failures))
        log.info("phase %s: %d trials in %.1f s", phase, len(jobs), time.time() - t0)
    if failures:
        raise RunFailed(list(failures.values()))


def extract_on_cluster(jobs: list[Job]) -> None:
    """The latents of each VAE job that lacks them, by the Ray Data stage: one job per VAE over its missing
    splits, one after another (a job's fixed start-up, ~10 s on 2 cores, is then paid once per VAE rather than
    per split); Parquet shards -> latents_{split}.npz."""
    import numpy as np

    from geovq.distributed.data import extract_latents_parquet, latents_from_parquet
    from geovq.latents import LatentSet
    from geovq.stages.common import load_splits
    from geovq.stages.rundir import SPLITS
    from geovq.stages.train_vae import vae_layout

    data, data_of = None, None
    for job in jobs:
        spec, run = job.work, job.run
        missing = [split for split in SPLITS if not run.latents(spec, split).exists()]
        if not missing:
            continue
        if data_of != run.root:  # a run's VAEs come one after another: its splits are loaded once
            data, data_of = load_splits(job.cfg), run.root
        t0 = time.time()
        parquet = run.vae(spec) / "parquet"
        shutil.rmtree(parquet, ignore_errors=True)  # an interrupted job's shards may number another concatenation
        # (N_1 + N_2 + ..., ch, H, W): a shard row's index is its place in this concatenation
        shards = extract_latents_parquet(run.vae(spec) / "model.pt",
                                         np.concatenate([getattr(data, split) for split in missing]),
                                         np.concatenate([getattr(data, f"{split}_labels") for split in missing]),
                                         parquet, num_gpus=job.cfg.gpus_per_trial or 0.0)
        latents, _ = latents_from_parquet(shards, vae_layout(job.cfg, spec))
        start = 0
        for split in missing:
            rows = slice(start, start + len(getattr(data, split)))
            LatentSet(latents.mu[rows], latents.logvar[rows], latents.layout).save(run.latents(spec, split))
            start = rows.stop
        log.info("%s: %s latents extracted by one Ray Data job in %.1f s (Parquet shards in %s)", job.label,
                 ", ".join(missing), time.time() - t0, shards)


def codes_by_ray_data(run: RunDir, unit: Unit) -> bool:
    """Whether a pending unit's codes come from the Ray Data codes stage on a cluster: a post-hoc method whose
    encode runs the decoder for every token (`Quantizer.needs_decoder`: pull-back, geodesic) with a split still to
    encode. The others' encodes cost less than a Ray Data job's start-up and stay in their trial."""
    from geovq.quantize import get_quantizer_class
    from geovq.stages.encode import encode_records

    if unit.end_to_end or not get_quantizer_class(unit.method, unit.quantizer).needs_decoder:
        return False
    return bool(encode_records(run, unit)[1])


def encode_on_cluster(jobs: list[Job]) -> dict[str, str]:
    """The missing splits' codes of each fitted unit (`Job.steps` "fit"), by the Ray Data codes stage: one job per
    unit over an actor pool (one actor per GPU on a GPU cluster, per core bundle here), each split's images by
    their index in it, so the codes are the in-process encode's. The record beside them (encode.json: the rule, its
    figures summed over the actors, its agreement with the exact rule on a check sample) is made here, on the
    driver's CPU, as the trial's encode would make it. Returns {label: one-line report} of the units that failed."""
    import torch

    from geovq.distributed.data import encode_split_codes
    from geovq.stages.encode import encode_records, save_codes
    from geovq.stages.fit import load_fitted, load_latents

    failures = {}
    for job in jobs:
        run, unit = job.run, job.work
        info, missing = encode_records(run, unit)
        if not missing:
            continue
        try:
            _, quantizer = load_fitted(run, unit, torch.device("cpu"))
            splits = [load_latents(run, unit, split) for split in missing]
            sharded = encode_split_codes(run.vae(unit.vae) / "model.pt", run.unit(unit) / "quantizer.npz", splits,
                                         num_gpus=job.cfg.gpus_per_trial or 0.0)
            for split, latents, codes in zip(missing, splits, sharded):
                record = {**quantizer.encode_record(latents, codes.codes, codes.seconds, codes.stats),
                          "ray_data_actors": codes.actors}
                save_codes(run, unit, split, codes.codes, record, info)
            log.info("%s: %s codes by one Ray Data job in %.1f s (%d actors)", job.label, ", ".join(missing),
                     sum(codes.seconds for codes in sharded), sharded[0].actors)
        except GeovqError as e:  # a unit's own fault (a damaged file, a non-finite Jacobian): its line, no retry
            record_failure(run, unit, e)
            failures[job.label] = failure_line(run, unit)
    return failures
