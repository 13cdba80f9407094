"""The driver of `geovq tune`: one Ray Tune experiment per method, so that every method gets the same number
of trials, over one Optuna study per method kept in the search folder's `study.journal`.

- Storage: the studies live in Optuna's JournalStorage (`study.journal`, JSON lines: no pickle anywhere, safe
  on a cluster's shared filesystem). Each trial's Tune id, its whole configuration, its status and its last
  metrics are user attributes of its Optuna trial, so trials.csv, best.yaml and a resume read the study alone.
  `optuna.load_study(study_name=METHOD, storage=JournalStorage(JournalFileBackend(".../study.journal")))` and
  optuna-dashboard open it.
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
- Interruption: Ctrl-C (or a kill) leaves the trials that were running open in the study; the same command
  starts a new Tune experiment whose first trials are those open ones, with their own numbers and values (their
  models resume from their epoch files), then asks for the rest. Tune's own experiment state (pickles) is never
  restored: nothing under the search folder is unpickled.
"""

from __future__ import annotations

import logging
import math
import os
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
    storage: str | None = None  # an Optuna RDB URL (--storage); None: the search folder's study.journal

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
    start-up proposals do not depend on the order in which trials finish. TPE, too, is seeded per trial (by seed
    and trial number): a proposal depends on the study's history and its number, not on how many proposals this
    process made before it, so a resumed search proposes what an uninterrupted one would have."""

    def __init__(self, seed: int, n_startup: int, multivariate: bool) -> None:
        self.seed, self.n_startup, self.multivariate = seed, n_startup, multivariate
        self.tpe = self._tpe(0)

    def _tpe(self, number: int) -> optuna.samplers.TPESampler:
        # TPE sees the start-up trials as its first observations; constant_liar: trials still running count as
        # bad, so concurrent proposals spread out
        return optuna.samplers.TPESampler(seed=zlib.crc32(f"{self.seed}/{number}/tpe".encode()), n_startup_trials=0,
                                          multivariate=self.multivariate, group=self.multivariate, constant_liar=True)

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
        self.tpe = self._tpe(trial.number)
        self.tpe.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


#: the search folder's Optuna storage: one study per method, named by the method
JOURNAL = "study.journal"
#: user attributes of a study's trials: Tune's id, Tune's whole config, geovq's status, the last metrics, the error
TRIAL_ID, CONFIG, STATUS, METRICS, ERROR = "trial_id", "config", "status", "metrics", "error"


def open_storage(out: Path, url: str | None = None) -> optuna.storages.BaseStorage:
    """The search's study storage: by default the search folder's journal file, JSON lines (its file backend
    keeps no pickled snapshots), appended under a file lock, so drivers on a cluster's shared filesystem can share
    it; or an Optuna RDB `url` (--storage: sqlite:///…, postgresql://…), a one-line error when it cannot open."""
    if url is None:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(out / JOURNAL)))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001  (SQLAlchemy's and the driver's errors, whatever the database)
        raise GeovqError(f"--storage {redacted(url)} cannot be opened: {str(e).splitlines()[0]}") from None


def redacted(url: str) -> str:
    """A storage URL without its password, for logs and search.yaml (no credentials in a search folder)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a URL SQLAlchemy parses: shown as given, minus anything before an @)
        return url.split("@")[-1]


def study_name(out: Path, search: Search, method: str) -> str:
    """The method's study in the storage: its name in the folder's own journal; in a shared database, prefixed
    with the search folder, so that searches sharing one database keep their studies apart."""
    return method if search.storage is None else f"{out.resolve()}:{method}"


def open_study(storage: optuna.storages.BaseStorage, study: Study, search: Search, name: str) -> optuna.Study:
    """The method's stored study (created on the first run; a grid search enqueues its points then)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize", "minimize"] if search.pareto else ["maximize"]
    new = name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    stored = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    if new and search.grid:
        distributions = study.distributions()
        for point in study.grid():  # one trial per point, asked in this order: trial numbers are grid indices
            stored.enqueue_trial({k: v for k, v in point.items() if k in distributions})
    return stored


