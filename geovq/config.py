"""The typed, validated configuration of a sweep, with per-dataset defaults.

`SweepConfig` is resolved once (dataset defaults, then `--quick`, then the user's options), validated
with clear errors, written to `<run>/config.yaml`, and read back by every stage and on resume: a stage
never sees the command line.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import yaml

from geovq.errors import GeovqError
from geovq.latents import GROUPINGS, TokenLayout
from geovq.models.trunk import TrunkConfig
from geovq.training.loop import TrainConfig

# Per-dataset defaults. The grid is image_size / 4 (two stride-2 stages): digits 16×16 -> 4×4,
# MNIST/Fashion 28×28 -> 7×7, CIFAR-10 32×32 -> 8×8. One token per cell (d = C) unless --token-dim.
#: τ of DESIGN.md §3.6: a token is 'in band' when |KL − log2 K| <= τ bits (training and diagnostics).
TDC_TOLERANCE_BITS = 0.5

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
# `--quick`: a few-minute smoke configuration on 2 CPU cores.
QUICK = {"train": {"epochs": 20}, "codebook_sizes": [16, 64], "seeds": 1, "max_train_images": 2000,
         "geodesic_landmarks": 5000}


@dataclass
class VQTrainConfig:
    decay: float = 0.99
    commitment: float = 0.25
    dead_code_threshold: float = 1.0


@dataclass
class SweepConfig:
    dataset: str
    methods: list[str]
    codebook_sizes: list[int]
    seeds: int = 3
    data_root: str | None = None
    download: bool = False
    split_seed: int = 0  # fixes the train/val/test split; independent of the run seeds
    token_dim: int | None = None  # d; None = C (one token per cell)
    grouping: str = "contiguous"
    max_train_images: int | None = None  # cap on training images (quick runs)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    vaes: list[str] = field(default_factory=lambda: ["plain"])  # Gaussian VAE variants: plain, tdc
    tdc_bits: float | None = None  # TDC target; None = log2 K for each K
    gq_beta: float = 1.0  # Gaussian Quant selection rule: 1 = importance weights, 0 = σ-weighted nearest
    geodesic_landmarks: int | None = None  # graph nodes of the geodesic quantizer; None = its own default
    finetune_decoder: bool = False
    finetune_epochs: int = 10
    finetune_max_images: int = 10_000  # training images the decoder fine-tune sees (a fixed random subset)
    cpus_per_trial: int = 1
    quick: bool = False

    @property
    def tokens_per_image(self) -> int:
        h, w = self.trunk.grid
        return h * w * (self.trunk.latent_channels // self.d)

    @property
    def d(self) -> int:
        return self.token_dim or self.trunk.latent_channels

    @property
    def layout(self) -> TokenLayout:
        h, w = self.trunk.grid
        return TokenLayout(h, w, self.trunk.latent_channels, self.d, self.grouping)

    @property
    def method_options(self) -> dict[str, dict[str, Any]]:
        """Constructor options of post-hoc quantizers that the sweep sets."""
        options: dict[str, dict[str, Any]] = {"gq": {"beta": self.gq_beta}}
        if self.geodesic_landmarks is not None:
            options["geodesic"] = {"max_landmarks": self.geodesic_landmarks}
        return options

    def bits_per_image(self, n_codes: int) -> float:
        return self.tokens_per_image * math.log2(n_codes)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trunk"] = self.trunk.as_dict()
        return out

    def identity(self) -> dict[str, Any]:
        """What must match for a run directory to be resumed or extended: everything that shapes a model
        or a split. Methods, VAE variants, codebook sizes and seed count may grow (new units join the run),
        and --finetune-decoder may be switched on (finished units gain their fine-tuned rows). Threads per
        trial are a matter of the machine, not of the run."""
        out = self.as_dict()
        for key in ("methods", "codebook_sizes", "seeds", "vaes", "finetune_decoder", "cpus_per_trial"):
            out.pop(key)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SweepConfig:
        raw = dict(raw)
        try:
            raw["trunk"] = TrunkConfig(**raw.get("trunk", {}))
            raw["train"] = TrainConfig(**raw.get("train", {}))
            raw["vq"] = VQTrainConfig(**raw.get("vq", {}))
            return cls(**raw)
        except TypeError as e:
            raise GeovqError(f"bad config: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepConfig:
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))


def resolve_config(dataset: str, image_shape: tuple[int, int, int], methods: list[str],
                   codebook_sizes: list[int] | None, seeds: int | None, epochs: int | None, quick: bool,
                   **options: Any) -> SweepConfig:
    """Dataset defaults, then --quick, then the user's explicit options (None = not given)."""
    preset = DATASET_DEFAULTS[dataset]
    c, h, w = image_shape
    trunk = TrunkConfig(in_channels=c, image_size=(h, w), **preset["trunk"])
    train = TrainConfig(**preset["train"])
    sizes = list(preset["codebook_sizes"])
    n_seeds = 3  # headline tables: 3 seeds with 95% CIs
    max_train = landmarks = None
    if quick:
        train = replace(train, **QUICK["train"])
        sizes, n_seeds, max_train = list(QUICK["codebook_sizes"]), QUICK["seeds"], QUICK["max_train_images"]
        landmarks = QUICK["geodesic_landmarks"]
    if epochs is not None:
        train = replace(train, epochs=epochs)
    cfg = SweepConfig(dataset=dataset, methods=methods, codebook_sizes=codebook_sizes or sizes,
                      seeds=seeds if seeds is not None else n_seeds, trunk=trunk, train=train,
                      max_train_images=max_train, geodesic_landmarks=landmarks, quick=quick, **options)
    validate(cfg)
    return cfg


