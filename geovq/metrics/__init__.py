"""Evaluation metrics (DESIGN.md §4), one topic per module:

- `image`: paired reconstruction quality (PSNR, SSIM, MSE, LPIPS) of reconstruction i against original i.
- `codebook`: code usage on held-out codes (histogram, perplexity, dead codes).
- `rate`: fixed-length index bits per image and per pixel (§2), stated beside every comparison.
- `latent`: quantization error of ẑ against the posterior (μ, σ).

Nothing is imported here so that `geovq.metrics.rate` stays cheap (no torch) for the CLI.
"""

#: SSIM's Gaussian window (σ 1.5, 11 px a side): every row is scored with it, so a dataset's images must be at least
#: SSIM_WINDOW px a side, which the sweep's rules check before anything is trained
SSIM_SIGMA = 1.5
# torchmetrics derives the Gaussian window from sigma as in scikit-image (truncate 3.5): 2·int(3.5σ+0.5)+1
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1  # 11
