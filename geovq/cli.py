"""The `geovq` command line. Follow `sweep` downwards to see where the data goes:

    cli.sweep: parse the options
      -> distributed.sweep.resolve_runs: config.resolve_config (every rule) and a stages.plan.RunPlan per dataset
      -> distributed.sweep.start_runs, run_and_report -> distributed.tune.run_sweeps: one Ray Tune trial per
         VAE and unit -> stages.run.run_vae / run_unit (one stage module per step) -> RunDir.write_row (a Row)
      -> report.build.write_report -> cli: print each run's summary

Only typer is imported at module level: torch and Ray load inside commands, so `geovq --help` is fast.
A user error (`GeovqError`) prints one line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import typer

from geovq.errors import GeovqError, RunFailed

if TYPE_CHECKING:
    from geovq.config import SweepConfig
    from geovq.distributed.sweep import SweepRun

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-hoc discrete codes for Gaussian VAEs vs VQ-VAE at matched bit rate, on Ray.")


def user_errors(fn):
    """Turn GeovqError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GeovqError as e:
            typer.secho(f"Error: {e}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None
        finally:
            _close_logs()

    return wrapper


def comma_list(text: str, option: str, kind: type = str) -> list:
    """A comma list option's values, each given once (a duplicate would schedule the same units twice)."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = {int: "integers", str: "names"}[kind]
        raise GeovqError(f"{option} {text!r} must be a comma list of {noun}, e.g. 16,64,256") from None
    for i, value in enumerate(values):
        if value in values[:i]:
            raise GeovqError(f"{option} lists {value} twice; give each value once")
    return values


def _gpus(text: str) -> float | None:
    """--gpus-per-trial: None for auto, else a number (its range is checked with the rest of the config)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise GeovqError(f"--gpus-per-trial {text!r} must be auto or a number, e.g. 1 or 0.25") from None


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains `text`; every other record passes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


#: Ray's WARNING that a local instance started with its default, token authentication, on: it reports the safe
#: default, on every run. The opposite warning (authentication off) still reaches the console.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_ON = _DropMessage("Token authentication is enabled for this Ray cluster")


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """`kill`, `timeout` and job schedulers stop a process with SIGTERM. Taken as Ctrl-C, a sweep or search stops
    the same clean way (one "interrupted" line, finished work kept, exit 130) instead of dying in the handler
    that ray.init installs, with a stack dump and no word on what was kept. Entered after ray.init for that
    reason; the previous handler is put back on exit. The handler raises KeyboardInterrupt itself: a sweep that a
    script started in the background (`geovq sweep … &`) ignores SIGINT, and passing SIGTERM on as SIGINT then
    did nothing."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _quiet_ray(verbose: bool) -> None:
    """Without --verbose, Ray Tune's own per-trial tracebacks stay in the run directory's errors/ (geovq prints
    one line per failure) and Ray's notice that token authentication is on is dropped; with it, everything
    Ray logs reaches the console."""
    import ray  # noqa: F401  (importing Ray configures its "ray" logger: set the level after it)

    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.WARNING)  # INFO lines with --verbose only
    if not verbose:
        for name in ("ray.tune", "ray.train", "ray.air"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-block progress of the Ray Data stages
        logging.getLogger(_RAY_AUTH_LOGGER).addFilter(_TOKEN_AUTH_ON)  # (a logger keeps a filter only once)
    else:
        logging.getLogger(_RAY_AUTH_LOGGER).removeFilter(_TOKEN_AUTH_ON)


def _close_logs() -> None:
    """Detach the handlers a command attached (`_setup_logging`) when it ends: code run after it in the same process
    (a notebook, the tests) must not write into the last run's sweep.log."""
    log = logging.getLogger("geovq")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _setup_logging(log_paths: list[Path]) -> None:
    log = logging.getLogger("geovq")
    log.setLevel(logging.INFO)
    _close_logs()
    for path in log_paths:  # each run directory's own sweep.log
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    console = BarSafeHandler(sys.stderr)
    console.setFormatter(logging.Formatter("geovq: %(message)s"))
    log.addHandler(console)


class BarSafeHandler(logging.StreamHandler):
    """The console's log lines, printed between the trials' progress bars rather than onto a live one: on a
    terminal, Ray's bar manager hides its bars, the line is printed, the bars come back (tqdm_ray.safe_print)."""

    def emit(self, record: logging.LogRecord) -> None:
        if not (self.stream.isatty() and "ray.experimental.tqdm_ray" in sys.modules):
            super().emit(record)
            return
        from ray.experimental.tqdm_ray import safe_print

        try:
            safe_print(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (a log line must never fail the command)
            self.handleError(record)


def _sweep(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Argument(None, help="digits (embedded, offline), mnist, fashion, cifar10 or npz; a comma list runs several at once; with --config, the one it records"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory \\[default: runs/DATASET or runs/DATASET-quick]; with several datasets, their parent folder"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list \\[default: every registered method]"),
    codebook_sizes: Optional[str] = typer.Option(None, "--codebook-sizes", help="comma list of K \\[default: per dataset]"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds, 0..N-1 \\[default: 3; 1 with --quick]"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="training epochs of every model \\[default: per dataset]"),
    quick: bool = typer.Option(False, "--quick", metavar="", help="a few-minute smoke configuration"),
    tiny: bool = typer.Option(False, "--tiny", metavar="", help="for geovq's own tests: --quick on a small trunk (2 epochs, 300 training images), seconds per unit; its numbers mean nothing"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder \\[default: $GEOVQ_DATA or ~/.cache/geovq/data]"),
    download: bool = typer.Option(False, "--download", metavar="", help="let torchvision download a missing dataset"),
    token_dim: Optional[int] = typer.Option(None, "--token-dim", help="channels per token d \\[default: C, one token per cell]"),
    grouping: str = typer.Option("contiguous", "--grouping", help="contiguous or interleaved channel groups"),
    vae: Optional[str] = typer.Option(None, "--vae", help="Gaussian VAE variants, comma list: plain, tdc (TDC: its tokens carry log2 K bits) \\[default: plain,tdc]"),
    tdc_bits: Optional[float] = typer.Option(None, "--tdc-bits", help="TDC target bits per token \\[default: log2 K]"),
    prior: str = typer.Option("transformer", "--prior", help="the prior trained over every unit's codes: transformer or pixelcnn"),
    no_prior: bool = typer.Option(False, "--no-prior", metavar="", help="train no prior (no prior rate, no samples)"),
    prior_samples: Optional[int] = typer.Option(None, "--prior-samples", help="samples per prior for the sample metrics \\[default: 10000; 2000 with --quick]"),
    finetune_decoder: bool = typer.Option(False, "--finetune-decoder", metavar="", help="also report each post-hoc method with its decoder fine-tuned on the codebook"),
    finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="max epochs of the decoder fine-tune (early-stopped on val)"),
    cpus_per_trial: int = typer.Option(1, "--cpus-per-trial", help="torch threads (and CPUs reserved) per trial"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="trials at once \\[default: cluster CPUs / --cpus-per-trial]; each trial's worker imports torch once, so short trials (--tiny) are cheapest one at a time"),
    gpus_per_trial: str = typer.Option("auto", "--gpus-per-trial", help="GPUs per trial: auto (1 where the cluster has GPUs, else 0), or a number; fractions share a GPU"),
    max_failures: int = typer.Option(2, "--max-failures", help="retries of a crashed trial (killed worker, lost node); geovq errors are not retried"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address \\[default: start local Ray]"),
    verbose: bool = typer.Option(False, "--verbose", metavar="", help="show Ray's own logs and tracebacks on the console"),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="a `geovq tune` directory: each method at its own best validation configuration (K, d, VAE and its training, hyperparameters)"),
    config: Optional[Path] = typer.Option(None, "--config", help="a run's config.yaml (the format geovq writes): that run's configuration, with the options given here on top"),
    set_values: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="repeatable: a training or model setting by its dotted name (train.lr, train.batch_size, trunk.hidden, trunk.latent_channels, tdc.factor, vq.commitment, ...)"),
    **method_options: Any,
) -> None:
    """Train the Gaussian VAEs and the end-to-end baselines (VQ-VAE, FSQ, LFQ, residual VQ), fit every post-hoc
    quantizer, evaluate at matched bit rate, write a run directory.

    Each method's hyperparameters are options of their own (--METHOD-PARAM), derived from its constructor.
    """
    t_start = time.time()
    from geovq.distributed.sweep import resolve_runs

    # parse: the command line as resolve_config's arguments, and a run directory per dataset
    if dataset is None and config is None:
        raise GeovqError("give a DATASET (digits, mnist, fashion, cifar10 or npz), or --config with a run's config.yaml")
    datasets = comma_list(dataset, "DATASET") if dataset is not None else [_load_config(config).dataset]
    chosen = _methods(methods)
    params = _method_params(method_options, chosen)
    sizes = comma_list(codebook_sizes, "--codebook-sizes", int) if codebook_sizes else None
    # both VAEs by default: on the plain one every post-hoc method sits at the VAE's own low-rate ceiling
    vaes = comma_list(vae or "plain,tdc", "--vae")
    settings = dict(methods=chosen, codebook_sizes=sizes, vaes=vaes, method_params=params, tuned={}, seeds=seeds,
                    epochs=epochs, quick=quick, tiny=tiny, download=download, token_dim=token_dim,
                    grouping=grouping, tdc_bits=tdc_bits, finetune_decoder=finetune_decoder,
                    finetune_epochs=finetune_epochs, prior=None if no_prior else prior, prior_samples=prior_samples,
                    cpus_per_trial=cpus_per_trial, max_concurrent_trials=max_concurrent,
                    gpus_per_trial=_gpus(gpus_per_trial), max_failures=max_failures)
    if tuned is not None:  # each method at its tuned configuration, which fixes its rate, VAE and settings
        given = [option for option, value in (("--codebook-sizes", codebook_sizes), ("--token-dim", token_dim),
                                              ("--vae", vae), ("--tdc-bits", tdc_bits), ("--epochs", epochs),
                                              ("--quick", quick), ("--tiny", tiny)) if value]
        given += [f"--{m}-{n}".replace("_", "-") for m, named in params.items() for n in named]
        settings.update(_tuned_settings(tuned, datasets, chosen if methods else None, given))
    base = None
    if config is not None:  # that configuration, with only the options typed here on top
        base, settings = _config_settings(config, datasets, settings, _typed_options(ctx), bool(params))
    suffix = ("-tiny" if tiny else "-quick" if quick else "") + ("-tuned" if tuned is not None else "")
    # one dataset: --out is its run directory; several: --out is their parent, one run directory each
    roots = {d: out if out and len(datasets) == 1 else (out or Path("runs")) / f"{d}{suffix}" for d in datasets}
    # resolve: each dataset's configuration, every rule checked (geovq.config), in its run directory
    runs = resolve_runs(roots, data_root, settings, base, tuple(set_values or ()))
    # run: on Ray, logged into each run directory; interrupted or failed units end the command here
    reports = _run_sweep(runs, address, verbose)
    # print: each run's summary and where its report is
    _print_sweep(runs, reports, t_start)


#: the sweep's options as resolve_config's arguments (the settings dict's keys)
_SETTING_OF_OPTION = {"methods": "methods", "codebook_sizes": "codebook_sizes", "vae": "vaes", "seeds": "seeds",
                      "epochs": "epochs", "token_dim": "token_dim", "grouping": "grouping", "tdc_bits": "tdc_bits",
                      "prior": "prior", "no_prior": "prior", "prior_samples": "prior_samples",
                      "finetune_decoder": "finetune_decoder", "finetune_epochs": "finetune_epochs",
                      "cpus_per_trial": "cpus_per_trial", "max_concurrent": "max_concurrent_trials",
                      "gpus_per_trial": "gpus_per_trial",
                      "max_failures": "max_failures", "download": "download"}


def _typed_options(ctx: typer.Context | None) -> set[str]:
    """The parameters given on the command line (not their defaults). By the source's name: typer may carry a
    click of its own, whose ParameterSource is not click's."""
    if ctx is None:
        return set()
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"}


def _config_settings(path: Path, datasets: list[str], settings: dict[str, Any], typed: set[str],
                     method_params_given: bool) -> tuple[Any, dict[str, Any]]:
    """(the recorded configuration of --config, the settings of the options typed on top of it)."""
    refused = [f"--{name}" for name in ("quick", "tiny", "tuned") if name in typed]
    if refused:
        raise GeovqError(f"--config replays a configuration as it was resolved; drop {refused[0]}")
    base = _load_config(path)
    if datasets != [base.dataset]:
        raise GeovqError(f"--config {path} is a {base.dataset} configuration; run it as `geovq sweep {base.dataset} "
                         f"--config {path}`")
    given = {_SETTING_OF_OPTION[name]: settings[_SETTING_OF_OPTION[name]] for name in typed
             if name in _SETTING_OF_OPTION}
    if method_params_given:
        given["method_params"] = settings["method_params"]
    return base, given


def _load_config(path: Path) -> SweepConfig:
    """The configuration recorded in --config's file."""
    from geovq.config import SweepConfig

    if not path.is_file():
        raise GeovqError(f"--config {path} is not a file; give a run's config.yaml")
    return SweepConfig.load(path)


def _methods(methods: str | None) -> list[str]:
    """--methods, each known (end-to-end or registered post-hoc); every method when not given."""
    from geovq.config import END_TO_END
    from geovq.quantize import QUANTIZERS

    known = list(END_TO_END) + sorted(QUANTIZERS)
    chosen = comma_list(methods, "--methods") if methods else known
    for m in chosen:
        if m not in known:
            raise GeovqError(f"unknown method {m!r}; valid: {', '.join(known)}")
    if not chosen:
        raise GeovqError(f"--methods is empty; valid: {', '.join(known)}")
    return chosen


def _method_params(method_options: dict[str, Any], chosen: list[str]) -> dict[str, dict[str, Any]]:
    """{method: {hyperparameter: value}} of the derived --METHOD-PARAM options given, each of a chosen method."""
    params: dict[str, dict[str, Any]] = {}
    for key, value in method_options.items():
        if value is not None:
            method, name = _DERIVED[key]
            if method not in chosen:
                raise GeovqError(f"--{method}-{name.replace('_', '-')} is given, but {method} is not among --methods")
            params.setdefault(method, {})[name] = value
    return params


def _tuned_settings(tune_dir: Path, datasets: list[str], methods: list[str] | None, given: list[str]
                    ) -> dict[str, Any]:
    """resolve_config's arguments that --tuned fixes: the methods, their tuned records, K and VAE variants. It
    runs one dataset, with none of the options it fixes (`given`: those on the command line)."""
    if given or len(datasets) > 1:
        raise GeovqError(f"--tuned fixes each method's rate, VAE and settings; drop {given[0]}" if given
                         else "--tuned runs one dataset (the one it was tuned on)")
    chosen, records = _tuned_records(tune_dir, datasets[0], methods)
    return {"methods": chosen, "tuned": records, "codebook_sizes": sorted({r["n_codes"] for r in records.values()}),
            "vaes": sorted({r["vae"] for r in records.values() if r["vae"]}) or ["plain"]}


def _run_sweep(runs: list[SweepRun], address: str | None, verbose: bool) -> list[list[dict[str, Any]]]:
    """`geovq.distributed.sweep`'s start and run, with the run directories' sweep.log attached; Ctrl-C (or
    SIGTERM) exits 130 and failed units exit 1, each after one line on what was kept."""
    from geovq.distributed.sweep import progress, run_and_report, start_runs

    _quiet_ray(verbose)
    with ExitStack() as locks:  # each run directory locked until the command ends
        start_runs(runs, address, locks)
        _setup_logging([run.plan.run.log for run in runs])
        log = logging.getLogger("geovq")
        try:
            with _sigterm_as_ctrl_c():
                return run_and_report(runs, address)
        except KeyboardInterrupt:
            finished, planned = progress(runs)
            log.error("interrupted: %d of %d units finished and are kept; re-run the same command to resume",
                      finished, planned)
            raise typer.Exit(130) from None
        except RunFailed as e:
            for line in e.lines:
                log.error("%s", line)
            finished, planned = progress(runs)  # the lines may also name a VAE, which is not a unit
            log.error("%d of %d units failed or were not run (%d finished and are kept); no report was written: fix "
                      "the cause and re-run the same command (`geovq report DIR` summarises a run's finished units, "
                      "marked partial)", planned - finished, planned, finished)
            raise typer.Exit(1) from None


def _print_sweep(runs: list[SweepRun], reports: list[list[dict[str, Any]]], t_start: float) -> None:
    """Each run's summary table (its rows, `reports`), where its report is, and how to watch its trainings."""
    from geovq.metrics.image import lpips_weights_hint

    log = logging.getLogger("geovq")
    for run, rows in zip(runs, reports):
        _print_summary(rows, title=f"{run.cfg.dataset}: test split (per seed)")
    if any(r["lpips"] is None for rows in reports for r in rows) and lpips_weights_hint():
        log.info("%s", lpips_weights_hint())
    log.info("done in %.1f s", time.time() - t_start)
    for run in runs:
        log.info("%s report: %s (and report.md)", run.cfg.dataset, run.root / "report.html")
    logdir = runs[0].root if len(runs) == 1 else runs[0].root.parent
    log.info("watch the trainings: tensorboard --logdir %s --host 127.0.0.1", logdir)


#: derived option parameter name -> (method, hyperparameter)
_DERIVED: dict[str, tuple[str, str]] = {}


def _derived_parameters() -> list[inspect.Parameter]:
    """One option per hyperparameter of every method (end-to-end or post-hoc), from its constructor's signature."""
    from geovq.end_to_end import END_TO_END_METHODS
    from geovq.quantize import QUANTIZERS

    out = []
    for method, qcls in [*END_TO_END_METHODS.items(), *sorted(QUANTIZERS.items())]:
        for hp in qcls.hyperparameters().values():
            key = f"{method}__{hp.name}".replace("-", "_")
            _DERIVED[key] = (method, hp.name)
            option = f"--{method}-{hp.name}".replace("_", "-")
            out.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[hp.type],
                                         default=typer.Option(None, option, help=f"{hp.help or hp.name} "
                                                              f"\\[default: {hp.default}]", show_default=False,
                                                              rich_help_panel=f"{method} hyperparameters")))
    return out


