"""Stages: a prior over a unit's codes, and samples from it (DESIGN.md §3.8, §4).

    codes_{train,val} ─ prior_stage ─> prior-{kind}/prior.pt, prior.json (test bits/token, bits/image, and the
                                       coded bits/image of the test images' files)
    prior.pt ─ sample_stage ─> samples-…/samples.png, samples.npz, samples.json (sample metrics)
    dataset ─ domain_classifier_stage ─> domain/classifier.pt, classifier.json (its test accuracy)

The prior trains on the training codes and stops early on the validation codes; the test codes are scored
once. Samples are decoded through the unit's own codebook and decoder: a post-hoc unit's quantizer and its
VAE's decoder (the fine-tuned decoder where decoder_finetuned.pt exists), a VQ-VAE's own codebook and
decoder. Sample metrics compare sets of images through features and never pair a sample with an image.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geovq.config import SweepConfig
from geovq.data import ImageSplits
from geovq.errors import GeovqError
from geovq.io import atomic_path, save_npz, write_json
from geovq.metrics.generation import feature_frechet_distance, inception_metrics, precision_recall
from geovq.models.classifier import DomainClassifier
from geovq.models.priors.base import CodeGrid, Prior
from geovq.models.priors.settings import PriorConfig, prior_config
from geovq.models.priors.unigram import UnigramPrior
from geovq.stages.common import Progress, decode_grids, load_splits
from geovq.stages.rundir import SPLITS, RunDir
from geovq.stages.units import Unit
from geovq.training.checkpoint import load_checkpoint, load_model, save_checkpoint
from geovq.training.classifier import classifier_features, train_classifier
from geovq.training.loop import to_device
from geovq.training.prior import nll_summary, token_nll, train_prior

#: domain-classifier training steps per dataset (digits is small: fewer steps reach ~97% test accuracy)
CLASSIFIER_STEPS = {"digits": 400}
DEFAULT_CLASSIFIER_STEPS = 1500


def unit_grid(cfg: SweepConfig, unit: Unit) -> CodeGrid:
    return CodeGrid.from_layout(cfg.layout.with_token_dim(unit.token_dim, unit.grouping), unit.n_codes)


def _known_labels(data: ImageSplits) -> bool:
    return all((getattr(data, f"{s}_labels") >= 0).all() for s in SPLITS)


def _n_classes(data: ImageSplits) -> int:
    return int(max(getattr(data, f"{s}_labels").max() for s in SPLITS)) + 1


def load_unit_codes(run: RunDir, unit: Unit, data: ImageSplits) -> dict[str, np.ndarray]:
    """The unit's saved codes of every split, checked against the dataset's splits (one row per image)."""
    missing = [s for s in SPLITS if not run.codes(unit, s).exists()]
    if missing:
        raise GeovqError(f"unit {unit.key} has no saved {', '.join(missing)} codes in {run.root}: run the unit "
                         "(fit and encode) first")
    codes = {s: np.load(run.codes(unit, s)) for s in SPLITS}
    for s in SPLITS:
        if len(codes[s]) != len(getattr(data, s)):
            raise GeovqError(f"unit {unit.key}: {len(codes[s])} {s} codes but {len(getattr(data, s))} {s} images "
                             "(a different dataset or --quick cap than the run's)")
    return codes


def prior_stage(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device, progress: Progress,
                kind: str = "transformer", conditional: bool = False, data: ImageSplits | None = None,
                config: PriorConfig | None = None) -> dict[str, Any]:
    """Train (or resume, or load) the unit's prior of `kind` and score it on the test codes; writes and
    returns prior.json: test bits/token and bits/image under the prior (beside the fixed-length bits and the
    unigram baseline's), the coded rate of real files (`coded_rate`; unconditional priors), the validation curve,
    sizes and seconds. `config`: the default for the dataset."""
    out = run.prior(unit, kind, conditional)
    done = out / "prior.json"
    if done.exists():
        result = json.loads(done.read_text())
        if conditional or "coded_bits_per_image" in result:
            return result
        # scored by a geovq that did not code files yet: add their rate
        test_codes = np.load(run.codes(unit, "test"))
        result.update(coded_rate(unit, kind, load_model(out / "prior.pt", "prior", torch.device("cpu")), test_codes))
        write_json(done, result)
        return result
    data = data or load_splits(cfg)
    codes = load_unit_codes(run, unit, data)
    if conditional and not _known_labels(data):
        raise GeovqError(f"a class-conditional prior needs labels, and {cfg.dataset} has images without one")
    labels = {s: getattr(data, f"{s}_labels") if conditional else None for s in SPLITS}
    grid = unit_grid(cfg, unit)
    config = config or prior_config(cfg.dataset, kind, conditional, unit.seed)
    if config.kind != kind or config.conditional != conditional:
        raise GeovqError(f"prior config {config.kind} (conditional={config.conditional}) does not match the "
                         f"requested {kind} (conditional={conditional})")
    if (out / "prior.pt").exists():  # trained, not yet scored: what it was trained with is in its checkpoint
        model = load_model(out / "prior.pt", "prior", device)
        extra = load_checkpoint(out / "prior.pt", "prior")["extra"]
        record, trained_with = extra["record"], extra["train"]
    else:
        model, record = train_prior(config, grid, _n_classes(data) if conditional else 0, codes["train"],
                                    labels["train"], codes["val"], labels["val"], out, progress, device)
        trained_with = config.as_dict()
    t0 = time.time()
    test = nll_summary(token_nll(model, codes["test"], labels["test"], device))
    unigram = UnigramPrior(grid, codes["train"]).to(device)
    unigram_test = nll_summary(token_nll(unigram, codes["test"], None, device))
    result = {"prior": kind, "prior_conditional": conditional,
              "prior_bits_per_token": test["bits_per_token"], "prior_bits_per_image": test["bits_per_image"],
              "fixed_bits_per_image": grid.tokens * math.log2(grid.n_codes),
              "unigram_bits_per_image": unigram_test["bits_per_image"],
              "prior_val_bits_per_token": record["best_val_bits_per_token"],
              "prior_val_curve": record["val_curve"], "prior_best_step": record["best_step"],
              "prior_steps": record["steps"], "prior_early_stopped": record["early_stopped"],
              "prior_parameters": record["parameters"], "prior_train_seconds": record["seconds"],
              "prior_train_cpu_seconds": record["cpu_seconds"],
              "prior_score_seconds": time.time() - t0, "prior_config": trained_with,
              "prior_train_codes": len(codes["train"]), "prior_test_codes": len(codes["test"])}
    if not conditional:  # the codec codes without labels: a class-conditional prior has no file rate
        result.update(coded_rate(unit, kind, model.cpu(), codes["test"]))
    write_json(done, result)  # written last: its presence marks the prior finished
    return result


#: test images whose files are decoded back in every sweep: one block of the codec's (the full round trip is
#: bench/codec.py's)
CODED_ROUND_TRIP_IMAGES = 16


def coded_rate(unit: Unit, kind: str, prior: Prior, test_codes: np.ndarray) -> dict[str, Any]:
    """The rate in bytes: every test image's codes compressed to a file by the codec (`geovq compress`'s format,
    header included) under the unconditional `prior` (on the CPU, as the codec runs it), 8 × the mean file size;
    the first CODED_ROUND_TRIP_IMAGES files decoded back by the codec's decoder and checked."""
    from geovq.codec import HEADER_BYTES, CodeCoder, unit_tag

    t0 = time.time()
    coder = CodeCoder(unit.n_codes, test_codes.shape[1], unit_tag(unit.key), prior, kind)
    files = coder.encode(test_codes)
    checked = min(CODED_ROUND_TRIP_IMAGES, len(files))
    if not np.array_equal(coder.decode(files[:checked]), test_codes[:checked]):
        raise GeovqError(f"unit {unit.key}: the codec's files do not decode to their codes")
    return {"coded_bits_per_image": 8 * float(np.mean([len(f) for f in files])), "coded_header_bytes": HEADER_BYTES,
            "coded_round_trip_images": checked, "coded_seconds": time.time() - t0}


