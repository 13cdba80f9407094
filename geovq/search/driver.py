"""The driver of `geovq tune`: one Ray Tune experiment per method, so that every method gets the same number
of trials, each resumable by Tune's experiment restore (the OptunaSearch state included).

- Searcher: OptunaSearch over the method's define-by-run `Study`, with a seeded TPE sampler (with two
  objectives under --pareto, TPE is Optuna's multi-objective MOTPE) after `n_startup_trials` random ones that
  are the same in every method's study (`SharedStartupSampler`), so post-hoc methods share their start-up VAEs.
  Optuna's own pruners do not run under Tune. `max_concurrent_trials` is explicit: without it Tune keeps one
  trial pending and staggers starts.
- Scheduler: ASHA, with epochs as the resource and the per-epoch validation PSNR of the trial's own model
  (the VAE's reconstruction, or the VQ-VAE's) as its signal; max_t is the study's largest epoch count and a
  trial that reaches it is not stopped there (stop_last_trials=False), so its quantizer is still scored.
  Under --pareto ASHA is off (FIFO): ranking by PSNR alone would stop exactly the low-rate trials that the
  Pareto front needs, since fewer bits always cost PSNR.
- Reproducibility: with max_concurrent 1 every proposal is asked after the previous trial finished, so the same
  command and seed propose the same configurations (training on the CPU is deterministic). With c > 1 trials
  at once, the n_startup_trials random proposals are still the same (each value is seeded by its trial number
  and parameter name); later ones depend on which trials had finished when each was asked, i.e. on timing.
- Interruption: Ctrl-C lets Tune save the experiment state and stop; the CLI then exits 130, and the same
  command resumes: finished trials are kept, unfinished ones start again (their VAEs resume from their epoch
  files). After a hard kill, trials that finished in the last ~10 s may run again (cheaply: their models are
  cached).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import optuna
from ray import tune
from ray.tune import Callback
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from geovq.config import SweepConfig
from geovq.distributed.trial import GEOVQ_ERROR
from geovq.distributed.tune import CPU_RESERVE_FRACTION
from geovq.errors import GeovqError
from geovq.search.space import Study
from geovq.search.trial import BITS, EPOCH, EPOCH_METRIC, OBJECTIVE, search_trial

log = logging.getLogger("geovq")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # TPE's multivariate options
#: the key under which a trial's config carries its proposal number (Optuna's trial number, or the grid index)
NUMBER = "number"


@dataclass(frozen=True)
class Search:
    """What a search is: a re-run of the same command resumes it, a different one in the same --out is refused."""

    dataset: str
    methods: tuple[str, ...]
    trials: int
    bits: int | None  # None: --pareto (K free, bits an objective)
    seed: int
    max_concurrent: int
    grid: bool = False  # bench only: the exhaustive grid of an all-choices space instead of Optuna

    @property
    def pareto(self) -> bool:
        return self.bits is None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = list(self.methods)
        return out


class SearchInterrupted(Exception):
    """A study stopped before all its trials finished (Ctrl-C); `rows`: its trials so far."""

    def __init__(self, method: str, finished: int, total: int, rows: list[dict]) -> None:
        super().__init__(f"{method}: {finished} of {total} trials finished")
        self.rows = rows


class SharedStartupSampler(optuna.samplers.BaseSampler):
    """Seeded TPE after `n_startup` random start-up trials whose values depend only on (seed, trial number,
    parameter name), not on the draws before them. So every method's study starts from the same random rates
    and VAE configurations: the post-hoc methods' start-up trials share their VAEs (trained once), and the
    start-up proposals do not depend on the order in which trials finish."""

    def __init__(self, seed: int, n_startup: int, multivariate: bool) -> None:
        self.seed, self.n_startup = seed, n_startup
        # TPE sees the start-up trials as its first observations; constant_liar: trials still running count as
        # bad, so concurrent proposals spread out
        self.tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, multivariate=multivariate,
                                              group=multivariate, constant_liar=True)

    def _startup(self, trial: Any) -> bool:
        return trial.number < self.n_startup

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
        return {} if self._startup(trial) else self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: dict) -> dict:
        return {} if self._startup(trial) else self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, distribution: Any) -> Any:
        if not self._startup(trial):
            return self.tpe.sample_independent(study, trial, param_name, distribution)
        seed = zlib.crc32(f"{self.seed}/{trial.number}/{param_name}".encode())
        return optuna.samplers.RandomSampler(seed=seed).sample_independent(study, trial, param_name, distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.tpe.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


def make_searcher(study: Study, search: Search) -> EpochAwareOptunaSearch:
    """OptunaSearch over the study with a seeded TPE sampler (two objectives under --pareto)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = study.space
    sampler = SharedStartupSampler(search.seed, space.n_startup_trials, space.multivariate)
    if search.pareto:
        return EpochAwareOptunaSearch(Numbered(study), metric=[OBJECTIVE, BITS], mode=["max", "min"], sampler=sampler)
    return EpochAwareOptunaSearch(Numbered(study), metric=OBJECTIVE, mode="max", sampler=sampler)


