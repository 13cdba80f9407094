"""Evaluation metrics (DESIGN.md §4), one topic per module:

- `image`: paired reconstruction quality (PSNR, SSIM, MSE, LPIPS) of reconstruction i against original i.
- `codebook`: code usage on held-out codes (histogram, perplexity, dead codes).
- `rate`: fixed-length index bits per image and per pixel (§2), stated beside every comparison.
- `latent`: quantization error of ẑ against the posterior (μ, σ).

Nothing is imported here so that `geovq.metrics.rate` stays cheap (no torch) for the CLI.
"""
