
import pytest
import yaml

from geovq.report.figures import _ceiling_lines, _stat
from geovq.report.tables import markdown_report, mean_ci


def test_mean_ci_matches_student_t_closed_form():
    # n = 3: Student t with 2 d.o.f. has the closed-form quantile (2p − 1) / sqrt(2p(1 − p)); sd of (1, 2, 3) = 1
    p = 0.975
    t = (2 * p - 1) / (2 * p * (1 - p)) ** 0.5
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(t / 3**0.5, rel=1e-10)
    assert mean_ci([5.0]) == (5.0, None)


def row(method, vae, k, seed, psnr, finetuned=False):
    return {"method": method, "vae": vae, "K": k, "bits_per_image": 16 * (k.bit_length() - 1), "bpp": 1.0,
            "seed": seed, "psnr": psnr, "ssim": 0.5, "lpips": None, "lpips_reason": "no weights", "mse": 0.01,
            "usage_perplexity": 10.0, "dead_codes": 0, "finetuned": finetuned}


def test_markdown_groups_by_bits_and_summarises_seeds():
    rows = [row("kmeans", "plain", 16, s, p) for s, p in enumerate([20.0, 21.0, 22.0])]
    rows += [row("kmeans", "plain", 16, 0, 25.0, finetuned=True), row("vqvae", None, 64, 0, 30.0)]
    ceilings = [{"vae": "plain", "tdc_target_bits": None, "psnr": 30.0, "mean_token_kl_bits": 2.0}]
    text = markdown_report(rows, ceilings, yaml.safe_dump({"dataset": "digits"}), 5, 5)
    assert text.startswith("# geovq results\n")  # every planned unit finished: not partial
    assert text.index("## 64 bits per image") < text.index("## 96 bits per image")
    kmeans_line = next(l for l in text.splitlines() if l.startswith("| kmeans | plain | VAE's |"))
    assert "| 3 | 21.00 ± 2.48 |" in kmeans_line  # 4.3027 * 1 / sqrt(3)
    assert any(l.startswith("| kmeans | plain | fine-tuned | 16 |") and "25.00" in l for l in text.splitlines())
    assert "| vqvae | — | end-to-end | 64 |" in text
    assert "LPIPS n/a: no weights" in text


def test_figure_statistics_put_usage_on_a_fraction_of_k_and_one_ceiling_per_variant():
    rows = [dict(row("kmeans", "plain", 16, s, p), usage_perplexity=u) for s, p, u in [(0, 20.0, 8.0), (1, 22.0, 12.0)]]
    mean, half = _stat(rows, "usage_perplexity")
    assert mean == pytest.approx(10.0 / 16)
    assert half == pytest.approx(mean_ci([8.0, 12.0])[1] / 16)
    assert _stat(rows[:1], "psnr") == (20.0, 0.0)  # one seed: no interval
    ceilings = [{"vae": "plain", "tdc_target_bits": None, "psnr": 20.0}, {"vae": "plain", "tdc_target_bits": None,
                "psnr": 22.0}, {"vae": "tdc", "tdc_target_bits": 8.0, "psnr": 28.0}]
    assert _ceiling_lines(ceilings) == {"continuous VAE (plain)": (21.0, "--"),
                                        "continuous VAE (tdc, T=8)": (28.0, ":")}