@dataclass(frozen=True)
class Numbered:
    """The study's define-by-run sampler, adding each trial's proposal number to its config (picklable)."""

    study: Study

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {**self.study(trial), NUMBER: trial.number}


class EpochAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that takes a trial's per-epoch results (which carry the scheduler's metric, not the
    objective) as Optuna intermediate values by epoch, so that TPE ranks stopped trials by how far they got and
    how well they were doing. Tune's own OptunaSearch would look for the objective in them."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or OBJECTIVE in result or EPOCH_METRIC not in result:
            return
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._ot_trials[trial_id].report(result[EPOCH_METRIC], result[EPOCH])


class GridSearcher(Searcher):
    """Every point of an exhaustive grid, in order (the reference arm of bench/search_efficiency.py)."""

    def __init__(self, points: list[dict[str, Any]]) -> None:
        super().__init__()
        self.points, self.given = points, 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self.given >= len(self.points):
            return Searcher.FINISHED
        self.given += 1
        return self.points[self.given - 1]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"points": self.points, "given": self.given}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.points, self.given = state["points"], state["given"]


@contextmanager
def tune_environment() -> Iterator[None]:
    """Tune settings for a search, restored afterwards (a sweep in the same process sets others):
    Tune's own SIGINT handler ON (Ctrl-C saves the experiment state, then stops), its legacy reporter quiet,
    no automatic TensorBoard/CSV loggers (geovq writes its own HParams), and no strict metric check (per-epoch
    results carry the scheduler's metric, the last one the objective)."""
    wanted = {"TUNE_DISABLE_SIGINT_HANDLER": None, "RAY_AIR_NEW_OUTPUT": "0",
              "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    before = {k: os.environ.get(k) for k in wanted}
    try:
        for key, value in wanted.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_study(out: Path, cfg: SweepConfig, study: Study, search: Search, callbacks: tuple = ()) -> list[dict]:
    """One method's experiment (new, or restored from out/ray/METHOD); returns its trials (see `trial_rows`).
    Raises SearchInterrupted when it stopped before every trial finished (Ctrl-C)."""
    storage = (out / "ray").resolve()
    path = storage / study.method
    job = {"run_dir": str(out.resolve()), "config": cfg.as_dict(), "study": study, "seed": search.seed}
    trainable = tune.with_resources(tune.with_parameters(search_trial, job=job),
                                    {"cpu": cfg.cpus_per_trial * CPU_RESERVE_FRACTION, "gpu": cfg.gpus_per_trial or 0})
    points = [{**p, NUMBER: i} for i, p in enumerate(study.grid())] if search.grid else None
    total = len(points) if points is not None else search.trials
    with tune_environment():
        if tune.Tuner.can_restore(path):
            log.info("%s: resuming the search in %s", study.method, path)
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        else:
            if points is not None:
                searcher, scheduler = GridSearcher(points), FIFOScheduler()
            else:
                searcher = make_searcher(study, search)
                max_t = study.max_epochs(cfg.train.epochs)
                scheduler = FIFOScheduler() if search.pareto else ASHAScheduler(
                    time_attr=EPOCH, metric=EPOCH_METRIC, mode="max", max_t=max_t,
                    grace_period=min(study.space.grace_period, max_t),
                    reduction_factor=study.space.reduction_factor, stop_last_trials=False)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total,
                                            max_concurrent_trials=search.max_concurrent, reuse_actors=True,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=study.method, storage_path=str(storage), verbose=0,
                                          callbacks=[TrialLog(study.method, total), JsonLoggerCallback(),
                                                     *callbacks],
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures)))
        results = tuner.fit()
    rows = trial_rows(study, results)
    finished = sum(r["status"] != "unfinished" for r in rows)
    if finished < total:
        raise SearchInterrupted(study.method, finished, total, rows)
    return rows


def trial_rows(study: Study, results: Any) -> list[dict[str, Any]]:
    """One dict per trial: method, number, status, metrics, the sampled values (`values`) and the candidate."""
    rows = []
    for result in results:
        config = dict(result.config or {})
        number = config.pop(NUMBER, None)
        metrics = result.metrics or {}
        if OBJECTIVE in metrics:
            status = "finished"
        elif result.error is not None or GEOVQ_ERROR in metrics:
            status = "error"
        elif metrics.get("diverged"):
            status = "diverged"
        elif metrics.get("done"):
            status = "stopped"  # by ASHA, after its last reported epoch
        else:
            status = "unfinished"  # running when the search was interrupted: it runs again on resume
        candidate = study.candidate(config) if config else None
        rows.append({"method": study.method, "number": number, "trial_id": metrics.get("trial_id"),
                     "status": status, "values": config, "candidate": candidate, "metrics": metrics,
                     "error": str(result.error).splitlines()[0] if result.error is not None else
                     metrics.get(GEOVQ_ERROR)})
    return sorted(rows, key=lambda r: (r["number"] is None, r["number"]))