def _register_sweep() -> None:
    # typer finds the context by its annotation's class; _sweep's annotations are strings (postponed evaluation)
    base = [p.replace(annotation=typer.Context) if p.name == "ctx" else p
            for p in inspect.signature(_sweep).parameters.values() if p.kind != p.VAR_KEYWORD]
    signature = inspect.Signature(base + _derived_parameters())

    @functools.wraps(_sweep)
    def sweep(**kwargs: Any) -> None:
        known = {p.name for p in base}
        _sweep(**{k: v for k, v in kwargs.items() if k in known},
               **{k: v for k, v in kwargs.items() if k not in known})

    sweep.__signature__ = signature
    del sweep.__wrapped__  # typer must read the derived signature, not _sweep's
    app.command(name="sweep")(user_errors(sweep))


_register_sweep()


@app.command()
@user_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., help="one or more run directories of the same dataset"),
    out: Optional[Path] = typer.Option(None, "--out", help="report folder \\[default: the run directory; required with several]"),
) -> None:
    """Write results.json/.csv, report.md, report.html and figures from run directories' finished units."""
    from geovq.io import directory_lock
    from geovq.report.build import write_report

    destination = out or run_dirs[0]
    with ExitStack() as lock:
        if (destination / "config.yaml").is_file():  # a run directory: refused while a sweep (or report) writes it
            lock.enter_context(directory_lock(destination))
        runs = write_report(run_dirs, out)
    _print_summary(runs.rows)
    if runs.finished < runs.planned:
        typer.secho(f"PARTIAL report: {runs.finished} of {runs.planned} units finished; re-run the sweep to finish "
                    "the rest", err=True, fg=typer.colors.YELLOW)
    where = out or run_dirs[0]
    typer.echo(f"report: {where / 'report.html'} (and report.md)", err=True)