def validate(cfg: SweepConfig) -> None:
    """Checks that need no data; the CLI also checks K against the number of training tokens."""
    h, w = cfg.trunk.image_size
    f = 2**cfg.trunk.downsamples
    if h % f or w % f:
        raise GeovqError(f"image size {h}×{w} must be divisible by {f} (2**downsamples)")
    if cfg.seeds < 1:
        raise GeovqError(f"--seeds {cfg.seeds} must be >= 1")
    if cfg.train.epochs < 0:
        raise GeovqError(f"--epochs {cfg.train.epochs} must be >= 0")
    for k in cfg.codebook_sizes:
        if k <= 1:
            raise GeovqError(f"codebook size K={k} must be >= 2")
    c = cfg.trunk.latent_channels
    if c % cfg.d:
        raise GeovqError(f"--token-dim {cfg.d} must divide the latent channels C={c} "
                         f"(valid: {', '.join(str(d) for d in range(1, c + 1) if c % d == 0)})")
    if cfg.grouping not in GROUPINGS:
        raise GeovqError(f"--grouping {cfg.grouping!r} is unknown; valid: {', '.join(GROUPINGS)}")
    for v in cfg.vaes:
        if v not in ("plain", "tdc"):
            raise GeovqError(f"--vae {v!r} is unknown; valid: plain, tdc")
    if not cfg.vaes:
        raise GeovqError("--vae is empty; valid: plain, tdc")
    if "tdc" in cfg.vaes and cfg.tdc_bits is not None:
        for k in cfg.codebook_sizes:
            if not math.isclose(math.log2(k), cfg.tdc_bits):
                raise GeovqError(f"--vae tdc targets {cfg.tdc_bits:g} bits per token, but K={k} codes carry "
                                 f"{math.log2(k):g}; use K={2 ** cfg.tdc_bits:g} or drop --tdc-bits (then "
                                 "each K gets its own TDC VAE with T = log2 K)")
    if "gq" in cfg.methods:
        from geovq.quantize.gq import check_beta, check_power_of_two

        check_beta(cfg.gq_beta)
        for k in cfg.codebook_sizes:
            check_power_of_two(k)
    if cfg.finetune_epochs < 1:
        raise GeovqError(f"--finetune-epochs {cfg.finetune_epochs} must be >= 1")
    if cfg.cpus_per_trial < 1:
        raise GeovqError(f"--cpus-per-trial {cfg.cpus_per_trial} must be >= 1")