def make_searcher(study: Study, search: Search, storage: optuna.storages.BaseStorage, name: str,
                  error_dir: Path) -> StoredOptunaSearch:
    """OptunaSearch over the stored study with a seeded TPE sampler (two objectives under --pareto)."""
    space = study.space
    sampler = SharedStartupSampler(search.seed, space.n_startup_trials, space.multivariate)
    objectives = dict(metric=[OBJECTIVE, BITS], mode=["max", "min"]) if search.pareto else dict(metric=OBJECTIVE,
                                                                                                 mode="max")
    return StoredOptunaSearch(Numbered(study), sampler=sampler, study_name=name, storage=storage,
                              error_dir=error_dir, **objectives)


@dataclass(frozen=True)
class Numbered:
    """The study's define-by-run sampler, adding each trial's proposal number to its config."""

    study: Study

    def __call__(self, trial: Any) -> dict[str, Any]:
        return {**self.study(trial), NUMBER: trial.number}


def open_trials(stored: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials asked but never settled: running when the search was interrupted (or killed)."""
    return [t for t in stored.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if STATUS not in t.user_attrs]


class StoredOptunaSearch(OptunaSearch):
    """OptunaSearch over a stored study that
    - hands out the study's open trials first (same number, same values) before asking for new ones, so that a
      resumed search runs exactly the trials an uninterrupted one would have;
    - records on each Optuna trial its Tune id and config when it starts, and its status and last metrics when
      it ends (before telling Optuna, which freezes the trial);
    - takes a trial's per-epoch results (which carry the scheduler's metric, not the objective) as Optuna
      intermediate values by epoch, so that TPE ranks stopped trials by how far they got and how well they were
      doing; an epoch already recorded (a resumed trial replaying its history) is not reported twice;
    - saves nothing: the study is its state (Tune would pickle the searcher otherwise)."""

    def __init__(self, *args: Any, error_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error_dir = error_dir
        self._open = open_trials(self._ot_study)
        self._last: dict[str, dict] = {}  # Tune id: its last result (an erroring trial completes without one)
        self._reported: dict[str, set[int]] = {}  # Tune id: the epochs its Optuna trial has values for

    def suggest(self, trial_id: str) -> dict | None:
        if self._open and trial_id not in self._ot_trials:
            frozen = self._open.pop(0)
            # Optuna's handle on an existing trial takes its storage id, which only the private field holds
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
            self._reported[trial_id] = set(frozen.intermediate_values)
        config = super().suggest(trial_id)
        trial = self._ot_trials[trial_id]
        trial.set_user_attr(TRIAL_ID, trial_id)
        trial.set_user_attr(CONFIG, config)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._last[trial_id] = result
        if isinstance(self.metric, list) or OBJECTIVE in result or EPOCH_METRIC not in result:
            return
        reported = self._reported.setdefault(trial_id, set())
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and result[EPOCH] not in reported:
            self._ot_trials[trial_id].report(result[EPOCH_METRIC], result[EPOCH])
            reported.add(result[EPOCH])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self._ot_trials.get(trial_id)
        if trial is not None and trial_id not in self._completed_trials:
            metrics = plain_metrics(result or self._last.get(trial_id) or {})
            trial.set_user_attr(METRICS, metrics)
            trial.set_user_attr(STATUS, "error" if error else trial_status(metrics))
            if error or metrics.get(GEOVQ_ERROR):
                trial.set_user_attr(ERROR, metrics.get(GEOVQ_ERROR) or error_line(self.error_dir / trial_id))
        super().on_trial_complete(trial_id, result, error)

    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search resumes from its stored study, never from Tune's searcher state")


def trial_status(metrics: dict[str, Any]) -> str:
    """finished (scored), error (a GeovqError in the trial), diverged, or stopped (by ASHA)."""
    if OBJECTIVE in metrics:
        return "finished"
    if metrics.get(GEOVQ_ERROR):
        return "error"
    return "diverged" if metrics.get("diverged") else "stopped"


def plain_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """A result's top-level scalars, JSON-safe (the journal stores JSON): non-finite floats become None."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if "/" in key or key == "config" or not isinstance(value, (str, int, float, bool, type(None))):
            continue
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def error_line(trial_dir: Path) -> str:
    """The last line of Tune's error.txt for a trial that raised (the exception and its message)."""
    path = trial_dir / "error.txt"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
    return lines[-1].strip() if lines else f"the trial raised; see {path}"


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


