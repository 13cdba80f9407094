"""Training a prior on a unit's codes: AdamW on the training codes, early stopping on the validation codes.

The test codes never enter training or model selection (DESIGN.md §5): they are scored once, by the caller,
with `token_nll`. Every `eval_every` steps the validation NLL is measured and the resume point `state.pt`
is written (device-independent: CPU tensors). Batches are a function of (seed, epoch) alone, so a resumed
training sees the same batches as an uninterrupted one. The best validation weights become `prior.pt`, a
geovq checkpoint of kind "prior" (`geovq.training.checkpoint.load_model` rebuilds it on any device).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from geovq.io import atomic_path
from geovq.models.priors import build_prior
from geovq.models.priors.base import SAMPLE_BATCH, CodeGrid, Prior
from geovq.models.priors.settings import PriorConfig, PriorTrainConfig
from geovq.training.checkpoint import save_checkpoint
from geovq.training.loop import _to_cpu, load_state, to_device

log = logging.getLogger("geovq")
LN2 = math.log(2.0)


def _optimizer(model: Prior, cfg: PriorTrainConfig) -> torch.optim.AdamW:
    """nanoGPT's split: weight decay on matrices, embeddings and kernels (≥ 2-D); none on biases, LayerNorm
    gains, the BOS vector, or the PixelCNN's per-position biases (4-D, so excluded by name)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "position" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             foreach=True)  # see train_model


def _lr_factor(step: int, cfg: PriorTrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def _batch_indices(step: int, n: int, cfg: PriorTrainConfig) -> np.ndarray:
    """The images of training step `step`: epoch e's permutation is a function of (seed, e) only."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    return order[i * cfg.batch_size:(i + 1) * cfg.batch_size]


def _cpu_copy(model: Prior) -> dict[str, torch.Tensor]:
    """The weights copied to the CPU (on the CPU, .cpu() would alias the parameters training keeps changing)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _labels(labels: np.ndarray | None, idx: np.ndarray | slice, device: torch.device) -> torch.Tensor | None:
    return None if labels is None else to_device(labels[idx].astype(np.int64), device)


@torch.no_grad()
def token_nll(model: Prior, codes: np.ndarray, labels: np.ndarray | None, device: torch.device,
              batch_size: int = SAMPLE_BATCH) -> np.ndarray:
    """(N, T) float64 −log p(c_t | c_<t, label) in nats of every code, in eval mode on `device`."""
    model.eval()
    out = [model.token_nll(to_device(codes[s:s + batch_size].astype(np.int64), device),
                           _labels(labels, slice(s, s + batch_size), device)).double().cpu().numpy()
           for s in range(0, len(codes), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, codes.shape[1]))


def nll_summary(nll: np.ndarray) -> dict[str, float]:
    """Bits per token (mean over all codes) and per image (mean over images of the summed bits: what
    arithmetic coding with the prior spends, within about 2 bits per image), from (N, T) nats."""
    return {"bits_per_token": float(nll.mean() / LN2), "bits_per_image": float(nll.sum(1).mean() / LN2)}


def train_prior(config: PriorConfig, grid: CodeGrid, n_classes: int, train_codes: np.ndarray,
                train_labels: np.ndarray | None, val_codes: np.ndarray, val_labels: np.ndarray | None,
                out_dir: Path, progress: Callable[..., Any], device: torch.device) -> tuple[Prior, dict[str, Any]]:
    """Train (or resume) a prior; returns it with its best validation weights, in eval mode on `device`,
    and a record: the validation curve (bits/token by step), the best step, steps run, parameters, seconds.
    Writes out_dir/prior.pt; out_dir/state.pt is the resume point while training runs."""
    cfg = config.train
    cfg.validate()
    if config.conditional != (train_labels is not None) or config.conditional != (val_labels is not None):
        raise ValueError("labels must be given exactly when the prior is conditional")
    checkpoint_config = {"kind": config.kind, "grid": grid.as_dict(), "n_classes": n_classes, "model": config.model}
    torch.manual_seed(cfg.seed)
    model = build_prior(checkpoint_config).to(device)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    state_path = out_dir / "state.pt"
    record: dict[str, Any] = {"val_curve": [], "best_step": 0, "best_val_bits_per_token": math.inf, "seconds": 0.0,
                              "cpu_seconds": 0.0}
    best_weights = _cpu_copy(model)
    step = 0
    if state_path.exists():
        state = load_state(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])  # dropout continues where it stopped
        step, record, best_weights = int(state["step"]), state["record"], state["best"]
        log.info("prior %s: resuming at step %d of %d (%s)", config.kind, step, cfg.max_steps, state_path)
    # Wall and CPU (this process, all threads) seconds: on a shared machine the second says what it costs.
    t0, cpu0 = time.time() - record["seconds"], time.process_time() - record["cpu_seconds"]
    bar = progress(total=cfg.max_steps, desc=f"prior {config.kind}")
    bar.update(step)
    while step < cfg.max_steps and not _stopped(record, cfg):
        model.train()
        idx = _batch_indices(step, len(train_codes), cfg)
        codes = to_device(train_codes[idx].astype(np.int64), device)
        loss = model.token_nll(codes, _labels(train_labels, idx, device)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val = float(token_nll(model, val_codes, val_labels, device).mean() / LN2)
            record["val_curve"].append({"step": step, "val_bits_per_token": val,
                                        "train_bits_per_token": float(loss.detach()) / LN2})
            if val < record["best_val_bits_per_token"]:
                record["best_val_bits_per_token"], record["best_step"] = val, step
                best_weights = _cpu_copy(model)
            record["seconds"], record["cpu_seconds"] = time.time() - t0, time.process_time() - cpu0
            bar.set_description(f"prior {config.kind} step {step} val {val:.4f} bits/token")
            log.info("prior %s step %d/%d: val %.4f bits/token (%s)", config.kind, step, cfg.max_steps, val,
                     out_dir.parent.name)
            with atomic_path(state_path) as tmp:
                torch.save(_to_cpu({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "step": step, "record": record,
                                    "best": best_weights, "torch_rng": torch.get_rng_state()}), tmp)
    bar.close()
    model.load_state_dict(best_weights)
    record.update(steps=step, seconds=time.time() - t0, cpu_seconds=time.process_time() - cpu0,
                  early_stopped=step < cfg.max_steps,
                  parameters=sum(p.numel() for p in model.parameters() if p.requires_grad))
    save_checkpoint(out_dir / "prior.pt", "prior", model, checkpoint_config,
                    {"train": config.as_dict(), "record": record})
    state_path.unlink(missing_ok=True)  # prior.pt now marks the training finished
    return model.eval(), record


def _stopped(record: dict[str, Any], cfg: PriorTrainConfig) -> bool:
    """Early stop: `patience` validation passes since the best one."""
    curve = record["val_curve"]
    return bool(curve) and (curve[-1]["step"] - record["best_step"]) >= cfg.patience * cfg.eval_every
