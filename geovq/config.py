"""The typed, validated configuration of a sweep, with per-dataset defaults. Imports no torch.

`SweepConfig` is resolved once (dataset defaults, then `--quick`, then the user's options), validated in
one place (`validate`, whose messages name the command-line option), written to `<run>/config.yaml`, and
handed to every stage as an object: a stage never sees the command line. The model and training configs
live here too (plain dataclasses), so that the driver, Tune and the report can read a run's configuration
without importing torch.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from geovq.data import DATASETS, READS_DATA_ROOT, resolve_data_root
from geovq.errors import GeovqError
from geovq.latents import GROUPINGS, TokenLayout
from geovq.metrics import SSIM_WINDOW

#: the run-directory layout this geovq writes and reads (1: units named by strings, before typed units)
RUN_FORMAT = 2
RECON_LOSSES = ("bce", "mse")
VAE_VARIANTS = ("plain", "tdc")
#: the most units one sweep plans (each is a folder and a Tune trial; --seeds 100000 would plan 200,000)
MAX_UNITS = 10_000
#: methods trained end to end (their classes: geovq.end_to_end); every other method is a post-hoc quantizer
END_TO_END = ("vqvae", "fsq", "lfq", "rvq")
#: the priors a sweep can train over its codes (geovq.models.priors.PRIORS holds their classes)
PRIOR_KINDS = ("transformer", "pixelcnn")


@dataclass
class TrunkConfig:
    """The conv encoder/decoder shared by the Gaussian VAE and the VQ-VAE (geovq.models.trunk)."""

    in_channels: int = 1  # image channels
    image_size: tuple[int, int] = (28, 28)  # (H, W) the nets see
    hidden: int = 64  # conv width
    latent_channels: int = 16  # C of the h×w×C latent grid
    downsamples: int = 2  # stride-2 stages: grid = image_size / 2**downsamples
    res_blocks: int = 2

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        f = 2**self.downsamples
        return self.image_size[0] // f, self.image_size[1] // f

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


@dataclass
class TrainConfig:
    """One model's training: Adam with cosine decay (geovq.training.loop)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    recon: str = "bce"  # reconstruction likelihood: Bernoulli (bce) or Gaussian (mse)
    beta: float = 1.0  # KL weight of the plain Gaussian VAE
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TDCConfig:
    """The Target Divergence Constraint's settings (DESIGN.md §3.6; geovq.training.tdc). T = log2 K is not
    here: it belongs to each TDC VAE (its spec), since one sweep trains one TDC VAE per K."""

    tolerance: float = 0.5  # τ: a token is in band when |KL − T| <= τ bits (training and diagnostics)
    factor: float = 1.01  # f: multiplicative step of λ, λ_max, λ_min after each training step
    initial_lambda: float = 1.0  # λ at the start (λ_min = λ_max = 1)
    lambda_max_limit: float = 1e3  # λ_max is clipped to [1, lambda_max_limit]
    lambda_min_limit: float = 1e-3  # λ_min is clipped to [lambda_min_limit, 1]

    def check(self, target_bits: float) -> None:
        """The TDC's rules for these settings at target T (bits per token): the sweep's validation, a search
        space's ranges and `TDCController` itself apply them."""
        if not target_bits > 0:
            raise GeovqError(f"TDC target T={target_bits} bits must be > 0 (T = log2 K)")
        if not self.tolerance >= 0:
            raise GeovqError(f"TDC tolerance τ={self.tolerance} bits must be >= 0")
        if not self.factor > 1:
            raise GeovqError(f"TDC factor f={self.factor} must be > 1 (1.01 is the default)")
        if not self.initial_lambda > 0:
            raise GeovqError(f"TDC initial λ={self.initial_lambda} must be > 0")
        if not (self.lambda_max_limit >= 1 and 0 < self.lambda_min_limit <= 1):
            raise GeovqError(f"TDC λ limits must satisfy lambda_max_limit >= 1 and 0 < lambda_min_limit <= 1; got "
                             f"{self.lambda_max_limit}, {self.lambda_min_limit}")


