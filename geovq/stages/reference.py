"""Stage: the codecs everyone knows, JPEG and WebP (Pillow), on the run's own test images, so that a report sets
the learned codes' rate in real bytes beside them (DESIGN.md §2: rates in bits per image and per pixel).

    test images ─ Pillow at each quality ─> files in memory ─ decoded ─> reference_codecs.json

Each point is one codec at one quality over every test image: bits per image from the real file sizes (8 × the mean
size, headers included, as `coded_bits_per_image` counts the geovq codec's 7-byte header), bits per native pixel,
and the mean PSNR of the decoded images against the same float images the rows are scored on; an image that comes
back exactly (flat patches at high quality: PSNR +inf) counts as PERFECT_PSNR dB, and `perfect` says how many did.
The images are coded as the networks see them (8-bit, grey or RGB, at the trunk's size), so a point and a row
reconstruct the same pixels. On tiny images a JPEG or WebP header is most of the file: that is the real cost of
those formats there, and the figure says so.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import torch

from geovq.data import ImageSplits
from geovq.io import write_json
from geovq.metrics.image import psnr
from geovq.metrics.rate import bits_per_pixel
from geovq.stages.rundir import RunDir

#: the qualities each codec is run at (Pillow's 1-100 scale for both)
QUALITIES = (5, 10, 20, 35, 50, 75, 90)
#: the PSNR an exactly reconstructed image counts with in a point's mean (its own PSNR is +inf)
PERFECT_PSNR = 100.0
#: Pillow format name of each codec
CODECS = {"jpeg": "JPEG", "webp": "WEBP"}
FILE = "reference_codecs.json"


def to_pil(image: np.ndarray):
    """(C, H, W) float in [0, 1] -> an 8-bit grey (C = 1) or RGB (C = 3) Pillow image."""
    from PIL import Image

    pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))


def from_pil(image, channels: int) -> np.ndarray:
    """A decoded Pillow image -> (C, H, W) float32 in [0, 1]."""
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def code_images(images: np.ndarray, codec: str, quality: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C, H, W) images through one codec at one quality -> (file sizes in bytes (N,), decoded images)."""
    from PIL import Image

    sizes, decoded = [], []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format=CODECS[codec], quality=quality)
        sizes.append(buffer.tell())
        buffer.seek(0)
        decoded.append(from_pil(Image.open(buffer), images.shape[1]))
    return np.asarray(sizes), np.stack(decoded)


def reference_codecs_stage(run: RunDir, data: ImageSplits) -> dict[str, Any]:
    """reference_codecs.json in the run directory (kept once written: the test split is fixed by the run's
    configuration); returns its content. A codec this Pillow cannot write is recorded with the reason."""
    from PIL import features

    path = run.root / FILE
    if path.exists():
        import json

        return json.loads(path.read_text())
    t0 = time.time()
    originals = torch.from_numpy(data.test)
    result: dict[str, Any] = {"n_test": len(data.test), "qualities": list(QUALITIES), "codecs": {}}
    for codec in CODECS:
        if not features.check("webp" if codec == "webp" else "jpg"):
            result["codecs"][codec] = {"points": [], "reason": f"this Pillow was built without {codec}"}
            continue
        points = []
        for quality in QUALITIES:
            sizes, decoded = code_images(data.test, codec, quality)
            bits = 8 * float(sizes.mean())
            per_image = psnr(originals, torch.from_numpy(decoded))
            points.append({"quality": quality, "bits_per_image": bits, "bpp": bits_per_pixel(bits, data.native_hw),
                           "psnr": float(np.minimum(per_image, PERFECT_PSNR).mean()),
                           "perfect": int(np.isinf(per_image).sum())})
        result["codecs"][codec] = {"points": points, "reason": None}
    result["seconds"] = time.time() - t0
    write_json(path, result)
    return result
