"""Checkpoints: weights plus the config that rebuilds the model, loaded safely.

Files are written with `torch.save` of plain containers (tensors, dicts, lists, numbers, strings) so that
`torch.load(..., weights_only=True)` can read them: a checkpoint never executes code. A file that is not a
geovq checkpoint (corrupt, foreign, or of another kind) is rejected with a clear `GeovqError`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from geovq.errors import GeovqError
from geovq.io import atomic_path

FORMAT = "geovq-checkpoint"
VERSION = 2  # 2: VQ-VAE checkpoints carry their layout and K beside the VQConfig
#: the kinds of an end-to-end model: the VQ-VAE, and the QuantizedAE of FSQ, LFQ or residual VQ (method + params)
END_TO_END_KINDS = ("vqvae", "quantized_ae")


def save_checkpoint(path: str | os.PathLike, kind: str, model: torch.nn.Module, config: dict[str, Any],
                    extra: dict[str, Any] | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "config": config,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise GeovqError(f"checkpoint {path} does not exist") from e
    except Exception as e:  # unpickling errors of many kinds: corrupt, truncated, or unsafe content
        # torch's own message may advise weights_only=False: never pass that on for an untrusted file
        raise GeovqError(f"{path} is not a readable geovq checkpoint ({type(e).__name__}); delete it and the "
                         "stage that wrote it runs again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GeovqError(f"{path} is not a geovq checkpoint (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise GeovqError(f"{path} has checkpoint version {payload.get('version')}; this geovq reads {VERSION}")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and payload["kind"] not in kinds:
        raise GeovqError(f"{path} holds a {payload['kind']!r} model, expected {' or '.join(map(repr, kinds))}")
    return payload


def load_model(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild a VAE, end-to-end model, fine-tuned decoder, prior or domain classifier from its checkpoint alone, on
    `device`, in eval mode. `kind`: the kind (or kinds) the file must hold."""
    from geovq.config import TrunkConfig, VQConfig
    from geovq.latents import TokenLayout
    from geovq.models.classifier import DomainClassifier
    from geovq.models.priors import build_prior
    from geovq.models.trunk import Decoder
    from geovq.models.vae import GaussianVAE
    from geovq.end_to_end import end_to_end_class
    from geovq.models.vqvae import VQVAE, QuantizedAE

    payload = load_checkpoint(path, kind)
    config = payload["config"]
    if payload["kind"] == "vae":
        model = GaussianVAE(TrunkConfig(**config["trunk"]))
    elif payload["kind"] == "vqvae":
        model = VQVAE(TrunkConfig(**config["trunk"]), TokenLayout(**config["layout"]), config["n_codes"],
                      VQConfig(**config["vq"]))
    elif payload["kind"] == "quantized_ae":
        try:
            method = end_to_end_class(config["method"])(**config["params"]).validate()
        except TypeError as e:  # a parameter the method's constructor does not take
            raise GeovqError(f"{path}: its {config['method']} settings do not match this geovq's ({e})") from None
        model = QuantizedAE(TrunkConfig(**config["trunk"]), TokenLayout(**config["layout"]), method)
    elif payload["kind"] == "decoder":
        model = Decoder(TrunkConfig(**config["trunk"]))
    elif payload["kind"] == "prior":
        model = build_prior(config)
    elif payload["kind"] == "classifier":
        model = DomainClassifier(**config)
    else:
        raise GeovqError(f"{path} holds an unknown model kind {payload['kind']!r}; valid: vae, {', '.join(END_TO_END_KINDS)}, "
                         "decoder, prior, classifier")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise GeovqError(f"{path}: weights do not match the stored config ({e})") from e
    return model.to(device).eval()
