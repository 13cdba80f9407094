"""Prior sampling and training cost at the default sizes: incremental sampling against a full rerun.

    python bench/prior_sampling.py [--dataset mnist] [--n 1000] [--threads 1]

For each prior (default sizes of `--dataset`, on the dataset's grid: 7×7, K = 256 for mnist; 4×4, K = 64
for digits), prints the CPU seconds of one training step and the projected training time (steps × step;
validation passes not counted), then the CPU seconds to draw n samples two ways and their ratio:
- `incremental`: what `Prior.sample` does (the Transformer's key/value cache; the PixelCNN's vertical stack
  once per row and its horizontal stack on one row per token);
- `rerun` (the baseline): the full teacher-forced `logits` recomputed for every position.
Both draw from the same seeded generator, so they must return the same codes (checked). Untrained weights:
the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch


def rerun_sample(model, n: int, generator: torch.Generator) -> torch.Tensor:
    codes = torch.zeros(n, model.grid.tokens, dtype=torch.long)
    with torch.no_grad():
        for t in range(model.grid.tokens):
            probs = model.logits(codes)[:, t].float().softmax(-1)
            codes[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from geovq.models.priors import PRIORS, build_prior
    from geovq.models.priors.base import CodeGrid
    from geovq.models.priors.settings import prior_config
    from geovq.training.prior import _optimizer

    grid = CodeGrid(7, 7, 1, 256) if args.dataset == "mnist" else CodeGrid(4, 4, 1, 64)
    print(f"{args.dataset} grid {grid}, {args.threads} thread(s), CPU seconds of this process")
    for kind in PRIORS:
        cfg = prior_config(args.dataset, kind)
        torch.manual_seed(0)
        model = build_prior({"kind": kind, "grid": grid.as_dict(), "n_classes": 0, "model": cfg.model})
        opt = _optimizer(model, cfg.train)
        batch = torch.randint(0, grid.n_codes, (cfg.train.batch_size, grid.tokens))
        for i in range(13):  # 3 warm-up steps, 10 timed
            if i == 3:
                t = time.process_time()
            loss = model.token_nll(batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        step = (time.process_time() - t) / 10
        params = sum(p.numel() for p in model.parameters())
        print(f"{kind} {cfg.model}: {params / 1e6:.2f}M parameters, {step * 1e3:.0f} ms/step at batch "
              f"{cfg.train.batch_size} -> {cfg.train.max_steps} steps {step * cfg.train.max_steps:.0f} s")
        model.eval()
        t = time.process_time()
        fast = model.sample(args.n, generator=torch.Generator().manual_seed(1))
        t_fast = time.process_time() - t
        t = time.process_time()
        slow = rerun_sample(model, args.n, torch.Generator().manual_seed(1))
        t_slow = time.process_time() - t
        agree = (fast == slow).float().mean().item()
        print(f"  sample n={args.n}: incremental {t_fast:.2f} s, rerun {t_slow:.2f} s, ratio rerun/incremental "
              f"{t_slow / t_fast:.1f}; codes agree {agree:.4f}")


if __name__ == "__main__":
    main()