def decoder_kind(unit: Unit, finetuned: bool) -> str:
    """Which decoder turns a unit's codes into images, as samples.json records it: "end_to_end" (the model's own),
    "vae" (the Gaussian VAE's) or "finetuned" (the VAE's, fine-tuned on the codebook)."""
    return "end_to_end" if unit.end_to_end else "finetuned" if finetuned else "vae"


def code_decoder(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device,
                 fitted: tuple[torch.nn.Module, Any] | None = None
                 ) -> tuple[Callable[[np.ndarray], torch.Tensor], str]:
    """(codes (N, T) -> images (N, ch, H, W) in [0, 1] on `device`, which decoder): the unit's own codebook
    and decoder; a post-hoc unit's fine-tuned decoder where it exists. `fitted`: the unit's models
    (`stages.fit.load_fitted`) where the caller has loaded them already."""
    from geovq.stages.fit import load_fitted

    model, quantizer = fitted or load_fitted(run, unit, device)
    if unit.end_to_end:
        from geovq.stages.end_to_end import end_to_end_reconstruct

        return end_to_end_reconstruct(model, device), decoder_kind(unit, finetuned=False)
    tuned = run.unit(unit) / "decoder_finetuned.pt"
    decoder, which = ((load_model(tuned, "decoder", device), decoder_kind(unit, finetuned=True)) if tuned.exists()
                      else (model.decoder, decoder_kind(unit, finetuned=False)))

    def decode(codes: np.ndarray) -> torch.Tensor:
        return decode_grids(decoder, quantizer.layout_.tokens_to_grid(quantizer.decode(codes)), device)

    return decode, which