@app.command()
@user_errors
def sample(
    run_dir: Path = typer.Argument(..., help="a sweep's run directory"),
    method: str = typer.Option(..., "--method", help="the unit's method"),
    vae: Optional[str] = typer.Option(None, "--vae", help="its VAE variant (plain, tdc) \\[default: the only one]"),
    k: Optional[int] = typer.Option(None, "--k", help="its codebook size K \\[default: the only one]"),
    seed: int = typer.Option(0, "--seed", help="the unit's seed (and the sampling seed)"),
    n: int = typer.Option(..., "-n", help="number of samples"),
    out: Path = typer.Option(..., "--out", help="folder for samples.png, samples.npz and samples.json"),
    prior: str = typer.Option("transformer", "--prior", help="transformer or pixelcnn (trained by the sweep)"),
    temperature: float = typer.Option(1.0, "--temperature", help="softmax temperature, > 0"),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="keep the k most likely codes"),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="keep the smallest set of codes with this mass, in (0, 1]"),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", metavar="", help="domain FID, precision, recall (and FID/KID with real weights)"),
) -> None:
    """Draw samples from a unit's prior, decoded through its codebook and decoder (the fine-tuned one where it exists)."""
    from geovq.models.priors.base import check_sampling
    from geovq.stages.plan import RunPlan

    check_sampling(n, temperature, top_k, top_p)
    plan = RunPlan.load(run_dir)
    run, cfg = plan.run, plan.cfg
    chosen = [plan.select(method, vae, k, seed)]
    import torch

    from geovq.stages.prior import sample_stage

    progress = _console_progress()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = sample_stage(run, cfg, chosen[0], device, progress,
                          n=n, kind=prior, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, out=out,
                          metrics=metrics)
    shown = ", ".join(f"{key} {result[key]:.4g}" for key in ("domain_fid", "precision", "recall", "fid")
                      if isinstance(result.get(key), (int, float)))
    typer.echo(f"{n} samples of {chosen[0].key} in {out} (samples.png, samples.npz, samples.json)"
               + (f": {shown}" if shown else ""), err=True)


