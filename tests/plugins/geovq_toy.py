"""A quantizer defined outside geovq, as a user would write one: one file, one new hyperparameter.

Ray workers import it by the path its units carry ('geovq_toy:RandomTokens'); tests/conftest.py puts this
folder on PYTHONPATH before Ray starts, as a user would install their module on every node.
"""

from __future__ import annotations

import numpy as np

from geovq.errors import GeovqError
from geovq.latents import LatentSet
from geovq.nearest import exact_nearest
from geovq.quantize import Quantizer, register


@register("toy-q")
class RandomTokens(Quantizer):
    """Codebook = K training tokens drawn at random, scaled by `spread`; encode = nearest codeword."""

    def __init__(self, n_codes: int, seed: int = 0, spread: float = 1.0) -> None:
        super().__init__(n_codes, seed)
        self.spread = spread  # factor on the drawn tokens

    def _validate_params(self) -> None:
        if not self.spread > 0:
            raise GeovqError(f"toy-q spread={self.spread} must be > 0")

    def _fit(self, latents: LatentSet) -> None:
        chosen = np.random.default_rng(self.seed).choice(latents.n_tokens, self.n_codes, replace=False)
        self.codebook_ = (self.spread * latents.token_mu[chosen]).astype(np.float32)
        self.fit_info_ = {"chosen": chosen[:4].tolist()}

    def _encode_tokens(self, latents: LatentSet) -> np.ndarray:
        return exact_nearest(self.codebook_, latents.token_mu)[1][:, 0]


@register("crash-q")
class CrashingQuantizer(RandomTokens):
    """Kills its own worker process while fitting, as the OOM killer or a lost node would."""

    def _fit(self, latents: LatentSet) -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
