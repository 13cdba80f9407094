"""GPU check: geovq's torch stages on this machine's GPU against the same code on its CPU, in one table.

    python bench/gpu_check.py                      # at most ~5 minutes with a GPU; without one: the CPU column only
    python bench/gpu_check.py --dataset cifar10    # the same with CIFAR-10's trunk on 3×32×32 images

For any machine with a GPU, from a checkout, without installing geovq: it puts the repository on sys.path
itself and needs only PyTorch, numpy, scipy and scikit-learn. No Ray, faiss, optuna, pyarrow, tensorboard,
torchvision or pyyaml: it calls the stage functions directly (no Ray Tune, no CLI) on synthetic MNIST-shaped
(or CIFAR-shaped) images (no download). geovq imports pyyaml (its config module), faiss (k-NN graphs) and
kmedoids at module level for code this check never runs; where they are absent they are replaced by stubs that
raise if touched, so a code path that needs them fails loudly instead of being measured wrongly. Without
tensorboard the training loop logs no TensorBoard events.

Rows (the trunk, loss and batch size of `geovq sweep mnist` or `cifar10`; GPU workloads are larger, rates are
per image or edge):
- VAE / VQ-VAE training img/s: `train_vae_stage` / `train_end_to_end_stage`, timed at E and E+2 epochs in fresh
  folders; img/s = 2 × training images ÷ the difference, so fixed costs (model build, the VQ-VAE's k-means
  codebook initialisation, first-call warm-up) cancel. An epoch includes its validation pass (10% of the
  training images) and its resume-point write.
- latent extraction img/s: `extract_latents` (what the Ray Data stage runs per shard), batch 512.
- JVP edges/s: `edge_lengths_stage` (checkpoint -> GridTokenDecoder -> `edge_lengths`) on an undirected
  10-NN graph of training tokens (Euclidean μ), quadratures midpoint (1 JVP per segment side) and endpoint
  (each node's metric tensor, d JVPs around one primal).
- pull-back probed encode tokens/s: `PullbackQuantizer.encode_probed` (32 output probes per image, the unsure
  tokens settled by exact forward-mode passes: issue 26) of the extracted latents against a K = 256 codebook of
  their own tokens (no fit: the fit needs faiss). This is what each actor of the Ray Data codes stage
  (`distributed.data.encode_split_codes`, one actor per GPU on a cluster) runs on its batches, so the row is that
  stage's rate per GPU, before Ray Data's start-up (~9 s per job here).
- agreement: the same edges of the same checkpoint measured on the CPU and the GPU, max |GPU − CPU| / CPU,
  with torch's default for cuDNN convolutions (TF32 allowed on Ampere and later) and with TF32 off; and the
  share of the CPU workload's tokens given the same pull-back code on both.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's geovq, installed or not

import numpy as np
import torch

#: imported by geovq at module level, never used on the paths timed here
OPTIONAL_AT_IMPORT = ("yaml", "faiss", "kmedoids")


class _Absent(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__} is not installed; bench/gpu_check.py stubbed it for geovq's module-level "
                          f"imports, and this code path used {self.__name__}.{name}")


def stub_absent(names: tuple[str, ...]) -> list[str]:
    """Put a stub in sys.modules for each package in `names` that cannot be imported; returns their names."""
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _Absent(name)
            stubbed.append(name)
    return stubbed


STUBBED = stub_absent(OPTIONAL_AT_IMPORT)

from geovq.config import resolve_config  # noqa: E402  (after the stubs)
from geovq.data import ImageSplits  # noqa: E402
from geovq.quantize import make_quantizer  # noqa: E402
from geovq.stages.common import GridDecoder  # noqa: E402
from geovq.stages.edges import edge_lengths_stage  # noqa: E402
from geovq.stages.extract import extract_latents  # noqa: E402
from geovq.stages.rundir import RunDir  # noqa: E402
from geovq.stages.train_vae import train_vae_stage  # noqa: E402
from geovq.stages.units import Unit, VaeSpec  # noqa: E402
from geovq.stages.end_to_end import train_end_to_end_stage  # noqa: E402
from geovq.training.checkpoint import load_model  # noqa: E402

#: fixed workloads per device: training images, first epoch count, extracted images, graph nodes, edges timed
WORKLOADS = {
    "cpu": dict(train=1024, epochs=1, extract=2048, nodes=600, edges=1000, probed=200),
    "cuda": dict(train=32768, epochs=1, extract=65536, nodes=8000, edges=40000, probed=10000),
}
#: --tiny, for the test suite: proves the script runs where only its four packages exist, not the figures
TINY = dict(train=64, epochs=1, extract=128, nodes=60, edges=100, probed=8)
EXTRA_EPOCHS = 2
K_NEIGHBOURS = 10
N_CODES = 256


class Quiet:
    """The subset of tqdm the training loop calls, doing nothing."""

    def __init__(self, total: int | None = None, desc: str | None = None) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


#: image shape (C, H, W) of each dataset this check can imitate
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def synthetic_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(n, C, H, W) float32 in [0, 1]: three random Gaussian strokes per image (and channel), in the dataset's
    shape and range."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = np.zeros((n, c, h, w), np.float32)
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, (2, n, c, 1, 1)).astype(np.float32) * np.float32(h)
        sy, sx = rng.uniform(1.0, 5.0, (2, n, c, 1, 1)).astype(np.float32)
        images += np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return np.clip(images, 0, 1)


def splits(images: np.ndarray, n_train: int, dataset: str) -> ImageSplits:
    n_val = max(1, n_train // 10)
    labels = np.full(len(images), -1, np.int64)
    return ImageSplits(dataset, images[:n_train], images[n_train:n_train + n_val], images[:n_val], labels[:n_train],
                       labels[:n_val], labels[:n_val], images.shape[2:], f"synthetic {dataset}-shaped strokes")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


def training_rate(stage, cfg, work, data: ImageSplits, device: torch.device, root: Path, epochs: int) -> float:
    """Training images per second of one extra epoch: the stage at `epochs` and at `epochs` + EXTRA_EPOCHS."""
    seconds = []
    for e in (epochs, epochs + EXTRA_EPOCHS):
        run = RunDir(root / f"{device.type}-{stage.__name__}-{e}")
        cfg_e = replace(cfg, train=replace(cfg.train, epochs=e))
        seconds.append(timed(device, stage, run, cfg_e, work, data, device, Quiet)[1])
    extra = seconds[1] - seconds[0]
    return EXTRA_EPOCHS * len(data.train) / extra if extra > 0 else float("nan")  # nan: noise swamped the epochs


def knn_edges(points: np.ndarray, k: int) -> np.ndarray:
    """Undirected k-NN edges (E, 2), i < j, by brute-force Euclidean distances (no faiss needed here)."""
    x = torch.as_tensor(points, dtype=torch.float64)
    d2 = torch.cdist(x, x).fill_diagonal_(float("inf"))
    nbrs = d2.topk(k, largest=False).indices.numpy()
    pairs = np.stack([np.repeat(np.arange(len(points)), k), nbrs.ravel()], 1)
    return np.unique(np.sort(pairs, 1), axis=0)


def measure(device: torch.device, images: np.ndarray, cfg, root: Path) -> dict:
    """Every rate on `device` with its fixed workload; returns rates, the VAE checkpoint and its graph."""
    w = WORKLOADS[device.type]
    data = splits(images, w["train"], cfg.dataset)
    spec = VaeSpec("plain", seed=0)
    unit = Unit("vqvae", N_CODES, seed=0, token_dim=cfg.d, grouping=cfg.grouping)
    # First-call costs (CUDA context, kernel selection, sklearn's k-means import) are paid before any timing.
    warm, warm_cfg = splits(images, min(256, w["train"]), cfg.dataset), replace(cfg, train=replace(cfg.train, epochs=1))
    for stage, work in ((train_vae_stage, spec), (train_end_to_end_stage, unit)):
        stage(RunDir(root / f"{device.type}-warmup"), warm_cfg, work, warm, device, Quiet)

    out = {"vae_train": training_rate(train_vae_stage, cfg, spec, data, device, root, w["epochs"]),
           "vqvae_train": training_rate(train_end_to_end_stage, cfg, unit, data, device, root, w["epochs"])}
    checkpoint = RunDir(root / f"{device.type}-train_vae_stage-{w['epochs']}").vae(spec) / "model.pt"
    model = load_model(checkpoint, "vae", device)
    extract_latents(model, images[:512], cfg.layout, device)  # warm-up
    latents, seconds = timed(device, extract_latents, model, images[:w["extract"]], cfg.layout, device)
    out["extract"] = w["extract"] / seconds

    rng = np.random.default_rng(0)
    tokens = np.sort(rng.choice(latents.n_tokens, w["nodes"], replace=False))
    edges = knn_edges(latents.token_mu[tokens], K_NEIGHBOURS)[: w["edges"]]
    for quadrature in ("midpoint", "endpoint"):
        edge_lengths_stage(checkpoint, latents, tokens, edges[:256], quadrature, device)  # warm-up
        _, seconds = timed(device, edge_lengths_stage, checkpoint, latents, tokens, edges, quadrature, device)
        out[f"edges_{quadrature}"] = len(edges) / seconds
    quantizer = probed_quantizer(model, latents)
    quantizer.encode_probed(latents.subset(np.arange(2)))  # warm-up
    _, seconds = timed(device, quantizer.encode_probed, latents.subset(np.arange(w["probed"])))
    out["probed"] = w["probed"] * latents.tokens_per_image / seconds
    out.update(checkpoint=checkpoint, latents=latents, tokens=tokens, edges=edges)
    return out


def probed_quantizer(model, latents):
    """A pull-back quantizer on `model`'s decoder with K = N_CODES of the latents' own tokens as its codebook."""
    quantizer = make_quantizer("pullback", N_CODES, decoder=GridDecoder(model))
    picks = np.random.default_rng(0).choice(latents.n_tokens, N_CODES, replace=False)
    quantizer.layout_, quantizer.codebook_ = latents.layout, latents.token_mu[picks].astype(np.float32)
    return quantizer


def code_agreement(cpu: torch.device, gpu: torch.device, ref: dict) -> float:
    """Share of the CPU workload's tokens given the same probed pull-back code on the CPU and on the GPU."""
    latents = ref["latents"].subset(np.arange(WORKLOADS["cpu"]["probed"]))
    codes = [probed_quantizer(load_model(ref["checkpoint"], "vae", device), latents).encode_probed(latents)
             for device in (cpu, gpu)]
    return float((codes[0] == codes[1]).mean())