def _print_summary(rows: list[dict], title: str = "test split (per seed)") -> None:
    from rich.console import Console
    from rich.table import Table

    from geovq.report.tables import decoder_label

    table = Table(title=title)
    for col in ("method", "vae", "decoder", "K", "bits/img", "prior bits/img", "coded bits/img", "seed", "PSNR",
                "SSIM", "perplexity", "dead"):
        table.add_column(col)
    for r in rows:  # every rate: fixed length; where a prior was trained its −Σ log2 p and its real files' size
        prior_bits, coded_bits = r.get("prior_bits_per_image"), r.get("coded_bits_per_image")
        table.add_row(r["method"], r["vae"] or "—", decoder_label(r["finetuned"], r["vae"]), str(r["K"]),
                      f"{r['bits_per_image']:g}", "—" if prior_bits is None else f"{prior_bits:.1f}",
                      "—" if coded_bits is None else f"{coded_bits:.1f}", str(r["seed"]),
                      f"{r['psnr']:.2f}", f"{r['ssim']:.4f}", f"{r['usage_perplexity']:.1f}", str(r["dead_codes"]))
    Console(stderr=True).print(table)


# -- geovq tune ----------------------------------------------------------------------------------------------
#: the space files shipped inside the package (package data: a checkout, an editable install and a wheel alike)
SPACES_DIR = Path(__file__).resolve().parent / "tune_spaces"


