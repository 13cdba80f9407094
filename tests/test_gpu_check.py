"""bench/gpu_check.py runs where only PyTorch, numpy, scipy and scikit-learn are installed, and the training
loop it calls does without TensorBoard."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from geovq.config import TrainConfig, TrunkConfig
from geovq.training.checkpoint import load_model
from geovq.training.loop import train_vae

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("torch", "numpy", "scipy", "scikit-learn")  # what a bare GPU machine has (issue 10)


class Quiet:
    def __init__(self, total=None, desc=None):
        pass

    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass


def _tiny_training(out: Path) -> None:
    trunk = TrunkConfig(in_channels=1, image_size=(16, 16), hidden=8, latent_channels=4, res_blocks=1)
    images = np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)
    train_vae(trunk, TrainConfig(epochs=1, batch_size=16), images[:24], images[24:], out, Quiet,
              torch.device("cpu"))


def test_training_without_tensorboard_writes_its_checkpoint_and_no_events(tmp_path, monkeypatch):
    _tiny_training(tmp_path / "with")
    assert list((tmp_path / "with" / "tb").glob("events.out.tfevents.*"))  # the contrast: events when installed

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises ImportError
    _tiny_training(tmp_path / "without")
    assert not (tmp_path / "without" / "tb").exists()
    assert load_model(tmp_path / "without" / "model.pt", "vae").cfg.latent_channels == 4
    assert (tmp_path / "without" / "state.pt").exists()


def _closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions `names` need, following their (non-extra) requirements."""
    seen, todo = set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement of another platform or Python
            continue
        seen.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def bare_site(folder: Path) -> Path:
    """A folder of links to exactly the installed files of ALLOWED and their dependencies."""
    folder.mkdir()
    for name in _closure(ALLOWED):
        dist = metadata.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def test_gpu_check_runs_with_only_torch_numpy_scipy_sklearn(tmp_path):
    site = bare_site(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # -S: no site-packages, so the links are all there is; the check puts the checkout on sys.path itself
    out = subprocess.run([sys.executable, "-S", str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--cpu-threads", "1"],
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    absent = subprocess.run([sys.executable, "-S", "-c", "import importlib.util as u; print([m for m in "
                             "('ray', 'faiss', 'optuna', 'pyarrow', 'tensorboard', 'torchvision', 'yaml') "
                             "if u.find_spec(m)])"], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                            capture_output=True, text=True)
    assert absent.stdout.strip() == "[]"  # the environment really lacks them
    assert "stubbed absent packages: yaml, faiss, kmedoids" in out.stdout
    labels = ("VAE training img/s", "VQ-VAE training img/s", "latent extraction img/s", "JVP edges/s midpoint",
              "JVP edges/s endpoint", "pull-back probed encode tokens/s")
    rows = dict(re.findall(rf"^({'|'.join(labels)}) +(.*)$", out.stdout, re.MULTILINE))
    assert set(rows) == set(labels)
    for label, rest in rows.items():
        cpu = rest.split()[0]
        if "training" in label:  # a difference of two tiny timings: a rate, or "noisy" when it is not positive
            assert cpu == "noisy" or float(cpu.replace(",", "")) > 0
        else:
            assert float(cpu.replace(",", "")) > 0
        if not torch.cuda.is_available():
            assert "no CUDA device" in rest
