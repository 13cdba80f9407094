"""A user's image files in and out, for `geovq compress` / `decompress`: PNG or JPEG files (Pillow), or one .npz
archive read by the rules of `geovq sweep npz` (key `images`; uint8 or float in [0, 1]; NHW, NHWC or NCHW)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geovq.errors import GeovqError


def read_images(paths: list[Path], shape: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(names, (N, C, H, W) float32 in [0, 1]) of the files, each checked against `shape` (C, H, W): a wrong
    size or channel count is one line naming the file and the expected shape."""
    from geovq.data.npz import read_archive, to_unit_nchw

    expected = f"{shape[0]}×{shape[1]}×{shape[2]} (channels × height × width)"
    if len(paths) == 1 and paths[0].suffix == ".npz":
        arrays = read_archive(paths[0])
        if "images" not in arrays:
            raise GeovqError(f"{paths[0]}: found keys {sorted(arrays)}; give the images under the key `images`")
        images = to_unit_nchw(arrays["images"], "images", paths[0])
        if tuple(images.shape[1:]) != shape:
            raise GeovqError(f"{paths[0]}: images are {'×'.join(map(str, images.shape[1:]))}; this run's unit reads "
                             f"{expected}")
        return [f"{paths[0].stem}-{i:05d}" for i in range(len(images))], images
    names, out = [], []
    for path in paths:
        image = _read_picture(path, shape)
        if tuple(image.shape) != shape:
            raise GeovqError(f"{path} is {'×'.join(map(str, image.shape))}; this run's unit reads {expected}")
        names.append(path.stem)
        out.append(image)
    if len(set(names)) != len(names):
        raise GeovqError("two images share a file name; their compressed files would overwrite each other")
    return names, np.stack(out)


def _read_picture(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """(C, H, W) float32 in [0, 1]: greyscale for a 1-channel run, RGB for a 3-channel one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in ("L", "RGB", "RGBA", "P", "LA", "I;16", "I"):
                raise GeovqError(f"{path}: image mode {mode} is not supported; give an 8-bit grey or RGB PNG/JPEG")
            channels = 1 if mode in ("L", "LA", "I;16", "I") else 3
            if channels != shape[0]:
                raise GeovqError(f"{path} has {channels} channel(s); this run's unit reads {shape[0]} "
                                 f"({'grey' if shape[0] == 1 else 'RGB'})")
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    except (UnidentifiedImageError, OSError) as e:
        raise GeovqError(f"{path} is not a readable PNG or JPEG ({type(e).__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def write_png(path: Path, image: np.ndarray) -> None:
    """(C, H, W) float in [0, 1] -> an 8-bit PNG, written atomically."""
    from PIL import Image

    from geovq.io import atomic_path

    pixels = np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
