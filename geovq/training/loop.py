"""Training of the Gaussian VAE and the end-to-end models: one plain loop, epoch checkpoints, TensorBoard logging.

The loop knows nothing of Ray. `progress` is any tqdm-compatible factory: plain tqdm on a terminal, or
Ray's tqdm when the Tune edge runs it in a worker. An interrupted training resumes from `state.pt`, the
last finished epoch, written atomically.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from geovq.config import TDCConfig, TrainConfig, TrunkConfig, VQConfig
from geovq.end_to_end import EndToEndMethod
from geovq.errors import GeovqError
from geovq.io import atomic_path
from geovq.latents import TokenLayout
from geovq.models.vae import GaussianVAE
from geovq.models.vqvae import VQVAE, EndToEndAE, QuantizedAE
from geovq.training.checkpoint import save_checkpoint
from geovq.training.tdc import TDCController, token_kl_bits

log = logging.getLogger("geovq")
#: called as on_epoch(epoch, model) after each trained epoch (see train_model)
EpochCallback = Callable[[int, nn.Module], None]


def _batches(images: np.ndarray, batch_size: int, rng: np.random.Generator | None, device: torch.device):
    """Batches on `device`: pinned host memory and a non-blocking copy where the device is a GPU."""
    order = rng.permutation(len(images)) if rng is not None else np.arange(len(images))
    for start in range(0, len(images), batch_size):
        yield to_device(images[order[start:start + batch_size]], device)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A numpy batch as a tensor on `device` (no copy on the CPU; pinned + non-blocking to a GPU)."""
    batch = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


class _NoWriter:
    """Stands in for TensorBoard's SummaryWriter where the tensorboard package is absent (a bare PyTorch
    machine running bench/gpu_check.py): the training then logs nothing, rather than fail for want of a viewer."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without the tensorboard package
    except ImportError:
        log.warning("tensorboard is not installed: %s gets no TensorBoard events", log_dir)
        return _NoWriter()
    return SummaryWriter(str(log_dir))


def _log_images(writer, tag: str, originals: torch.Tensor, recons: torch.Tensor, step: int) -> None:
    if isinstance(writer, _NoWriter):  # nothing to log to (and torchvision may be absent too)
        return
    from torchvision.utils import make_grid

    pairs = torch.cat([originals[:16], recons[:16]]).cpu()
    writer.add_image(tag, make_grid(pairs, nrow=16, pad_value=0.5), step)


def train_model(model: nn.Module, step_loss: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                train_images: np.ndarray, val_images: np.ndarray, cfg: TrainConfig, out_dir: Path,
                progress: Callable[..., Any], desc: str, device: torch.device,
                stateful: dict[str, Any] | None = None, on_epoch: EpochCallback | None = None) -> dict[str, float]:
    """Optimise `model` with Adam (cosine decay) on `step_loss`; log to TensorBoard in out_dir/tb.

    `step_loss` returns scalars (logged; "loss" is minimised), "logits" (for image grids) and optional
    "hist_*" tensors (logged as histograms). `stateful` objects with state_dict()/load_state_dict() (e.g. the
    TDC controller) are saved with every epoch's resume point. `on_epoch(epoch, model)` runs after each epoch
    this call trains (1-based, once its resume point is written; a resumed training skips the epochs it already
    has), e.g. to report a validation metric to a scheduler that may stop the training there. Returns the
    final validation losses.
    Resumes from out_dir/state.pt when present (written device-independent: CPU tensors), logging the epoch
    it resumes from. `model` must already be on `device`.
    """
    stateful = stateful or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    # foreach: one kernel per update op over all parameters. CPU tensors otherwise get a Python loop over
    # parameters (CUDA ones get foreach already): the same numbers, bit for bit, in fewer dispatches.
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    steps_per_epoch = math.ceil(len(train_images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(1, cfg.epochs * steps_per_epoch), 1.0))))
    start_epoch = 0
    state_path = out_dir / "state.pt"
    if state_path.exists():  # resume an interrupted training
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["torch_rng"])  # the VAE's sampling noise continues where it stopped
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        log.info("%s: resuming from epoch %d of %d (%s)", desc, start_epoch, cfg.epochs, state_path)
    writer = _summary_writer(out_dir / "tb")
    rng = np.random.default_rng(cfg.seed)
    for _ in range(start_epoch):  # replay the shuffles so a resumed run sees the same batches
        rng.permutation(len(train_images))
    val_losses: dict[str, float] = {}
    # Only total/desc/update/set_description/close: the subset plain tqdm and Ray's tqdm_ray share.
    bar = progress(total=cfg.epochs * steps_per_epoch, desc=desc)
    bar.update(start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.time()
        for batch in _batches(train_images, cfg.batch_size, rng, device):
            losses = step_loss(batch)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            sched.step()
            bar.update(1)
            step = sched.last_epoch
            if step % 20 == 0:
                for k, v in losses.items():
                    if v.ndim == 0:
                        writer.add_scalar(f"train/{k}", float(v.detach()), step)
                    elif k.startswith("hist_"):
                        writer.add_histogram(f"train/{k[5:]}", v.detach().flatten(), step)
        val_losses = evaluate_losses(model, step_loss, val_images, cfg.batch_size, device)
        for k, v in val_losses.items():
            writer.add_scalar(f"val/{k}", v, epoch + 1)
        writer.add_scalar("time/epoch_seconds", time.time() - t0, epoch + 1)
        with torch.no_grad():
            first = to_device(val_images[:16], device)
            _log_images(writer, "val/originals_top_recons_bottom", first,
                        torch.sigmoid(step_loss(first)["logits"]), epoch + 1)
        with atomic_path(state_path) as tmp:
            torch.save(_to_cpu({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "epoch": epoch + 1,
                                "torch_rng": torch.get_rng_state(),
                                **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                                **{name: obj.state_dict() for name, obj in stateful.items()}}), tmp)
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
        bar.set_description(f"{desc} epoch {epoch + 1}/{cfg.epochs} val loss {val_losses['loss']:.4g}")
        # the progress a redirected sweep (no bars) keeps: `tail -f RUN/sweep.log`
        log.info("%s epoch %d/%d: val loss %.4g, %.0f s (%s)", desc, epoch + 1, cfg.epochs, val_losses["loss"],
                 time.time() - t0, out_dir.name)
    bar.close()
    writer.close()
    model.eval()
    return val_losses


def load_state(path: Path) -> dict[str, Any]:
    """A training's resume point, refused clearly when it is not one (it is then simply deleted and redone)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign: never suggest weights_only=False
        raise GeovqError(f"{path} is not a readable training resume point ({type(e).__name__}); delete it and "
                         "the training restarts from epoch 0") from None