@app.command()
@user_errors
def tune(
    dataset: str = typer.Argument(..., help="digits (embedded, offline), mnist, fashion, cifar10 or npz"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma list \\[default: every method of the space file]"),
    trials: int = typer.Option(20, "--trials", help="trials per method: every method gets the same budget"),
    bits: Optional[int] = typer.Option(None, "--bits", help="bits per image, tokens × log2 K \\[default: the space file's]"),
    pareto: bool = typer.Option(False, "--pareto", metavar="", help="search K freely; bits per image become a second objective (ASHA off)"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="trials at once \\[default: cluster CPUs / --cpus-per-trial]; 1: the same seed proposes the same configurations"),
    seed: int = typer.Option(0, "--seed", help="seeds the TPE sampler and every model"),
    space: Optional[Path] = typer.Option(None, "--space", help="search space file \\[default: geovq/tune_spaces/DATASET.yaml]"),
    out: Optional[Path] = typer.Option(None, "--out", help="search directory \\[default: runs/DATASET-tune]; re-run the same command to resume"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="dataset folder \\[default: $GEOVQ_DATA or ~/.cache/geovq/data]"),
    download: bool = typer.Option(False, "--download", metavar="", help="let torchvision download a missing dataset"),
    cpus_per_trial: int = typer.Option(1, "--cpus-per-trial", help="torch threads (and CPUs reserved) per trial"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address \\[default: start local Ray]"),
    storage: Optional[str] = typer.Option(None, "--storage", metavar="URL", help="an Optuna RDB storage for the studies (sqlite:///…, postgresql://…) \\[default: OUT/study.journal]"),
    verbose: bool = typer.Option(False, "--verbose", metavar="", help="show Ray's own logs and tracebacks on the console"),
) -> None:
    """Search each method's hyperparameters, its VAE's training and its rate allocation on VALIDATION PSNR
    (Ray Tune + Optuna TPE + ASHA); the test split is never read. `geovq sweep DATASET --tuned OUT` then scores
    every method's best configuration on test."""
    t_start = time.time()
    from geovq.config import dataset_root
    from geovq.data import load_dataset
    from geovq.io import check_writable

    root = dataset_root([dataset], data_root)  # the sweep's rules for a dataset and its data root
    if trials < 1:
        raise GeovqError(f"--trials {trials} must be >= 1 (trials per method)")
    if pareto and bits is not None:
        raise GeovqError("--pareto searches K freely and makes bits an objective; drop --bits (or --pareto)")
    if max_concurrent is not None and max_concurrent < 1:
        raise GeovqError(f"--max-concurrent {max_concurrent} must be >= 1")
    if seed < 0:
        raise GeovqError(f"--seed {seed} must be >= 0")
    data = load_dataset(dataset, root, download=download)  # fails early, before anything is written
    from geovq.search.driver import Search, SearchInterrupted, check_resumable, plan_search, run_search

    space_path = space or SPACES_DIR / f"{dataset}.yaml"
    cfg, studies = plan_search(dataset, data, root, download, space_path,
                               comma_list(methods, "--methods") if methods else None, bits, pareto, cpus_per_trial)
    chosen, budget = list(studies), next(iter(studies.values())).bits
    out = out or Path("runs") / f"{dataset}-tune"
    if out.exists() and not out.is_dir():
        raise GeovqError(f"--out {out} is an existing file; give a folder for the search directory")
    check_writable(out)
    from geovq.search.driver import open_storage, redacted

    if storage is not None:
        open_storage(out, storage)  # a database that cannot open fails here, before anything is written
    identity = {"dataset": dataset, "methods": chosen, "trials": trials, "bits": budget, "pareto": pareto,
                "seed": seed, "space": Path(space_path).read_text(), "config": cfg.identity(),
                "storage": redacted(storage) if storage is not None else "study.journal"}
    check_resumable(out, identity)
    from geovq.distributed.tune import start_cluster

    _quiet_ray(verbose)
    cfg.gpus_per_trial = start_cluster(address, None, cpus_per_trial)
    import ray

    concurrent = max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_trial))
    search = Search(dataset, tuple(chosen), trials, budget, seed, concurrent, storage=storage)
    from geovq.io import directory_lock, write_text

    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out):  # a second search on this folder is refused while this one runs
        write_text(out / "search.yaml", yaml_dump(identity))
        _setup_logging([out / "search.log"])
        log = logging.getLogger("geovq")
        log.info("search %s: %s, methods %s, %d trials each, %s, seed %d, %d at once, space %s", out, dataset,
                 ",".join(chosen), trials, "Pareto (K free)" if pareto else f"{budget} bits per image", seed,
                 concurrent, space_path)
        try:
            with _sigterm_as_ctrl_c():
                best = run_search(out, cfg, studies, search)
        except SearchInterrupted as e:
            log.error("interrupted: %s; re-run the same command to resume (finished trials are kept)", e)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            log.error("interrupted; re-run the same command to resume (finished trials are kept)")
            raise typer.Exit(130) from None
    _print_best(best)
    log.info("trials: %s; best configurations: %s; `geovq sweep %s --tuned %s` scores them on test",
             out / "trials.csv", out / "best.yaml", dataset, out)
    log.info("done in %.1f s", time.time() - t_start)