def domain_classifier_stage(run: RunDir, cfg: SweepConfig, data: ImageSplits, device: torch.device,
                            progress: Progress) -> tuple[DomainClassifier, dict[str, Any]]:
    """The run's domain classifier, trained once on the dataset's training split (or loaded), and its record
    (test accuracy, seconds)."""
    import fcntl

    path, record_path = run.domain / "classifier.pt", run.domain / "classifier.json"
    run.domain.mkdir(parents=True, exist_ok=True)
    # one classifier per run: concurrent units (trials on any node of shared storage) wait for the first
    with open(run.domain / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and record_path.exists():
            return load_model(path, "classifier", device), json.loads(record_path.read_text())
        if not _known_labels(data):
            raise GeovqError(f"{cfg.dataset} has images without labels: no domain classifier can be trained")
        steps = CLASSIFIER_STEPS.get(cfg.dataset, DEFAULT_CLASSIFIER_STEPS)
        model, record = train_classifier(data, device, progress, steps=steps, seed=cfg.split_seed)
        save_checkpoint(path, "classifier", model, model.config(), record)
        write_json(record_path, record)
        return model, record


def sample_metrics(run: RunDir, cfg: SweepConfig, data: ImageSplits, samples: torch.Tensor, device: torch.device,
                   progress: Progress, seed: int = 0) -> dict[str, Any]:
    """Domain FID, precision and recall of `samples` (N, ch, H, W) in [0, 1] against the test images in the
    domain classifier's feature space (with its test accuracy), and Inception FID/KID or nulls with the reason.
    `domain_fid_val_test` (the validation images against the test images) is the floor a perfect sampler
    would reach at these set sizes."""
    test = to_device(data.test, device)
    out: dict[str, Any] = {"n_samples": len(samples), "n_real": len(test), **inception_metrics(test, samples, device)}
    if not _known_labels(data):
        return {**out, "domain_fid": None, "precision": None, "recall": None,
                "domain_reason": f"{cfg.dataset} has images without labels: no domain classifier"}
    classifier, record = domain_classifier_stage(run, cfg, data, device, progress)
    f_real = classifier_features(classifier, test, device)
    f_fake = classifier_features(classifier, samples, device)
    f_val = classifier_features(classifier, data.val, device)
    return {**out, "domain_fid": feature_frechet_distance(f_fake, f_real), **precision_recall(f_real, f_fake, seed=seed),
            "domain_fid_val_test": feature_frechet_distance(f_val, f_real),
            "classifier_test_accuracy": record["test_accuracy"], "classifier_features": classifier.n_features}


def draw_labels(data: ImageSplits, n: int, generator: torch.Generator) -> torch.Tensor:
    """n class labels drawn from the training split's class frequencies (on the generator's device)."""
    freq = torch.bincount(torch.as_tensor(data.train_labels), minlength=_n_classes(data)).double()
    return torch.multinomial(freq.to(generator.device), n, replacement=True, generator=generator)


def sample_stage(run: RunDir, cfg: SweepConfig, unit: Unit, device: torch.device, progress: Progress,
                 n: int = 10_000, kind: str = "transformer", conditional: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, out: Path | None = None,
                 data: ImageSplits | None = None, metrics: bool = True, prior: Prior | None = None) -> dict[str, Any]:
    """Draw n codes from the unit's trained prior (seeded; class labels from the training frequencies when
    conditional), decode them, and write samples.png (the first 100), samples.npz (codes, labels, images as
    uint8) and samples.json (settings, seconds and, with `metrics`, the sample metrics) into `out` (default:
    a samples-… folder of the prior's directory). `prior` replaces the saved one: a UnigramPrior's samples go
    to prior-unigram/."""
    from torchvision.utils import save_image

    path = run.prior(unit, kind, conditional) / "prior.pt"
    if prior is None and not path.exists():
        raise GeovqError(f"unit {unit.key} has no trained {kind} prior in {run.root}: run the prior stage first")
    prior = prior.to(device) if prior is not None else load_model(path, "prior", device)
    data = data or load_splits(cfg)
    settings = {"prior": kind if not isinstance(prior, UnigramPrior) else "unigram", "prior_conditional": conditional,
                "n": n, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    out = out or run.prior(unit, settings["prior"], conditional) / (
        f"samples-n{n}-t{temperature:g}-k{top_k or 0}-p{top_p or 1:g}-seed{seed}")
    generator = torch.Generator(device).manual_seed(seed)
    labels = draw_labels(data, n, generator) if conditional else None
    t0 = time.time()
    codes = prior.sample(n, labels, temperature, top_k, top_p, generator)
    sample_seconds = time.time() - t0
    decode, decoder = code_decoder(run, cfg, unit, device)
    images = decode(codes.cpu().numpy())
    result = {**settings, "decoder": decoder, "sample_seconds": sample_seconds,
              "decode_seconds": time.time() - t0 - sample_seconds}
    with atomic_path(out / "samples.png") as tmp:
        save_image(images[:100].cpu(), tmp, nrow=10, pad_value=0.5, format="png")
    save_npz(out / "samples.npz", codes=codes.cpu().numpy(),
             labels=np.full(n, -1) if labels is None else labels.cpu().numpy(),
             images=(images * 255).round().to(torch.uint8).cpu().numpy())
    if metrics:
        result.update(sample_metrics(run, cfg, data, images, device, progress, seed))
    write_json(out / "samples.json", result)
    # where they lie, for reports (relative to the run, so a copied run still finds them)
    return {**result, "samples_path": str(out.relative_to(run.root)) if out.is_relative_to(run.root) else str(out)}
