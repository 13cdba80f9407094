"""geovq: post-hoc discrete codes for Gaussian VAEs, compared with VQ-VAE at the same bit rate.

Importing the package is cheap on purpose (no torch, no Ray): the CLI must answer `--help` fast.
"""

__version__ = "0.1.0"