def yaml_dump(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def _print_best(best: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{best['dataset']}: best validation configuration per method")
    for col in ("method", "finished", "val PSNR", "bits", "K", "d", "vae", "settings"):
        table.add_column(col)
    for method, entry in best["methods"].items():
        if not entry:
            table.add_row(method, "0", "—", "", "", "", "", "")
            continue
        for e in entry.get("front", [entry]):
            t = e["tuned"]
            settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in {**t["vae_overrides"], **t["params"]}.items())
            table.add_row(method, f"{entry['finished']}/{entry['trials']}", f"{e['val_psnr']:.3f}",
                          str(e["bits_per_image"]), str(t["n_codes"]), str(t["token_dim"]), t["vae"] or "—", settings)
    Console(stderr=True).print(table)


# -- geovq compress / decompress -----------------------------------------------------------------------------
@app.command()
@user_errors
def compress(
    run_dir: Path = typer.Argument(..., help="a sweep's run directory"),
    images: list[Path] = typer.Argument(..., help="PNG/JPEG files, or one .npz (key `images`, as `geovq sweep npz` reads it)"),
    method: str = typer.Option(..., "--method", help="the unit's method"),
    vae: Optional[str] = typer.Option(None, "--vae", help="its VAE variant (plain, tdc) \\[default: the only one]"),
    k: Optional[int] = typer.Option(None, "--k", help="its codebook size K \\[default: the only one]"),
    seed: int = typer.Option(0, "--seed", help="the unit's seed"),
    prior: str = typer.Option("transformer", "--prior", help="the prior that codes the codes: transformer or pixelcnn (fixed-length codes where the sweep trained none)"),
    out: Path = typer.Option(..., "--out", help="folder for one .gvq file per image"),
) -> None:
    """Compress images with one unit of a run: its encoder and codebook, then a range coder driven by its prior."""
    from geovq.codec import Codec
    from geovq.io import check_writable, write_bytes
    from geovq.images import read_images

    check_writable(out)
    codec = Codec.from_run(run_dir, method, vae, k, seed, prior)
    names, pixels = read_images(images, codec.image_shape)
    t0 = time.time()
    files = codec.compress(pixels, _console_progress())
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in zip(names, files):
        write_bytes(out / f"{name}.gvq", blob)
    bits = 8 * sum(len(b) for b in files) / len(files)
    typer.echo(f"compressed {len(files)} image(s) into {out}: {bits:.1f} bits per image on average (header "
               f"included), {len(files) / seconds:.1f} images/s", err=True)


@app.command()
@user_errors
def decompress(
    run_dir: Path = typer.Argument(..., help="the run directory whose unit compressed the files"),
    files: list[Path] = typer.Argument(..., help=".gvq files written by `geovq compress`"),
    out: Path = typer.Option(..., "--out", help="folder for one PNG per file"),
) -> None:
    """Decompress .gvq files to PNGs: the unit named by each file's header, its prior, codebook and decoder."""
    from geovq.codec import Codec, Header, payload_prior, unit_tag
    from geovq.images import write_png
    from geovq.io import check_writable
    from geovq.stages.plan import RunPlan

    check_writable(out)
    plan = RunPlan.load(run_dir)
    units = {unit_tag(u.key): u for u in plan.with_codes()}
    by_unit: dict = {}
    for path in files:
        if not path.is_file():
            raise GeovqError(f"{path} is not a file")
        blob = path.read_bytes()
        header = Header.parse(blob, str(path))
        if header.tag not in units:
            raise GeovqError(f"{path} was written by a unit that {run_dir} does not hold (tag {header.tag.hex()})")
        by_unit.setdefault((header.tag, header.kind), []).append((path, blob))
    out.mkdir(parents=True, exist_ok=True)
    for (tag, kind), group in by_unit.items():
        codec = Codec.for_unit(plan, units[tag], payload_prior(kind))
        images = codec.decompress([b for _, b in group], [str(p) for p, _ in group], _console_progress())
        for (path, _), image in zip(group, images):
            write_png(out / f"{path.stem}.png", image)
    typer.echo(f"decompressed {len(files)} file(s) into {out}", err=True)


def _console_progress():
    """tqdm on a terminal; nothing drawn into a redirected log (no carriage-return redraws there)."""
    from tqdm import tqdm

    from geovq.stages.common import no_progress

    return tqdm if sys.stderr.isatty() else no_progress


def _tuned_records(tune_dir: Path, dataset: str, methods: list[str] | None) -> tuple[list[str], dict[str, dict]]:
    """(methods, {method: tuned record}) from a `geovq tune` directory's best.yaml, for `sweep --tuned`."""
    from geovq.io import read_yaml

    path = tune_dir / "best.yaml"
    if not path.is_file():
        raise GeovqError(f"--tuned {tune_dir} holds no best.yaml; give the --out of a finished `geovq tune`")
    best = read_yaml(path, "a readable best.yaml") or {}
    if not isinstance(best, dict) or not isinstance(best.get("methods") or {}, dict):
        raise GeovqError(f"{path} must be a mapping with a `methods:` mapping (what `geovq tune` writes)")
    if best.get("dataset") != dataset:
        raise GeovqError(f"--tuned {tune_dir} was tuned on {best.get('dataset')!r}, not {dataset!r}")
    if best.get("pareto"):
        raise GeovqError(f"--tuned {tune_dir} is a --pareto search (a front per method, no single best); tune "
                         "with --bits B for a comparison at equal bits")
    entries = {m: e for m, e in (best.get("methods") or {}).items() if e}
    for method, entry in entries.items():
        if not isinstance(entry, dict) or "tuned" not in entry:
            raise GeovqError(f"{path}: methods.{method} must be a mapping with a `tuned:` configuration")
    found = {m: e["tuned"] for m, e in entries.items()}
    if not found:
        raise GeovqError(f"--tuned {tune_dir}: no method has a finished trial")
    chosen = methods or list(found)
    for m in chosen:
        if m not in found:
            raise GeovqError(f"--methods {m}: {tune_dir} has no tuned configuration for it; tuned: {', '.join(found)}")
    if best.get("complete") is False:
        counts = ", ".join(f"{m} {e.get('finished', 0)} of {best.get('trials_per_method')} trials finished"
                           for m, e in entries.items())
        typer.echo(f"geovq: warning: --tuned {tune_dir} is an interrupted search ({counts}); its best "
                   "configurations may change when its `geovq tune` command is re-run to finish it", err=True)
    return chosen, {m: found[m] for m in chosen}


def main() -> None:
    """The console script: the app, its exit handlers (Ray's shutdown, logging's flush), then the exit, without
    the interpreter's teardown of every module. After a sweep that teardown (torch, Ray Tune) took 3 s of a
    2-core machine, and `geovq report` 1-2 s; everything geovq writes is already whole on disk (geovq.io)."""
    import atexit
    import os

    try:
        app()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # sys.exit(None) is success; sys.exit("message") prints it and fails
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()  # what the interpreter's exit runs first; os._exit runs nothing (CPython's own hook)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
