"""The end-to-end baselines' quantizers (geovq.end_to_end): vector-quantize-pytorch's FSQ, LFQ and residual VQ,
each wrapped to one interface over the token layout's (B, T, d) tokens:

    quantized, codes, aux = bottleneck(tokens)  # (B, T, d) with gradients to the encoder, (B, T) in [0, K), scalar
    bottleneck.code_vectors(codes)              # (B, T, d): what the decoder receives for those codes

One code in [0, K) per token, whatever the library's own index shape ((B, T, Q) for residual VQ), so that every
row is tokens × log2 K bits and priors, samples and usage columns treat these codes like any other.
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """Base: `forward(tokens) -> (quantized, codes, aux loss)` and `code_vectors(codes)`; `n_codes` is K."""

    n_codes: int

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_from(self, tokens: torch.Tensor) -> None:
        """Initialise from the untrained encoder's (N, d) tokens before training; nothing by default."""


class FSQBottleneck(Bottleneck):
    """Finite scalar quantization: d -> len(levels) (a learned projection, unless d = len(levels)), each dimension
    bounded and rounded to its levels, -> d. No codebook, no auxiliary loss."""

    def __init__(self, token_dim: int, levels: list[int]) -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.n_codes = int(torch.tensor(levels).prod())
        # a dimension of 2 levels needs the symmetric grid (the library refuses 2 levels without it)
        self.fsq = FSQ(levels=list(levels), dim=token_dim, preserve_symmetry=any(level == 2 for level in levels))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, codes = self.fsq(tokens)
        return quantized, codes.long(), tokens.new_zeros(())

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(codes)


class LFQBottleneck(Bottleneck):
    """Lookup-free quantization: d -> log2 K (projected unless d = log2 K), each dimension its sign, -> d; the
    auxiliary loss is the entropy penalty plus the commitment term (zero in eval mode)."""

    def __init__(self, token_dim: int, n_codes: int, entropy_weight: float, commitment: float,
                 diversity_gamma: float) -> None:
        super().__init__()
        from vector_quantize_pytorch import LFQ

        self.n_codes = n_codes
        # always a projection (even where d = log2 K), so that `init_from` can centre and scale what is quantized
        self.lfq = LFQ(dim=token_dim, codebook_size=n_codes, entropy_loss_weight=entropy_weight,
                       commitment_loss_weight=commitment, diversity_gamma=diversity_gamma, has_projections=True)

    @torch.no_grad()
    def init_from(self, tokens: torch.Tensor) -> None:
        """Scale the input projection so that each of the log2 K projected dimensions has zero mean and unit
        variance over the tokens (as ActNorm initialises). Why: an untrained encoder's tokens lie close together,
        so every token falls in one orthant, the entropy penalty's gradient (through a softmax at temperature
        1/100) vanishes and training keeps 2 of K codes (measured on digits, K = 16 and 64)."""
        projection = self.lfq.project_in
        projected = projection(tokens)
        mean, std = projected.mean(0), projected.std(0).clamp_min(1e-6)
        projection.weight.div_(std.unsqueeze(1))
        projection.bias.sub_(mean).div_(std)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.lfq(tokens)
        return out.quantized, out.indices.long(), out.entropy_aux_loss

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        return self.lfq.indices_to_codes(codes)


class RVQBottleneck(Bottleneck):
    """Residual VQ: `stages` EMA codebooks of `stage_codes` codewords (k-means initialised on the first batch,
    dead codes restarted), each quantizing the residual of the ones before. A token's code is its stage indices as
    the digits of one base-K_q number, the first stage most significant: code = Σ_q i_q · K_q^(Q-1-q)."""

    def __init__(self, token_dim: int, stage_codes: int, stages: int, decay: float, commitment: float,
                 dead_code_ratio: float) -> None:
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.stage_codes, self.stages, self.n_codes = stage_codes, stages, stage_codes**stages
        self.rvq = ResidualVQ(dim=token_dim, num_quantizers=stages, codebook_size=stage_codes, decay=decay,
                              commitment_weight=commitment, dead_code_threshold_ratio=dead_code_ratio,
                              kmeans_init=True, kmeans_iters=10)
        # (Q,) place values of the stage digits
        self.register_buffer("places", stage_codes ** torch.arange(stages - 1, -1, -1), persistent=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, digits, commit = self.rvq(tokens)  # digits (B, T, Q)
        return quantized, (digits.long() * self.places).sum(-1), commit.sum()

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        digits = codes.long().unsqueeze(-1) // self.places % self.stage_codes  # (B, T, Q)
        return self.rvq.get_output_from_indices(digits)
