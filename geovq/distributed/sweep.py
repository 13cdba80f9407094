"""`geovq sweep` below its command line, one call per step:

    resolve_runs    each dataset's validated configuration (geovq.config.resolve_config holds every rule) in its
                    run directory, planned once (stages.plan.RunPlan); nothing is written yet
    start_runs      Ray up, the GPUs per trial resolved, each run directory seen by every node, config.yaml written
    run_and_report  every run's pending units as Tune trials (distributed.tune.run_sweeps), then each run's
                    report (report.build.write_report)

The CLI parses the options before and prints the summaries after; nothing here prints.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geovq.config import (SweepConfig, apply_settings, changed_options, dataset_root, replay_config, resolve_config,
                          union_config)
from geovq.data import load_dataset
from geovq.errors import GeovqError
from geovq.io import check_writable
from geovq.stages.plan import RunPlan
from geovq.stages.rundir import RunDir

log = logging.getLogger("geovq")


@dataclass
class SweepRun:
    """One dataset's part of a sweep: the units this command asks for in its run directory (`plan`), and what
    the run directory records once they joined it (`recorded`, its config.yaml: every unit it holds)."""

    plan: RunPlan
    recorded: SweepConfig
    description: str  # the dataset's, for the log
    resuming: bool  # the run directory held a run already

    @property
    def root(self) -> Path:
        return self.plan.run.root

    @property
    def cfg(self) -> SweepConfig:
        return self.plan.cfg


def resolve_runs(roots: dict[str, Path], data_root: Path | None, settings: dict[str, Any],
                 base: SweepConfig | None = None, assignments: tuple[str, ...] = ()) -> list[SweepRun]:
    """A run per dataset ({dataset: its run directory}) with `settings` (resolve_config's arguments); with `base`
    (--config: a recorded configuration, one dataset) the settings are only the options typed, on top of it; then
    the `--set KEY=VALUE` assignments. Each dataset is loaded here, so that a missing one fails before any run
    directory exists."""
    if base is not None and data_root is None and base.data_root is not None:
        data_root = Path(base.data_root)
    root = dataset_root(list(roots), data_root)
    runs = []
    for name, path in roots.items():
        data = load_dataset(name, root, download=settings.get("download", False))
        train_images = len(data.train)
        if base is None:
            cfg = resolve_config(name, data.image_shape, **settings, data_root=root, train_images=train_images)
        else:
            cfg = replay_config(base, settings, train_images)
        if assignments:
            cfg = apply_settings(cfg, list(assignments), train_images)
        runs.append(open_run(RunDir(path), cfg, data.description))
    return runs


def open_run(run: RunDir, cfg: SweepConfig, description: str) -> SweepRun:
    """The run of `cfg` in `run`: new, or resuming the run it holds when their configurations match
    (`SweepConfig.identity`), which then records the units of both (`union_config`)."""
    if run.root.exists() and not run.root.is_dir():
        raise GeovqError(f"--out {run.root} is an existing file; give a folder for the run directory")
    check_writable(run.root)
    if not run.config.exists():
        return SweepRun(RunPlan.of(run, cfg), cfg, description, resuming=False)
    previous = SweepConfig.load(run.config)
    changed = changed_options(previous, cfg)
    if changed:
        raise GeovqError(f"{run.root} holds a run with a different configuration ({'; '.join(changed)}); "
                         "resume it with the same options, or choose a new --out")
    return SweepRun(RunPlan.of(run, cfg), union_config(previous, cfg), description, resuming=True)


def start_runs(runs: list[SweepRun], address: str | None, locks: ExitStack) -> None:
    """Ray up (an unreachable cluster fails here, before anything is written) and the GPUs per trial resolved;
    then each run directory made, locked for this command (held by `locks`: a second command on it is refused) and
    seen by every node with its data (a new one that is not is removed again), and its config.yaml written."""
    from geovq.distributed.preflight import check_storage
    from geovq.distributed.tune import start_cluster
    from geovq.io import directory_lock, write_text

    gpus = start_cluster(address, runs[0].cfg.gpus_per_trial, runs[0].cfg.cpus_per_trial)  # the command's request
    for run in runs:
        run.cfg.gpus_per_trial = run.recorded.gpus_per_trial = gpus
        created = not run.root.exists()
        run.root.mkdir(parents=True, exist_ok=True)
        try:
            locks.enter_context(directory_lock(run.root))
            check_storage(run.root, run.cfg.data_root)
        except GeovqError:
            if created:
                shutil.rmtree(run.root, ignore_errors=True)
            raise
    for run in runs:
        write_text(run.plan.run.config, run.recorded.to_yaml())


def run_and_report(runs: list[SweepRun], address: str | None) -> list[list[dict[str, Any]]]:
    """Every run's pending units, the datasets' trials sharing the cluster; then each run's report. Returns each
    run's rows. Raises RunFailed (units failed) and KeyboardInterrupt (Ctrl-C, SIGTERM) with Ray shut down, so
    that `progress` then counts what is kept."""
    from geovq.distributed.tune import run_sweeps
    from geovq.report.build import write_report
    from geovq.stages.common import load_splits
    from geovq.stages.reference import reference_codecs_stage

    for run in runs:
        cfg = run.cfg
        log.info("%s run %s: %s (%s)", "resuming" if run.resuming else "starting", run.root, cfg.dataset,
                 run.description)
        log.info("methods %s, K %s, seeds %d, epochs %d, %d tokens/image of d=%d", ",".join(cfg.methods),
                 cfg.codebook_sizes, cfg.seeds, cfg.train.epochs, cfg.tokens_per_image, cfg.d)
    try:
        run_sweeps([run.plan for run in runs], address)
    except KeyboardInterrupt:
        import ray

        ray.shutdown()  # stops the trials, so that none finishes a unit after it is counted
        raise
    for run in runs:  # JPEG and WebP on the same test images, for the report's rate panel (kept once written)
        reference_codecs_stage(run.plan.run, load_splits(run.cfg))
    return [write_report([run.root]).rows for run in runs]


def progress(runs: list[SweepRun]) -> tuple[int, int]:
    """(finished, planned) units of this command's plans."""
    return sum(run.plan.finished() for run in runs), sum(len(run.plan.units) for run in runs)
