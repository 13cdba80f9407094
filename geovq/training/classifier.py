"""Training the domain classifier (geovq.models.classifier) on a dataset's training split.

AdamW for a fixed number of steps, the weights of the best validation accuracy kept; the test accuracy is
measured once at the end and recorded beside every domain FID it serves.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from geovq.data import ImageSplits
from geovq.models.classifier import DomainClassifier
from geovq.training.loop import to_device

#: images per forward pass when extracting features or scoring
FEATURE_BATCH = 512


@torch.no_grad()
def classifier_features(model: DomainClassifier, images: np.ndarray | torch.Tensor, device: torch.device,
                        batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(N, features) float32 features on the CPU of (N, ch, H, W) images in [0, 1]."""
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        chunk = chunk.to(device) if isinstance(chunk, torch.Tensor) else to_device(chunk, device)
        out.append(model.features(chunk).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    model.eval()
    hits = sum(int((model(to_device(images[s:s + FEATURE_BATCH], device)).argmax(1).cpu().numpy()
                    == labels[s:s + FEATURE_BATCH]).sum()) for s in range(0, len(images), FEATURE_BATCH))
    return hits / len(images)


def train_classifier(data: ImageSplits, device: torch.device, progress: Callable[..., Any], steps: int = 1500,
                     batch_size: int = 128, lr: float = 2e-3, eval_every: int = 250, seed: int = 0
                     ) -> tuple[DomainClassifier, dict[str, Any]]:
    """The classifier (best validation accuracy, eval mode, on `device`) and its record: val and test
    accuracy, steps, wall and CPU seconds."""
    torch.manual_seed(seed)
    n_classes = int(max(data.train_labels.max(), data.val_labels.max(), data.test_labels.max())) + 1
    model = DomainClassifier(data.channels, data.image_shape[1:], n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, foreach=True)  # see train_model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = np.random.default_rng(seed)
    best, best_state, order = -1.0, None, np.zeros(0, np.int64)
    t0, cpu0 = time.time(), time.process_time()
    bar = progress(total=steps, desc="domain classifier")
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # a fresh epoch's permutation when the last one runs out
            order = rng.permutation(len(data.train))
        idx, order = order[:batch_size], order[batch_size:]
        model.train()
        loss = F.cross_entropy(model(to_device(data.train[idx], device)), to_device(data.train_labels[idx], device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        if step % eval_every == 0 or step == steps:
            val = accuracy(model, data.val, data.val_labels, device)
            if val > best:
                best, best_state = val, copy.deepcopy(model.state_dict())
    bar.close()
    model.load_state_dict(best_state)
    record = {"val_accuracy": best, "test_accuracy": accuracy(model, data.test, data.test_labels, device),
              "steps": steps, "train_images": len(data.train), "seconds": time.time() - t0,
              "cpu_seconds": time.process_time() - cpu0, **model.config()}
    return model.eval(), record
