"""Rate of a code (DESIGN.md §2): fixed-length index bits only, no entropy coding.

Two methods are comparable only at equal bits per image (same grid, same K, same d); every comparison
row states these numbers.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from geovq.errors import GeovqError


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise GeovqError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def bits_per_image(tokens_per_image: int, n_codes: int) -> float:
    """tokens_per_image × log2(K): the bits to write every token's index with a fixed-length code."""
    tokens = _positive_int(tokens_per_image, "tokens_per_image")
    return tokens * math.log2(_positive_int(n_codes, "n_codes (K)"))


def bits_per_pixel(bits: float, native_hw: tuple[int, int]) -> float:
    """bits / (H·W) of the original image (pixels, not channel values)."""
    if isinstance(bits, bool) or not isinstance(bits, Real) or not math.isfinite(bits) or bits < 0:
        raise GeovqError(f"bits must be a finite non-negative number, got {bits!r}")
    if not isinstance(native_hw, (tuple, list)) or len(native_hw) != 2:
        raise GeovqError(f"native_hw must be the original image's (height, width), got {native_hw!r}")
    height = _positive_int(native_hw[0], "image height")
    width = _positive_int(native_hw[1], "image width")
    return float(bits) / (height * width)