class TrialLog(Callback):
    """One line per started and finished trial, in search.log and on the console."""

    def __init__(self, method: str, total: int) -> None:
        self.method, self.total = method, total

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("%s trial %s (%s) started: %s", self.method, trial.config.get(NUMBER), trial.trial_id,
                 describe(trial.config))

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if OBJECTIVE in r:
            text = (f"val PSNR {r[OBJECTIVE]:.3f} dB at {r[BITS]} bits ({r.get('epochs_trained', 0)} epochs trained "
                    "here)")
        elif r.get(GEOVQ_ERROR):
            text = f"failed: {r[GEOVQ_ERROR]}"
        elif r.get("diverged"):
            text = f"diverged: {r.get('reason')}"
        else:
            text = (f"stopped by ASHA after epoch {r.get(EPOCH)} (val PSNR {r.get(EPOCH_METRIC, float('nan')):.3f} dB; "
                    f"{r.get('epochs_trained', 0)} epochs trained here)")
        log.info("%s trial %s (%s) finished: %s", self.method, trial.config.get(NUMBER), trial.trial_id, text)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.error("%s trial %s (%s) failed: see %s", self.method, trial.config.get(NUMBER), trial.trial_id,
                  Path(trial.path or ".") / "error.txt")


def describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(values.items()) if k != NUMBER)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plan_search(dataset: str, data: Any, data_root: str | os.PathLike | None, download: bool, space_path: Path,
                methods: list[str] | None, bits: int | None, pareto: bool, cpus_per_trial: int = 1
                ) -> tuple[SweepConfig, dict[str, Study]]:
    """The search's base configuration (the dataset's defaults, as a sweep resolves them) and one study per
    method, validated by the sweep's rules (geovq.config): the space file against the settings and quantizers,
    the budget against the grid, each rate against the training tokens."""
    from geovq.config import check_training_tokens, resolve_config, validate
    from geovq.search.space import load_space

    base = resolve_config(dataset, data.image_shape, [], [2], 1, None, False, data_root=data_root,
                          download=download, cpus_per_trial=cpus_per_trial)
    h, w = base.trunk.grid
    space = load_space(space_path, (h, w, base.trunk.latent_channels))
    chosen = methods if methods is not None else space.method_names
    if not chosen:
        raise GeovqError(f"--methods is empty; the space's methods: {', '.join(space.method_names)}")
    budget = None if pareto else (bits if bits is not None else space.bits)
    if budget is None and not pareto:
        raise GeovqError(f"{space_path} sets no bits: give --bits B (bits per image) or --pareto")
    studies = {m: space.study(m, budget) for m in chosen}  # unknown methods and infeasible budgets fail here
    log2k = range(int(math.log2(space.min_codes)), int(math.log2(space.max_codes)) + 1)
    sizes = sorted({k for st in studies.values() for k, _ in st.rates}) if budget else [2 ** b for b in log2k]
    cfg = replace(base, methods=chosen, codebook_sizes=sizes, vaes=list(space.variants),
                  max_train_images=space.max_train_images)
    validate(cfg)
    rates = [rate for study in studies.values() for rate in study.rates or [(space.max_codes, min(space.token_dims))]]
    check_training_tokens(cfg, len(data.train), rates, f"lower rate.max_codes in {space_path}")
    return cfg, studies


def run_search(out: Path, cfg: SweepConfig, studies: dict[str, Study], search: Search) -> dict[str, Any]:
    """Every method's study in turn (one Tune experiment each), then the outputs; returns best.yaml's content.
    On SearchInterrupted the outputs cover the trials so far."""
    from geovq.search.outputs import write_outputs

    space = next(iter(studies.values())).space
    header = {"dataset": search.dataset, "bits_per_image": search.bits, "pareto": search.pareto,
              "trials_per_method": search.trials, "seed": search.seed, "space": space.path}
    rows: list[dict] = []
    for method, study in studies.items():
        t0 = time.time()
        try:
            done = run_study(out, cfg, study, search)
        except SearchInterrupted as e:
            write_outputs(out, rows + e.rows, studies, header, search.seed)
            raise
        rows += done
        log.info("%s: %d trials in %.1f s", method, len(done), time.time() - t0)
    return write_outputs(out, rows, studies, header, search.seed)


def check_resumable(out: Path, identity: dict[str, Any]) -> None:
    """Refuse a search directory that holds a different search (its search.yaml) with one line."""
    import yaml

    path = out / "search.yaml"
    if not path.exists():
        return
    before = yaml.safe_load(path.read_text()) or {}
    described = {"space": "the space file changed", "config": "the dataset's configuration changed"}
    changed = [described.get(k, f"{k}: {before.get(k)} -> {identity.get(k)}") for k in identity
               if before.get(k) != identity.get(k)]
    if changed:
        raise GeovqError(f"{out} holds a different search ({'; '.join(changed)}); re-run its own command to resume "
                         "it, or choose a new --out")