def _to_cpu(obj: Any) -> Any:
    """Tensors of a nested state moved to the CPU, so that a resume point written on a GPU loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


@torch.no_grad()
def evaluate_losses(model: nn.Module, step_loss, images: np.ndarray, batch_size: int,
                    device: torch.device) -> dict[str, float]:
    model.eval()
    totals: dict[str, float] = {}
    for batch in _batches(images, batch_size, None, device):
        for k, v in step_loss(batch).items():
            if v.ndim == 0:
                totals[k] = totals.get(k, 0.0) + float(v) * len(batch)
    return {k: v / len(images) for k, v in totals.items()}


def train_vae(trunk: TrunkConfig, cfg: TrainConfig, train_images: np.ndarray, val_images: np.ndarray,
              out_dir: Path, progress: Callable[..., Any], device: torch.device, layout: TokenLayout | None = None,
              tdc_target_bits: float | None = None, tdc: TDCConfig | None = None,
              on_epoch: EpochCallback | None = None) -> GaussianVAE:
    """Train the Gaussian VAE on `device`; writes out_dir/model.pt (weights + config, and the TDC state if any).

    Plain: reconstruction NLL + β·KL, both summed per image. With `tdc_target_bits` T, the KL term is the
    Target Divergence Constraint of DESIGN.md §3.6 (settings `tdc`) on per-token KL (grouped by `layout`),
    steering every token's KL to T = log2 K bits. Per-token KL (mean, min, max, histogram) is logged either
    way. `layout` defaults to one token per grid cell (d = C).
    """
    layout = layout or TokenLayout(*trunk.grid, trunk.latent_channels, trunk.latent_channels)
    torch.manual_seed(cfg.seed)
    model = GaussianVAE(trunk).to(device)
    controller = (TDCController.from_config(tdc_target_bits, tdc or TDCConfig())
                  if tdc_target_bits is not None else None)

    def step_loss(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model.loss(x, cfg.recon, cfg.beta)
        kl_bits = token_kl_bits(out["mu"], out["logvar"], layout)  # (B, T)
        losses = {k: out[k] for k in ("loss", "nll", "kl", "logits")}
        losses.update(kl_bits_mean=kl_bits.mean(), kl_bits_min=kl_bits.min(), kl_bits_max=kl_bits.max(),
                      hist_token_kl_bits=kl_bits)
        if controller is not None:
            losses["loss"] = out["nll"] + controller.loss(kl_bits)
            losses.update(tdc_lambda=torch.tensor(controller.lam), tdc_lambda_min=torch.tensor(controller.lam_min),
                          tdc_lambda_max=torch.tensor(controller.lam_max))
            if model.training:  # λ's move after each training step, never on validation batches
                controller.update(kl_bits.detach())
        return losses

    val = train_model(model, step_loss, train_images, val_images, cfg, out_dir, progress,
                      "vae" if controller is None else f"vae tdc T={tdc_target_bits:g}", device,
                      stateful={"tdc": controller} if controller is not None else None, on_epoch=on_epoch)
    save_checkpoint(out_dir / "model.pt", "vae", model, {"trunk": trunk.as_dict(), "train": cfg.as_dict()},
                    {"val_losses": val, "tdc": controller.state_dict() if controller is not None else None})
    return model


def train_end_to_end(trunk: TrunkConfig, layout: TokenLayout, method: EndToEndMethod, vq: VQConfig,
                     cfg: TrainConfig, train_images: np.ndarray, val_images: np.ndarray, out_dir: Path,
                     progress: Callable[..., Any], device: torch.device, on_epoch: EpochCallback | None = None
                     ) -> EndToEndAE:
    """Train an end-to-end model on `device`: the VQ-VAE (k-means init of its codebook first; settings `vq`) or
    the QuantizedAE of an FSQ, LFQ or residual-VQ `method`. Writes out_dir/model.pt."""
    torch.manual_seed(cfg.seed)
    k = method.n_codes
    if method.is_vqvae:
        model: EndToEndAE = VQVAE(trunk, layout, k, vq).to(device)
        logged = ("loss", "nll", "commit", "restarted", "logits")
        kind, config = "vqvae", {"vq": asdict(vq)}
    else:
        model = QuantizedAE(trunk, layout, method).to(device)
        logged = ("loss", "nll", "aux", "logits")
        kind, config = "quantized_ae", {"method": method.name, "params": method.get_params()}
    if not (out_dir / "state.pt").exists():  # a resumed training restores its quantizer with its weights
        _init_from_data(model, train_images, vq.kmeans_init_tokens, cfg.seed, device)

    def step_loss(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = model.loss(x, cfg.recon)
        return {name: out[name] for name in logged}

    val = train_model(model, step_loss, train_images, val_images, cfg, out_dir, progress, f"{method.name} K={k}",
                      device, on_epoch=on_epoch)
    save_checkpoint(out_dir / "model.pt", kind, model,
                    {"trunk": trunk.as_dict(), "layout": layout.as_dict(), "n_codes": k, **config,
                     "train": cfg.as_dict()}, {"val_losses": val})
    return model


@torch.no_grad()
def _init_from_data(model: EndToEndAE, train_images: np.ndarray, n_tokens: int, seed: int, device: torch.device
                    ) -> None:
    """Initialise the quantizer from the untrained encoder's tokens of a random image sample (about `n_tokens`):
    the VQ-VAE's codebook by k-means, LFQ's input projection by its statistics (`Bottleneck.init_from`)."""
    rng = np.random.default_rng(seed)
    per_image = model.layout.tokens_per_image
    n_images = min(len(train_images), max(1, -(-n_tokens // per_image)))
    sample = to_device(train_images[rng.choice(len(train_images), n_images, replace=False)], device)
    flat = model.tokens(sample).reshape(-1, model.layout.token_dim)
    if isinstance(model, QuantizedAE):
        model.bottleneck.init_from(flat)
        return
    if flat.shape[0] < model.n_codes:
        raise GeovqError(f"codebook size K={model.n_codes} exceeds the {flat.shape[0]} tokens available "
                         "for its k-means initialisation")
    model.codebook.init_from(flat.cpu().numpy(), seed)