def run_study(out: Path, cfg: SweepConfig, study: Study, search: Search, storage: optuna.storages.BaseStorage,
              callbacks: tuple = ()) -> list[dict]:
    """One method's study: its open trials, then new ones until `search.trials` (or the grid) have settled;
    returns its trials (see `study_rows`). Raises SearchInterrupted when it stopped before that (Ctrl-C)."""
    experiment = (out / "ray").resolve()
    name = study_name(out, search, study.method)
    stored = open_study(storage, study, search, name)
    total = len(stored.trials) if search.grid else search.trials
    settled = sum(STATUS in t.user_attrs for t in stored.get_trials(deepcopy=False))
    if settled:
        log.info("%s: resuming the search in %s: %d of %d trials settled, %d to run again", study.method,
                 out / JOURNAL if search.storage is None else redacted(search.storage), settled, total,
                 len(open_trials(stored)))
    if settled < total:
        job = {"run_dir": str(out.resolve()), "config": cfg.as_dict(), "study": study, "seed": search.seed}
        trainable = tune.with_resources(tune.with_parameters(search_trial, job=job),
                                        {"cpu": cfg.cpus_per_trial * CPU_RESERVE_FRACTION,
                                         "gpu": cfg.gpus_per_trial or 0})
        searcher = make_searcher(study, search, storage, name, experiment / study.method)
        max_t = study.max_epochs(cfg.train.epochs)
        scheduler = FIFOScheduler() if search.pareto or search.grid else ASHAScheduler(
            time_attr=EPOCH, metric=EPOCH_METRIC, mode="max", max_t=max_t,
            grace_period=min(study.space.grace_period, max_t),
            reduction_factor=study.space.reduction_factor, stop_last_trials=False)
        with tune_environment():
            tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=total - settled,
                                            max_concurrent_trials=search.max_concurrent, reuse_actors=True,
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=study.method, storage_path=str(experiment), verbose=0,
                                          callbacks=[TrialLog(study.method, total), JsonLoggerCallback(),
                                                     *callbacks],
                                          failure_config=tune.FailureConfig(max_failures=cfg.max_failures))).fit()
    rows = study_rows(study, stored)  # the same storage the searcher wrote to: it reads what it recorded
    finished = sum(r["status"] != "unfinished" for r in rows)
    if finished < total:
        raise SearchInterrupted(study.method, finished, total, rows)
    return rows


def study_rows(study: Study, stored: optuna.Study) -> list[dict[str, Any]]:
    """One dict per trial that reached Tune: method, number, trial_id, status (unfinished: open, it runs again on
    resume), metrics, the sampled values (`values`), the candidate and the error line."""
    rows = []
    for trial in stored.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if CONFIG not in attrs:
            continue  # asked, never handed to Tune (a grid point not reached yet, or a kill in between)
        values = {k: v for k, v in attrs[CONFIG].items() if k != NUMBER}
        rows.append({"method": study.method, "number": trial.number, "trial_id": attrs.get(TRIAL_ID),
                     "status": attrs.get(STATUS, "unfinished"), "values": values, "candidate": study.candidate(values),
                     "metrics": attrs.get(METRICS, {}), "error": attrs.get(ERROR)})
    return rows


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
    storage = open_storage(out, search.storage)  # one handle for every method's study and the outputs

    def stored() -> dict[str, optuna.Study]:  # the studies the storage holds so far (importances read them)
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
        return {m: optuna.load_study(study_name=study_name(out, search, m), storage=storage) for m in studies
                if study_name(out, search, m) in names}

    for method, study in studies.items():
        t0 = time.time()
        try:
            done = run_study(out, cfg, study, search, storage)
        except SearchInterrupted as e:  # `complete: false` tells `sweep --tuned` that the search goes on
            write_outputs(out, rows + e.rows, studies, {**header, "complete": False}, search.seed, stored())
            raise
        rows += done
        log.info("%s: %d trials in %.1f s", method, len(done), time.time() - t0)
    return write_outputs(out, rows, studies, {**header, "complete": True}, search.seed, stored())


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