@dataclass
class VQConfig:
    """The end-to-end VQ-VAE's codebook training (DESIGN.md §3.1); K, d and grouping belong to each unit."""

    decay: float = 0.99  # EMA decay of the codebook
    commitment: float = 0.25  # β of the commitment term
    dead_code_threshold: float = 1.0  # EMA hits per step below which a code is restarted
    kmeans_init_tokens: int = 20000  # encoder outputs collected for the k-means initialisation


# Per-dataset defaults. The grid is image_size / 4 (two stride-2 stages): digits 16×16 -> 4×4,
# MNIST/Fashion 28×28 -> 7×7, CIFAR-10 32×32 -> 8×8. One token per cell (d = C) unless --token-dim.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"trunk": {"hidden": 32, "latent_channels": 8, "res_blocks": 1},
               "train": {"epochs": 60, "batch_size": 32}, "codebook_sizes": [16, 64, 256]},
    "mnist": {"trunk": {"hidden": 64, "latent_channels": 16}, "train": {"epochs": 8},
              "codebook_sizes": [256]},
    "fashion": {"trunk": {"hidden": 64, "latent_channels": 16}, "train": {"epochs": 8},
                "codebook_sizes": [256]},
    "cifar10": {"trunk": {"hidden": 128, "latent_channels": 32},
                # Gaussian likelihood; β = 0.01 on a per-image sum is a decoder σ of about 0.07.
                "train": {"epochs": 30, "recon": "mse", "beta": 0.01}, "codebook_sizes": [256, 1024]},
    "npz": {"trunk": {"hidden": 64, "latent_channels": 16}, "train": {"epochs": 20}, "codebook_sizes": [256]},
}
# `--quick`: a few-minute smoke configuration on 2 CPU cores. Its 1,000 geodesic landmarks (16+ per code at
# K <= 64) give the same test PSNR as 2,000 on digits (within 0.02 dB on all four units) and a 4 s shorter fit.
QUICK = {"train": {"epochs": 20}, "codebook_sizes": [16, 64], "seeds": 1, "max_train_images": 2000,
         "prior_samples": 2000,
         "method_params": {"geodesic": {"max_landmarks": 1000}, "pullback": {"max_tokens": 5000}}}
# `--tiny`: for geovq's own tests, on top of `--quick`: a small trunk, 2 epochs and 300 training images, so that a
# console-script test runs its sweep in seconds. Its numbers mean nothing.
TINY = {"trunk": {"hidden": 16, "latent_channels": 4, "res_blocks": 1}, "train": {"epochs": 2, "batch_size": 64},
        "max_train_images": 300, "prior_samples": 200}

#: the command-line option behind each configuration key, so that errors name what the user typed
OPTIONS = {"dataset": "DATASET", "methods": "--methods", "codebook_sizes": "--codebook-sizes", "seeds": "--seeds",
           "data_root": "--data-root", "token_dim": "--token-dim", "grouping": "--grouping", "vaes": "--vae",
           "tdc_bits": "--tdc-bits", "train.epochs": "--epochs", "max_train_images": "--quick",
           "finetune_epochs": "--finetune-epochs", "cpus_per_trial": "--cpus-per-trial",
           "max_concurrent_trials": "--max-concurrent",
           "gpus_per_trial": "--gpus-per-trial", "max_failures": "--max-failures", "prior": "--prior",
           "prior_samples": "--prior-samples", "tuned": "--tuned"}
#: one tuned configuration: the rate (K codes of token_dim channels), the VAE variant (None: end to end) with its
#: dotted training overrides ("train.lr", "tdc.factor"), and the method's hyperparameters (a quantizer's keyword
#: arguments; for the VQ-VAE its "train.*"/"vq.*" overrides)
TUNED_FIELDS = ("n_codes", "token_dim", "vae", "vae_overrides", "params")
#: the training settings a dotted override may set, by section ("train.lr" -> TrainConfig.lr)
OVERRIDE_SECTIONS = {"train": TrainConfig, "tdc": TDCConfig, "vq": VQConfig}


def check_prior_kind(kind: str) -> str:
    if kind not in PRIOR_KINDS:
        raise GeovqError(f"prior {kind!r} is unknown; valid: {', '.join(PRIOR_KINDS)}")
    return kind


