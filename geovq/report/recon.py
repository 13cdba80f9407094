"""Reconstruction grids: the same test images across every method, VAE variant and decoder at one rate; and
sample grids: the first images each unit's prior drew, decoded by the decoder its row names.

The images are fixed by the split seed (`recon_images`), so every figure and every run shows the same ones.
The grid is assembled pixel for pixel (each tile the decoded image, upscaled by an integer factor, no
interpolation), with the original in the first row; its layout is in the JSON sidecar, so a tile can be
checked against the decoded image it claims to be.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geovq.report.figures import Figure, first_seed_rows

if TYPE_CHECKING:
    from geovq.report.runs import Runs

#: test images shown per grid
N_IMAGES = 12
SCALE, PAD, LABEL_WIDTH = 3, 2, 190


def recon_images(n_test: int, split_seed: int, n: int = N_IMAGES) -> np.ndarray:
    """Sorted indices of the test images every reconstruction grid shows (a function of the split seed)."""
    return np.sort(np.random.default_rng(split_seed).choice(n_test, size=min(n, n_test), replace=False))


def decode_rows(runs: Runs, bits: float, images: np.ndarray) -> dict[str, np.ndarray]:
    """{line label: (n, C, H, W) images in [0, 1]} decoded from the saved test codes of each line's lowest seed."""
    import torch

    from geovq.quantize.base import Quantizer
    from geovq.stages.common import GridDecoder, decode_grids
    from geovq.training.checkpoint import END_TO_END_KINDS, load_model

    cpu = torch.device("cpu")
    firsts = first_seed_rows(runs.rows, bits)
    out = {}
    for label, r in firsts.items():
        unit_dir = runs.run_of(r).root / Path(r["codes_path"]).parent
        codes = np.load(runs.run_of(r).root / r["codes_path"])[images]
        if r["vae"] is None:  # end to end: the model's own code vectors and decoder
            model = load_model(unit_dir / "model.pt", END_TO_END_KINDS)
            with torch.no_grad():
                out[label] = model.decode_codes(torch.as_tensor(codes, dtype=torch.long)).numpy()
            continue
        vae = load_model(runs.run_of(r).root / "vae" / r["vae_key"] / "model.pt", "vae")
        qcls = Quantizer.load_class(unit_dir / "quantizer.npz")
        quantizer = Quantizer.load(unit_dir / "quantizer.npz",
                                   **({"decoder": GridDecoder(vae)} if qcls.needs_decoder else {}))
        decoder = vae.decoder
        if r["finetuned"]:
            decoder = load_model(unit_dir / "decoder_finetuned.pt", "decoder")
        grids = quantizer.layout_.tokens_to_grid(quantizer.decode(codes))
        out[label] = decode_grids(decoder, grids, cpu).numpy()
    return out


def reconstruction_figure(out: Path, runs: Runs, bits: float) -> Figure:
    from geovq.stages.common import load_splits

    data = load_splits(runs.cfg)
    images = recon_images(len(data.test), runs.cfg.split_seed)
    rows = {"original": data.test[images], **decode_rows(runs, bits, images)}
    path = out / "figures" / f"recon_{bits:g}bits.png"
    layout = write_mosaic(path, rows, f"{bits:g} bits per image")
    return Figure(path, f"reconstructions at {bits:g} bits per image: the same {len(images)} test images (fixed by "
                        "the split seed) for every method; first row: the originals",
                  {"images": images.tolist(), "rows": list(rows), **layout})


def samples_figure(out: Path, runs: Runs, bits: float) -> Figure | None:
    """The first N_IMAGES samples of each line's prior (lowest seed) at one rate; None when no row has samples."""
    firsts = first_seed_rows(runs.rows, bits, lambda r: r.get("samples_path"))
    if not firsts:
        return None
    rows, files = {}, {}
    for label, r in firsts.items():
        files[label] = str(Path(r["samples_path"]) / "samples.npz")
        with np.load(runs.run_of(r).root / files[label]) as z:
            rows[f"{label}: {r['prior']}"] = z["images"][:N_IMAGES].astype(np.float64) / 255
    path = out / "figures" / f"samples_{bits:g}bits.png"
    layout = write_mosaic(path, rows, f"prior samples at {bits:g} bits per image")
    return Figure(path, f"samples at {bits:g} bits per image: the first {N_IMAGES} codes each prior drew (seeded), "
                        "decoded by the decoder of their row", {"rows": list(rows), "files": files,
                                                                 "n": N_IMAGES, **layout})


def write_mosaic(path: Path, rows: dict[str, np.ndarray], title: str) -> dict[str, Any]:
    """A labelled grid of image rows, each tile an exact integer upscaling of its image; returns its layout."""
    from PIL import Image, ImageDraw

    from geovq.io import atomic_path

    first = next(iter(rows.values()))
    n, channels, height, width = first.shape
    tile_h, tile_w = height * SCALE, width * SCALE
    top = 18
    canvas = np.full((top + len(rows) * (tile_h + PAD), LABEL_WIDTH + n * (tile_w + PAD), 3), 255, np.uint8)
    origins = []
    for i, tiles in enumerate(rows.values()):
        y = top + i * (tile_h + PAD)
        for j, tile in enumerate(to_uint8(tiles)):
            x = LABEL_WIDTH + j * (tile_w + PAD)
            canvas[y:y + tile_h, x:x + tile_w] = tile.repeat(SCALE, 0).repeat(SCALE, 1)
        origins.append(y)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for label, y in zip(rows, origins):
        draw.text((4, y + tile_h // 2 - 5), label[:30], fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return {"scale": SCALE, "pad": PAD, "left": LABEL_WIDTH, "top": top, "tile": [tile_h, tile_w]}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) in [0, 1] -> (n, H, W, 3) uint8 (gray repeated to RGB)."""
    pixels = np.clip(np.rint(np.asarray(images, np.float64) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return pixels.repeat(3, axis=3) if pixels.shape[3] == 1 else pixels
