"""Stage: measure decoder-metric edge lengths for a given edge list (what the geodesic fit consumes).

Input: a VAE checkpoint, its latents, the landmark tokens and undirected edges (E, 2) between them (ids into
`tokens`); output: (E,) lengths, exactly as the in-process fit measures them. A Ray Data actor calls this on
a shard of edges: it builds token decoders for just the tokens its edges touch, so a shard needs no graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from geovq.geometry.decoders import GridTokenDecoder
from geovq.geometry.lengths import CHUNK_ELEMENTS, edge_lengths
from geovq.latents import LatentSet
from geovq.stages.common import GridDecoder
from geovq.training.checkpoint import load_model


def edge_lengths_stage(checkpoint: Path, latents: LatentSet, tokens: np.ndarray, edges: np.ndarray,
                       quadrature: str, device: torch.device, chunk_elements: int | None = None) -> np.ndarray:
    """(E,) lengths of `edges` between `tokens` (token ids of `latents`) under the checkpoint's decoder."""
    decoder = GridDecoder(load_model(checkpoint, "vae", device))
    return measure_edges(decoder, latents, tokens, edges, quadrature, chunk_elements)


def measure_edges(decoder: GridDecoder, latents: LatentSet, tokens: np.ndarray, edges: np.ndarray,
                  quadrature: str, chunk_elements: int | None = None) -> np.ndarray:
    """The same with a decoder already loaded (an actor keeps one for all its shards)."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) == 0:
        return np.zeros(0)
    used, local = np.unique(edges, return_inverse=True)  # only the tokens this shard touches
    nodes = GridTokenDecoder.from_latents(decoder, latents, np.asarray(tokens)[used])
    return edge_lengths(nodes, local.reshape(-1, 2), quadrature, chunk_elements=chunk_elements or CHUNK_ELEMENTS)