def agreement(cpu: torch.device, gpu: torch.device, ref: dict, quadrature: str, tf32: bool) -> float:
    """max |GPU − CPU| / CPU of the CPU workload's edge lengths, one checkpoint (trained on the GPU)."""
    edges = ref["edges"][: WORKLOADS["cpu"]["edges"]]
    args = (ref["checkpoint"], ref["latents"], ref["tokens"], edges, quadrature)
    on_cpu = edge_lengths_stage(*args, cpu)
    default = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        on_gpu = edge_lengths_stage(*args, gpu)
    finally:
        torch.backends.cudnn.allow_tf32 = default
    return float(np.max(np.abs(on_gpu - on_cpu) / np.abs(on_cpu)))


def rate(value: float) -> str:
    return "noisy" if np.isnan(value) else f"{value:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for the CPU column (default: torch's own default on this machine)")
    ap.add_argument("--dataset", choices=sorted(SHAPES), default="mnist",
                    help="whose trunk, loss, batch size and image shape (synthetic images either way)")
    ap.add_argument("--tiny", action="store_true", help="tiny workloads (a smoke test; its rates mean nothing)")
    args = ap.parse_args()
    logging.getLogger("geovq").setLevel(logging.ERROR)  # e.g. one "no tensorboard" line per training: see header
    torch.set_num_threads(args.cpu_threads)
    if args.tiny:
        WORKLOADS.update(cpu=TINY, cuda=TINY)
    t_start, load = time.perf_counter(), os.getloadavg()[0]  # other jobs on the machine skew the CPU column
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0) if torch.cuda.is_available() else None
    used = [WORKLOADS[d.type] for d in (cpu, gpu) if d is not None]
    images = synthetic_images(max(max(w["train"] + w["train"] // 10, w["extract"]) for w in used),
                              SHAPES[args.dataset])
    cfg = resolve_config(args.dataset, SHAPES[args.dataset], ["vqvae"], [N_CODES], seeds=1, epochs=None, quick=False)

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cpu_rates = measure(cpu, images, cfg, Path(tmp))
        gpu_rates = measure(gpu, images, cfg, Path(tmp)) if gpu else None
        agree = {}
        if gpu:
            for quadrature in ("midpoint", "endpoint"):
                for tf32 in (True, False):
                    agree[quadrature, tf32] = agreement(cpu, gpu, gpu_rates, quadrature, tf32)
            agree["codes"] = code_agreement(cpu, gpu, gpu_rates)

    gpu_name = torch.cuda.get_device_name(gpu) if gpu else "no CUDA device"
    print(f"geovq gpu_check ({args.dataset} trunk, {'×'.join(map(str, SHAPES[args.dataset]))} images): "
          f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"CPU {args.cpu_threads} torch threads ({os.cpu_count()} cores, load average {load:.1f} at start), "
          f"GPU: {gpu_name}; "
          f"stubbed absent packages: {', '.join(STUBBED) or 'none'}; TensorBoard events: "
          f"{'written' if importlib.util.find_spec('tensorboard') else 'none (tensorboard absent)'}")
    rows = [("VAE training img/s", "vae_train", "train"), ("VQ-VAE training img/s", "vqvae_train", "train"),
            ("latent extraction img/s", "extract", "extract"),
            ("JVP edges/s midpoint", "edges_midpoint", "edges"), ("JVP edges/s endpoint", "edges_endpoint", "edges"),
            ("pull-back probed encode tokens/s", "probed", "probed")]
    print(f"{'measure':<50}{'CPU':>12}{'GPU':>16}{'GPU/CPU':>9}   workload CPU | GPU")
    for label, key, size in rows:
        on_gpu = (f"{rate(gpu_rates[key]):>16}{gpu_rates[key] / cpu_rates[key]:>8.1f}×" if gpu
                  else f"{gpu_name:>16}{'—':>9}")
        print(f"{label:<50}{rate(cpu_rates[key]):>12}{on_gpu}   {WORKLOADS['cpu'][size]} | {WORKLOADS['cuda'][size]}")
    for quadrature in ("midpoint", "endpoint"):
        for tf32 in (True, False):
            label = f"edge lengths max rel diff {quadrature}, TF32 {'default' if tf32 else 'off'}"
            value = f"{agree[quadrature, tf32]:>16.1e}" if gpu else f"{gpu_name:>16}"
            print(f"{label:<50}{'(reference)':>12}{value}{'':>9}   {WORKLOADS['cpu']['edges']} edges")
    value = f"{agree['codes']:>16.4%}" if gpu else f"{gpu_name:>16}"
    print(f"{'pull-back probed codes identical':<50}{'(reference)':>12}{value}{'':>9}   "
          f"{WORKLOADS['cpu']['probed']} images")
    print(f"total {time.perf_counter() - t_start:.0f} s; training: +{EXTRA_EPOCHS} epochs after the first "
          f"(fixed costs cancel); TF32 default for cuDNN convolutions: {torch.backends.cudnn.allow_tf32}")


if __name__ == "__main__":
    main()