def option_name(key: str) -> str:
    """'--epochs' for 'train.epochs', '--gq-beta' for 'method_params.gq.beta', else the key itself."""
    if key.startswith("method_params."):
        _, method, param = key.split(".", 2)
        return f"--{method}-{param}".replace("_", "-")
    if key.startswith("tuned."):
        return f"--tuned ({key[len('tuned.'):]})"
    return OPTIONS.get(key, key)


@dataclass
class SweepConfig:
    dataset: str
    methods: list[str]
    codebook_sizes: list[int]
    seeds: int = 3
    data_root: str | None = None  # only for datasets read from disk (workers need it); never for digits
    download: bool = False
    split_seed: int = 0  # fixes the train/val/test split; independent of the run seeds
    token_dim: int | None = None  # d; None = C (one token per cell)
    grouping: str = "contiguous"
    max_train_images: int | None = None  # cap on training images (quick runs)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tdc: TDCConfig = field(default_factory=TDCConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    vaes: list[str] = field(default_factory=lambda: ["plain"])  # Gaussian VAE variants (the CLI runs plain,tdc)
    tdc_bits: float | None = None  # TDC target; None = log2 K for each K
    #: hyperparameters of post-hoc methods, {method: {name: value}}: their constructors' keyword arguments
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    prior: str | None = "transformer"  # the prior trained over every unit's codes (None: --no-prior)
    prior_samples: int = 10_000  # samples drawn from each prior for the sample metrics
    finetune_decoder: bool = False
    finetune_epochs: int = 10
    finetune_max_images: int = 10_000  # training images the decoder fine-tune sees (a fixed random subset)
    cpus_per_trial: int = 1
    #: trials at once; None: as many as the cluster's CPUs hold at cpus_per_trial each. A trial's worker process
    #: imports torch and Ray Tune once (~7 CPU-s on 2 cores), so short trials run fastest one at a time
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # retries of a crashed trial (killed worker, lost node); geovq errors are not retried
    gpus_per_trial: float | None = None  # None: auto (1 where the cluster has GPUs, else 0); fractions share one
    quick: bool = False
    #: `geovq sweep --tuned`: {method: its best validation configuration} from `geovq tune` (see TUNED_FIELDS);
    #: each method then runs at its own (K, d) on its own VAE instead of the codebook_sizes × vaes grid
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_format: int = RUN_FORMAT

    @property
    def d(self) -> int:
        return self.token_dim or self.trunk.latent_channels

    @property
    def layout(self) -> TokenLayout:
        h, w = self.trunk.grid
        return TokenLayout(h, w, self.trunk.latent_channels, self.d, self.grouping)

    @property
    def tokens_per_image(self) -> int:
        return self.layout.tokens_per_image

    @property
    def planned_units(self) -> int:
        """How many units `stages.units.plan_units` plans, by arithmetic (checked before any is planned): seeds ×
        K × methods (× VAE variants for post-hoc methods); with --tuned, seeds × methods."""
        if self.tuned:
            return self.seeds * len(self.methods)
        per_k = sum(1 if method in END_TO_END else len(self.vaes) for method in self.methods)
        return self.seeds * len(self.codebook_sizes) * per_k

    def settings(self, overrides: typing.Iterable[tuple[str, Any]], seed: int
                 ) -> tuple[TrainConfig, TDCConfig, VQConfig]:
        """The sweep's training, TDC and VQ settings with a unit's dotted overrides ("train.lr", "tdc.factor",
        "vq.commitment"; each checked by `check_override`) applied, and the unit's seed."""
        sections: dict[str, Any] = {"train": replace(self.train, seed=seed), "tdc": self.tdc, "vq": self.vq}
        for key, value in overrides:
            check_override(key)
            section, _, name = key.partition(".")
            sections[section] = replace(sections[section], **{name: value})
        return sections["train"], sections["tdc"], sections["vq"]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trunk"] = self.trunk.as_dict()
        return out

    def identity(self) -> dict[str, Any]:
        """What must match for a run directory to be resumed or extended: everything that shapes a model
        or a split. Methods, VAE variants, codebook sizes and seed count may grow (new units join the run),
        and --finetune-decoder and priors may be switched on (finished units gain their fine-tuned rows, their
        priors and samples). Threads and GPUs per trial, and trials at once, are a matter of the machine, not of
        the run."""
        out = self.as_dict()
        for key in ("methods", "codebook_sizes", "seeds", "vaes", "finetune_decoder", "cpus_per_trial",
                    "max_concurrent_trials", "gpus_per_trial", "max_failures", "prior"):
            out.pop(key)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SweepConfig:
        raw = dict(raw)
        try:
            for key, kind in (("trunk", TrunkConfig), ("train", TrainConfig), ("tdc", TDCConfig), ("vq", VQConfig)):
                raw[key] = kind(**raw.get(key, {}))
            return cls(**raw)
        except TypeError as e:
            raise GeovqError(f"bad config: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepConfig:
        from geovq.io import read_yaml

        raw = read_yaml(path, "a readable geovq run configuration")
        if not isinstance(raw, dict):
            raise GeovqError(f"{path} is not a geovq run configuration")
        if raw.get("run_format") != RUN_FORMAT:
            raise GeovqError(f"{os.path.dirname(path) or '.'} was written by an older geovq (run layout "
                             f"{raw.get('run_format', 1)}; this geovq reads layout {RUN_FORMAT}): start a new --out")
        try:
            return cls.from_dict(raw)
        except GeovqError as e:
            raise GeovqError(f"{path}: {e}") from None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_options(old: SweepConfig, new: SweepConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The options (or keys) whose values differ between two runs' identities, e.g. ['--epochs 20 -> 3'];
    keys in `ignore` do not count. A method's own settings count only where both runs hold that method: the
    settings of a method one run does not run shape none of its units (and the command line refuses them
    without the method, so a subset re-run could not repeat them)."""
    shared = set(old.methods) & set(new.methods)

    def flat(cfg: SweepConfig) -> dict[str, Any]:
        identity = cfg.identity()
        identity["method_params"] = {m: p for m, p in identity["method_params"].items() if m in shared}
        return _flatten(identity)

    before, after = flat(old), flat(new)
    return [f"{option_name(k)} {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and k not in ignore]


def union_config(previous: SweepConfig, current: SweepConfig) -> SweepConfig:
    """What a run directory holds after `current` ran in it: every method, K and VAE variant either run asked
    for, the larger seed count, and fine-tuning if either asked for it (the rest is the same: `identity`)."""
    def union(a: list, b: list) -> list:
        return a + [v for v in b if v not in a]

    # the earlier methods keep their own settings: a re-run of other methods does not reset them to defaults
    kept = {m: p for m, p in previous.method_params.items() if m in previous.methods and m not in current.methods}
    return replace(current, methods=union(previous.methods, current.methods),
                   codebook_sizes=sorted(union(previous.codebook_sizes, current.codebook_sizes)),
                   vaes=union(previous.vaes, current.vaes), seeds=max(previous.seeds, current.seeds),
                   finetune_decoder=previous.finetune_decoder or current.finetune_decoder,
                   method_params={**current.method_params, **kept})


def resolve_config(dataset: str, image_shape: tuple[int, int, int], methods: list[str],
                   codebook_sizes: list[int] | None, seeds: int | None, epochs: int | None, quick: bool,
                   method_params: dict[str, dict[str, Any]] | None = None, tiny: bool = False,
                   train_images: int | None = None, **options: Any) -> SweepConfig:
    """Dataset defaults, then --quick (and --tiny, which implies it), then the user's explicit options (None = not
    given); validated, with K checked against the training tokens when `train_images` (the size of the
    dataset's training split) is given. A `data_root` is recorded only for a dataset read from disk."""
    preset = DATASET_DEFAULTS[dataset]
    quick = quick or tiny
    c, h, w = image_shape
    trunk = TrunkConfig(in_channels=c, image_size=(h, w), **preset["trunk"])
    train = TrainConfig(**preset["train"])
    sizes = list(preset["codebook_sizes"])
    n_seeds = 3  # headline tables: 3 seeds with 95% CIs
    max_train = None
    params: dict[str, dict[str, Any]] = {}
    if quick:
        train = replace(train, **QUICK["train"])
        sizes, n_seeds, max_train = list(QUICK["codebook_sizes"]), QUICK["seeds"], QUICK["max_train_images"]
        params = {m: dict(p) for m, p in QUICK["method_params"].items()}
    if tiny:
        trunk, train = replace(trunk, **TINY["trunk"]), replace(train, **TINY["train"])
        max_train = TINY["max_train_images"]
    if epochs is not None:
        train = replace(train, epochs=epochs)
    if options.get("prior_samples") is None:  # quick runs sample fewer (their test split is small too)
        options["prior_samples"] = (TINY["prior_samples"] if tiny else QUICK["prior_samples"] if quick
                                    else SweepConfig.prior_samples)
    if options.get("data_root") is not None:  # workers need it to read the data; an embedded dataset reads none
        options["data_root"] = str(options["data_root"]) if dataset in READS_DATA_ROOT else None
    for method, given in (method_params or {}).items():
        params.setdefault(method, {}).update(given)
    cfg = SweepConfig(dataset=dataset, methods=methods, codebook_sizes=codebook_sizes or sizes,
                      seeds=seeds if seeds is not None else n_seeds, trunk=trunk, train=train,
                      max_train_images=max_train, method_params=params, quick=quick, **options)
    validate(cfg, train_images)
    return cfg


def replay_config(base: SweepConfig, given: dict[str, Any], train_images: int | None = None) -> SweepConfig:
    """`geovq sweep --config FILE`: the configuration a config.yaml records (`base`, e.g. another run's), with
    the options given on the command line on top (`given`: resolve_config's arguments that were typed); the
    GPUs per trial are the machine's, resolved again. Validated as resolve_config validates."""
    given = dict(given)
    train = replace(base.train, epochs=given.pop("epochs")) if given.get("epochs") is not None else base.train
    params = {m: dict(p) for m, p in base.method_params.items()}
    for method, named in (given.pop("method_params", None) or {}).items():
        params.setdefault(method, {}).update(named)
    if given.get("data_root") is not None:
        given["data_root"] = str(given["data_root"]) if base.dataset in READS_DATA_ROOT else None
    unknown = sorted(set(given) - {f.name for f in fields(SweepConfig)})
    if unknown:
        raise GeovqError(f"--config takes no {unknown[0]!r} on top of its file")
    cfg = replace(base, train=train, method_params=params, gpus_per_trial=None, **given)
    validate(cfg, train_images)
    return cfg


#: trunk settings that --set may change, with their least values (the image size and channels come from the data)
TRUNK_SETTINGS = {"hidden": 1, "latent_channels": 1, "downsamples": 0, "res_blocks": 0}


def apply_settings(cfg: SweepConfig, assignments: list[str], train_images: int | None = None) -> SweepConfig:
    """`--set KEY=VALUE`, repeatable: a training or model setting by its dotted name (train.lr, trunk.hidden,
    tdc.factor, vq.commitment). VALUE is read as a YAML scalar, as in a space file, typed by its field and held to
    the rules search spaces use (`typed_setting`, `check_setting`); returns the validated configuration, which
    records them (config.yaml) and so makes them part of the run's identity."""
    sections: dict[str, Any] = {"train": cfg.train, "tdc": cfg.tdc, "vq": cfg.vq, "trunk": cfg.trunk}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not text.strip():
            raise GeovqError(f"--set {assignment!r} must be KEY=VALUE, e.g. --set train.lr=1e-3")
        section, _, name = key.partition(".")
        if section == "trunk":
            if name not in TRUNK_SETTINGS:
                raise GeovqError(f"--set {key}: unknown trunk setting; valid: "
                                 + ", ".join(f"trunk.{n}" for n in TRUNK_SETTINGS) + " (the image size comes from the data)")
            kind: type = int
        else:
            try:
                kind = check_override(key)
            except GeovqError as e:
                raise GeovqError(f"--set {key}: {e}; or trunk.{', trunk.'.join(TRUNK_SETTINGS)}") from None
        try:
            raw = yaml.safe_load(text.strip())
        except yaml.YAMLError:
            raw = text.strip()
        try:
            value = typed_setting(kind, raw)
        except GeovqError as e:
            raise GeovqError(f"--set {key}={e}") from None
        if section == "trunk" and value < TRUNK_SETTINGS[name]:
            raise GeovqError(f"--set {key}={value} must be >= {TRUNK_SETTINGS[name]}")
        try:
            check_setting(key, value)
        except GeovqError as e:
            raise GeovqError(f"--set {key}: {e}") from None
        sections[section] = replace(sections[section], **{name: value})
    out = replace(cfg, **sections)
    validate(out, train_images)
    return out


def typed_setting(kind: type, value: Any) -> Any:
    """A setting's value as its field's type, one rule for space files and --set: ints are floats where a float
    is wanted, and "5e-4" (which YAML reads as a string) is the float 0.0005; a float must be finite (.inf or
    .nan: no sampler can draw from such a range, no training runs with it); anything else of the wrong type is
    refused: GeovqError("VALUE must be TYPE")."""
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise GeovqError(f"{value!r} must be a finite number")
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise GeovqError(f"{value!r} must be {kind.__name__}")


def dataset_root(datasets: list[str], data_root: str | os.PathLike | None) -> Path:
    """The data root the datasets read (`geovq.data.resolve_data_root`), their names checked first. A data
    root given for datasets that are all embedded is refused: it would be silently ignored."""
    for name in datasets:
        if name not in DATASETS:
            raise GeovqError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if data_root is not None and not any(name in READS_DATA_ROOT for name in datasets):
        raise GeovqError(f"--data-root {data_root}: {datasets[0]} is embedded and reads no data root; "
                         f"drop --data-root (datasets that read one: {', '.join(READS_DATA_ROOT)})")
    return resolve_data_root(data_root)


def check_training_tokens(cfg: SweepConfig, train_images: int, rates: list[tuple[int, int]], remedy: str) -> None:
    """Each rate (K codes of d channels) must have no more codes than the training split has tokens at d (the
    images a quantizer is fitted on: at most max_train_images); `remedy` says what to change."""
    n = min(train_images, cfg.max_train_images or train_images)
    for k, d in rates:
        tokens = tokens_per_image(cfg, d)
        if k > n * tokens:
            raise GeovqError(f"codebook size K={k} exceeds the {n * tokens} training latents of {cfg.dataset} "
                             f"({n} images × {tokens} tokens); {remedy}")


def validate(cfg: SweepConfig, train_images: int | None = None) -> None:
    """Every rule of a sweep configuration, in one place; messages name the command-line option. With
    `train_images` (the dataset's training split), K is checked against the training tokens too."""
    h, w = cfg.trunk.image_size
    f = 2**cfg.trunk.downsamples
    if h % f or w % f:
        raise GeovqError(f"image size {h}×{w} must be divisible by {f} (2**downsamples)")
    if min(h, w) < SSIM_WINDOW:
        raise GeovqError(f"image size {h}×{w} is below SSIM's {SSIM_WINDOW}×{SSIM_WINDOW} px window, with which every "
                         f"row is scored; give images of at least {SSIM_WINDOW} px a side")
    if cfg.seeds < 1:
        raise GeovqError(f"--seeds {cfg.seeds} must be >= 1")
    if cfg.planned_units > MAX_UNITS:
        raise GeovqError(f"--seeds {cfg.seeds} plans {cfg.planned_units:,} units ({cfg.seeds} seeds × "
                         f"{cfg.planned_units // cfg.seeds} units each); a sweep plans at most {MAX_UNITS:,}: give "
                         "fewer seeds, methods, VAEs or codebook sizes, or split it over several --out")
    if cfg.train.epochs < 0:
        raise GeovqError(f"--epochs {cfg.train.epochs} must be >= 0")
    if cfg.train.recon not in RECON_LOSSES:
        raise GeovqError(f"reconstruction loss {cfg.train.recon!r} is unknown; valid: {', '.join(RECON_LOSSES)}")
    if not cfg.codebook_sizes:
        raise GeovqError("--codebook-sizes is empty; give at least one K, e.g. 16,64")
    for k in cfg.codebook_sizes:
        if k <= 1:
            raise GeovqError(f"--codebook-sizes: K={k} must be >= 2")
    c = cfg.trunk.latent_channels
    if cfg.token_dim is not None and (cfg.token_dim < 1 or c % cfg.token_dim):  # None: d = C, one token per cell
        raise GeovqError(f"--token-dim {cfg.token_dim} must divide the latent channels C={c} "
                         f"(valid: {', '.join(str(d) for d in range(1, c + 1) if c % d == 0)})")
    if cfg.grouping not in GROUPINGS:
        raise GeovqError(f"--grouping {cfg.grouping!r} is unknown; valid: {', '.join(GROUPINGS)}")
    if not cfg.vaes:
        raise GeovqError(f"--vae is empty; valid: {', '.join(VAE_VARIANTS)}")
    for v in cfg.vaes:
        if v not in VAE_VARIANTS:
            raise GeovqError(f"--vae {v!r} is unknown; valid: {', '.join(VAE_VARIANTS)}")
    if "tdc" in cfg.vaes:
        for k in cfg.codebook_sizes:
            if cfg.tdc_bits is not None and not math.isclose(math.log2(k), cfg.tdc_bits):
                raise GeovqError(f"--vae tdc targets {cfg.tdc_bits:g} bits per token, but K={k} codes carry "
                                 f"{math.log2(k):g}; use K={2 ** cfg.tdc_bits:g} or drop --tdc-bits (then "
                                 "each K gets its own TDC VAE with T = log2 K)")
            cfg.tdc.check(cfg.tdc_bits or math.log2(k))
    for method in cfg.methods:
        qcls = method_class(method)
        params = cfg.method_params.get(method, {})
        unknown = sorted(set(params) - set(qcls.hyperparameters()))
        if unknown:
            raise GeovqError(f"{method} has no hyperparameter {unknown[0]!r}; valid: "
                             f"{', '.join(qcls.hyperparameters()) or 'none'}")
        for k in cfg.codebook_sizes:  # the method's own rules (e.g. gq, lfq: K a power of two)
            qcls(n_codes=k, seed=0, **params).validate()
    if cfg.finetune_epochs < 1:
        raise GeovqError(f"--finetune-epochs {cfg.finetune_epochs} must be >= 1")
    if cfg.cpus_per_trial < 1:
        raise GeovqError(f"--cpus-per-trial {cfg.cpus_per_trial} must be >= 1")
    if cfg.max_concurrent_trials is not None and cfg.max_concurrent_trials < 1:
        raise GeovqError(f"--max-concurrent {cfg.max_concurrent_trials} must be >= 1 (or left out: as many trials "
                         "as the cluster's CPUs hold)")
    if cfg.prior is not None:
        check_prior_kind(cfg.prior)
    if cfg.prior_samples < 1:
        raise GeovqError(f"--prior-samples {cfg.prior_samples} must be >= 1")
    if cfg.max_failures < 0:
        raise GeovqError(f"--max-failures {cfg.max_failures} must be >= 0")
    for method, record in cfg.tuned.items():
        validate_tuned(cfg, method, record)
    if cfg.tuned:
        bits = {tokens_per_image(cfg, r["token_dim"]) * math.log2(r["n_codes"]) for r in cfg.tuned.values()}
        if len(bits) > 1:
            raise GeovqError(f"--tuned configurations must share one bit budget per image; got {sorted(bits)}")
    g = cfg.gpus_per_trial
    if g is not None and not (g >= 0 and (g <= 1 or float(g).is_integer())):
        raise GeovqError(f"--gpus-per-trial {g:g} must be auto, a fraction in [0, 1] (trials share a GPU) or a "
                         "whole number")
    if train_images is not None:
        check_training_tokens(cfg, train_images, [(k, cfg.d) for k in cfg.codebook_sizes], "choose a smaller K")


def method_class(method: str) -> type:
    """The class that declares a method's hyperparameters: an end-to-end method's (geovq.end_to_end) or a post-hoc
    quantizer's (geovq.quantize). Both modules are light: no torch here."""
    if method in END_TO_END:
        from geovq.end_to_end import end_to_end_class

        return end_to_end_class(method)
    from geovq.quantize import get_quantizer_class

    return get_quantizer_class(method)


def tokens_per_image(cfg: SweepConfig, token_dim: int) -> int:
    return cfg.layout.with_token_dim(token_dim, cfg.grouping).tokens_per_image


def check_override(key: str) -> type:
    """The type of the setting a dotted override names ("train.lr" -> float); GeovqError for an unknown key."""
    section, _, name = key.partition(".")
    kind = OVERRIDE_SECTIONS.get(section)
    hints = typing.get_type_hints(kind) if kind is not None else {}
    if name not in hints or key == "train.seed":  # the seed belongs to the unit, never to an override
        valid = ", ".join(f"{s}.{n}" for s, k in OVERRIDE_SECTIONS.items() for n in typing.get_type_hints(k)
                          if f"{s}.{n}" != "train.seed")
        raise GeovqError(f"unknown training setting {key!r}; valid: {valid}")
    return hints[name]


#: settings whose valid values are not checked elsewhere before a trial would use them (quantizer parameters
#: are checked by the quantizer): a space file's values and a --tuned record's are held to the same rules
SETTING_RULES: dict[str, tuple[Any, str]] = {
    "train.epochs": (lambda v: v >= 1, ">= 1 (epochs are the ASHA resource)"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.beta": (lambda v: v >= 0, ">= 0"),
    "train.recon": (lambda v: v in RECON_LOSSES, f"one of {', '.join(RECON_LOSSES)}"),
    "vq.decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "vq.commitment": (lambda v: v >= 0, ">= 0"),
    "vq.dead_code_threshold": (lambda v: v >= 0, ">= 0"),
    "vq.kmeans_init_tokens": (lambda v: v >= 1, ">= 1"),
}


def check_setting(key: str, value: Any) -> None:
    """A dotted setting's value against its rule (SETTING_RULES, or the TDC settings' own); GeovqError, one line,
    naming the value and what is valid."""
    if key in SETTING_RULES:
        ok, rule = SETTING_RULES[key]
        if not ok(value):
            raise GeovqError(f"{value!r} must be {rule}")
    elif key.startswith("tdc."):
        replace(TDCConfig(), **{key[len("tdc."):]: value}).check(1.0)


def validate_tuned(cfg: SweepConfig, method: str, record: dict[str, Any]) -> None:
    """One --tuned record: its fields, rate, VAE variant, overrides and hyperparameters."""
    where = f"--tuned {method}"
    if method not in cfg.methods:
        raise GeovqError(f"{where}: {method} is not among --methods ({', '.join(cfg.methods)})")
    if not isinstance(record, dict) or set(record) != set(TUNED_FIELDS):
        raise GeovqError(f"{where} must have exactly the fields {', '.join(TUNED_FIELDS)}; got "
                         f"{', '.join(record) if isinstance(record, dict) else type(record).__name__}")
    k, d = record["n_codes"], record["token_dim"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise GeovqError(f"{where}: n_codes {k!r} must be an integer >= 2")
    c = cfg.trunk.latent_channels
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or c % d:
        raise GeovqError(f"{where}: token_dim {d!r} must divide the latent channels C={c}")
    end_to_end = method in END_TO_END
    if (record["vae"] is None) != end_to_end or (not end_to_end and record["vae"] not in VAE_VARIANTS):
        valid = "null (trained end to end)" if end_to_end else ", ".join(VAE_VARIANTS)
        raise GeovqError(f"{where}: vae {record['vae']!r} is not valid; valid: {valid}")
    if not isinstance(record["vae_overrides"] or {}, dict) or not isinstance(record["params"] or {}, dict):
        raise GeovqError(f"{where}: vae_overrides and params must be mappings of settings to values")
    overrides, hyper = record["vae_overrides"], record["params"] or {}
    if end_to_end:  # its params hold its dotted training settings beside its hyperparameters
        from geovq.end_to_end import split_params

        settings, hyper = split_params(hyper)
        overrides = dict(settings)
    for key, value in (overrides or {}).items():
        kind = check_override(key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, (float, int) if kind is float else kind):
            raise GeovqError(f"{where}: {key} {value!r} must be a {kind.__name__}")
        try:
            check_setting(key, value)
        except GeovqError as e:
            raise GeovqError(f"{where}: {key} {e}") from None
    if end_to_end and record["vae_overrides"]:
        raise GeovqError(f"{where}: vae_overrides must be empty for a method trained end to end")
    qcls = method_class(method)
    unknown = sorted(set(hyper) - set(qcls.hyperparameters()))
    if unknown:
        raise GeovqError(f"{where}: {method} has no hyperparameter {unknown[0]!r}; valid: "
                         f"{', '.join(qcls.hyperparameters()) or 'none'}")
    qcls(n_codes=k, seed=0, **hyper).validate()
