"""k-medoids on any metric space given by its distances: geodesic graphs and W2 points (DESIGN.md §3.3d, §3.4).

Per connected component (see `component_quotas` for the policy):
1. k-means++ seeding on the space's own distances (one single-source search per medoid, bounded by the
   largest current distance).
2. Small components (n <= exact_limit): the full n×n distance matrix and FasterPAM swaps (the `kmedoids`
   package), one pass at a time, to a swap-local optimum (no single medoid/non-medoid swap improves),
   from the k-means++ seeds and from PAM's BUILD; the better of the two is kept.
3. Large components, without any n×n or K×n matrix: alternate ("Voronoi iteration") to convergence. Assign
   every point to its nearest medoid (multi-source search), then move each medoid to the member that
   minimises the summed distance to its cell, searched among the `candidate_cap` members nearest to the
   current medoid (the current medoid included). Optionally, `n_blocks` CLARA-style rounds then run
   FasterPAM on a block (current medoids + a random sample) and keep the result only if the objective on
   the whole space drops, followed by more alternate iterations.
The objective Σ_j d(j, nearest medoid) is measured on the whole component after every iteration, logged
in `trace`, and never increases along one start: a proposal that does not lower it is rejected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import kmedoids as fasterpam_lib
import numpy as np
from scipy.spatial.distance import cdist

from geovq.errors import GeovqError

log = logging.getLogger(__name__)
#: relative decrease below which a medoid move counts as no change (summation-order noise)
REL_TOL = 1e-10


class MetricSpace(Protocol):
    @property
    def n(self) -> int: ...

    def components(self) -> np.ndarray: ...

    def subspace(self, nodes: np.ndarray) -> "MetricSpace": ...

    def distances_from(self, sources: np.ndarray, limit: float = np.inf) -> np.ndarray: ...

    def pairwise(self, nodes: np.ndarray) -> np.ndarray: ...

    def assign(self, medoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def best_medoid(self, members: np.ndarray, candidates: np.ndarray) -> tuple[int, float]: ...


class EuclideanSpace:
    """Points under the Euclidean distance (for W2 between diagonal Gaussians: the points are [μ, σ])."""

    CHUNK = 2**22  # float64 distances computed per cdist call

    def __init__(self, points: np.ndarray) -> None:
        self.points = np.ascontiguousarray(points, dtype=np.float64)

    @property
    def n(self) -> int:
        return self.points.shape[0]

    def components(self) -> np.ndarray:
        return np.zeros(self.n, dtype=np.int64)

    def subspace(self, nodes: np.ndarray) -> EuclideanSpace:
        return EuclideanSpace(self.points[nodes])

    def distances_from(self, sources: np.ndarray, limit: float = np.inf) -> np.ndarray:
        return cdist(self.points[sources], self.points)

    def pairwise(self, nodes: np.ndarray) -> np.ndarray:
        return cdist(self.points[nodes], self.points[nodes])

    def assign(self, medoids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = max(1, self.CHUNK // len(medoids))
        dist, label = np.empty(self.n), np.empty(self.n, dtype=np.int64)
        for s in range(0, self.n, rows):
            block = cdist(self.points[s:s + rows], self.points[medoids])
            label[s:s + rows] = block.argmin(axis=1)
            dist[s:s + rows] = block[np.arange(len(block)), label[s:s + rows]]
        return dist, label

    def best_medoid(self, members: np.ndarray, candidates: np.ndarray) -> tuple[int, float]:
        rows = max(1, self.CHUNK // len(members))
        cost = np.concatenate([cdist(self.points[candidates[s:s + rows]], self.points[members]).sum(axis=1)
                               for s in range(0, len(candidates), rows)])
        best = int(np.argmin(cost))
        return int(candidates[best]), float(cost[best])


@dataclass
class KMedoidsResult:
    medoids: np.ndarray  # (K,) point ids
    labels: np.ndarray  # (N,) index into medoids of each point's nearest medoid
    distances: np.ndarray  # (N,) distance of each point to that medoid
    quotas: np.ndarray  # (components,) medoids per component
    converged: bool
    #: per iteration: component, start (k-means++ or build), stage, iteration, objective
    trace: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)  # wall time: "seeding" (k-means++), "iterations" (the rest)

    @property
    def objective(self) -> float:
        return float(self.distances.sum())


def component_quotas(sizes: np.ndarray, n_medoids: int) -> np.ndarray:
    """Medoids per connected component: proportional to its size (largest remainder), at least one each.

    Every component needs a medoid (otherwise its points would have no finite distance to any code), and a
    proportional share never exceeds the component's size, so this quota is always feasible.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) > n_medoids:
        raise GeovqError(f"the graph has {len(sizes)} connected components but only K={n_medoids} medoids; "
                         f"every component needs one: raise K or the number of neighbours k")
    share = n_medoids * sizes / sizes.sum()
    quota = np.maximum(1, np.floor(share)).astype(np.int64)
    while quota.sum() < n_medoids:  # seats left: to the largest remainders with room
        room = np.where(quota < sizes, share - quota, -np.inf)
        quota[np.argmax(room)] += 1
    while quota.sum() > n_medoids:  # minimum-one seats overshot: take from the most over-served
        spare = np.where(quota > 1, quota - share, -np.inf)
        quota[np.argmax(spare)] -= 1
    return quota


def check_quotas(sizes: np.ndarray, quotas: np.ndarray, n_medoids: int) -> None:
    if len(quotas) != len(sizes) or quotas.sum() != n_medoids or (quotas < 1).any():
        raise GeovqError(f"medoid quotas {quotas.tolist()} must give each of the {len(sizes)} components at "
                         f"least one medoid and sum to K={n_medoids}")
    for c, (size, quota) in enumerate(zip(sizes, quotas)):
        if quota > size:
            raise GeovqError(f"connected component {c} has {size} points but {quota} medoids were asked of it; "
                             f"a component cannot hold more medoids than points")


def kmedoids(space: MetricSpace, n_medoids: int, seed: int = 0, *, quotas: np.ndarray | None = None,
             exact_limit: int = 2000, candidate_cap: int = 1000, max_iter: int = 100, n_blocks: int = 0,
             block_size: int = 2000) -> KMedoidsResult:
    """k-medoids of the `space.n` points, `quotas[c]` medoids in connected component c (default: by size)."""
    n = space.n
    if not 1 <= n_medoids <= n:
        raise GeovqError(f"K={n_medoids} medoids needs 1 <= K <= N={n} points")
    components = space.components()
    sizes = np.bincount(components)
    quotas = component_quotas(sizes, n_medoids) if quotas is None else np.asarray(quotas, dtype=np.int64)
    check_quotas(sizes, quotas, n_medoids)
    rng = np.random.default_rng(seed)
    medoids, labels, distances = [], np.empty(n, dtype=np.int64), np.empty(n)
    trace, converged, seconds = [], True, {"seeding": 0.0, "iterations": 0.0}
    for c, quota in enumerate(quotas):
        nodes = np.flatnonzero(components == c)
        sub = space.subspace(nodes) if len(nodes) < n else space
        fit = _Fit(sub, int(quota), rng, exact_limit, candidate_cap, max_iter, c)
        fit.run(n_blocks, block_size)
        labels[nodes] = fit.label + len(medoids)
        distances[nodes] = fit.dist
        medoids.extend(nodes[fit.medoids])
        trace.extend(fit.trace)
        converged &= fit.converged
        for stage in seconds:
            seconds[stage] += fit.seconds[stage]
    return KMedoidsResult(np.asarray(medoids, dtype=np.int64), labels, distances, quotas, converged, trace,
                          seconds)


def kmeans_plus_plus(space: MetricSpace, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding under the space's distance: each next medoid drawn with probability ∝ D(j)²."""
    medoids = [int(rng.integers(space.n))]
    nearest = space.distances_from(np.array(medoids))[0]
    for _ in range(1, k):
        weight = nearest**2
        if weight.sum() > 0:
            nxt = int(rng.choice(space.n, p=weight / weight.sum()))
        else:  # all remaining points coincide with medoids: any non-medoid
            nxt = int(rng.choice(np.setdiff1d(np.arange(space.n), medoids)))
        medoids.append(nxt)
        nearest = np.minimum(nearest, space.distances_from(np.array([nxt]), limit=nearest.max())[0])
    return np.asarray(medoids, dtype=np.int64)


class _Fit:
    """k-medoids of one connected space; `medoids`, `dist`, `label` always hold the best state so far."""

    def __init__(self, space, k, rng, exact_limit, candidate_cap, max_iter, component) -> None:
        self.space, self.k, self.rng = space, k, rng
        self.exact_limit, self.candidate_cap, self.max_iter = exact_limit, candidate_cap, max_iter
        self.component = component
        self.trace: list[dict] = []
        self.converged = False

    def run(self, n_blocks: int, block_size: int) -> None:
        start = time.perf_counter()
        self.medoids = kmeans_plus_plus(self.space, self.k, self.rng)
        seeded = time.perf_counter()
        if self.space.n <= self.exact_limit:
            self._exact()
        else:
            self.dist, self.label = self.space.assign(self.medoids)
            self._log("seeding", 0)
            self._alternate()
            for block in range(1, n_blocks + 1):
                if self._clara_block(block_size):
                    self._log("block", block)
                    self._alternate()
        self.seconds = {"seeding": seeded - start, "iterations": time.perf_counter() - seeded}

    def _log(self, stage: str, iteration: int, objective: float | None = None, start: str = "k-means++") -> None:
        objective = float(self.dist.sum() if objective is None else objective)
        self.trace.append({"component": self.component, "start": start, "stage": stage, "iteration": iteration,
                           "objective": objective})
        log.info("k-medoids component %d (%s start) %s %d: objective %.6g", self.component, start, stage,
                 iteration, objective)

    def _exact(self) -> None:
        """FasterPAM from the k-means++ seeds and from PAM's BUILD; the lower swap-local optimum wins.

        Two starts because swap-local optima are not unique and the matrix is already paid for: on small
        graphs the pair matches or beats plain PAM (BUILD + steepest SWAP), where either start alone loses
        by a few percent on some instances.
        """
        diss = self.space.pairwise(np.arange(self.space.n))
        self.dist = diss[:, self.medoids].min(axis=1)
        self._log("seeding", 0)
        if self.k == self.space.n:  # every point is a medoid: nothing to swap
            self.converged = True
        else:
            runs = []
            for start, medoids in (("k-means++", self.medoids), ("build", None)):
                def after_pass(iteration, loss, start=start):
                    self._log("swap", iteration, loss, start)
                medoids, converged = _fasterpam(diss, self.k, medoids, self.max_iter, after_pass)
                runs.append((diss[:, medoids].min(axis=1).sum(), start, medoids, converged))
            objective, start, self.medoids, self.converged = min(runs, key=lambda run: run[0])
            self._log("best", 0, objective, start)
        self.label = diss[:, self.medoids].argmin(axis=1)
        self.dist = diss[np.arange(self.space.n), self.medoids[self.label]]

    def _alternate(self) -> None:
        self.converged = False
        for iteration in range(1, self.max_iter + 1):
            moved = self.medoids.copy()
            by_cell = np.argsort(self.label, kind="stable")  # members of each cell come out sorted
            bounds = np.searchsorted(self.label[by_cell], np.arange(self.k + 1))
            for c in range(self.k):
                members = by_cell[bounds[c]:bounds[c + 1]]
                nearest_first = members[np.argsort(self.dist[members], kind="stable")[:self.candidate_cap]]
                candidates = np.unique(np.append(nearest_first, self.medoids[c]))
                best, cost = self.space.best_medoid(members, candidates)
                if cost < self.dist[members].sum() * (1 - REL_TOL):
                    moved[c] = best
            if (moved == self.medoids).all():
                self.converged = True
                return
            dist, label = self.space.assign(moved)
            if dist.sum() >= self.dist.sum():  # cannot happen in exact arithmetic; guard monotonicity
                self.converged = True
                return
            self.medoids, self.dist, self.label = moved, dist, label
            self._log("alternate", iteration)

    def _clara_block(self, block_size: int) -> bool:
        """FasterPAM on current medoids + a random sample; True if it lowered the whole-space objective."""
        others = np.setdiff1d(np.arange(self.space.n), self.medoids)
        sample = self.rng.choice(others, size=min(len(others), max(0, block_size - self.k)), replace=False)
        block = np.concatenate([self.medoids, sample])
        proposal, _ = _fasterpam(self.space.pairwise(block), self.k, np.arange(self.k), self.max_iter, None)
        proposal = block[proposal]
        dist, label = self.space.assign(proposal)
        if dist.sum() < self.dist.sum() * (1 - REL_TOL):
            self.medoids, self.dist, self.label = proposal, dist, label
            return True
        return False


def _fasterpam(diss: np.ndarray, k: int, medoids: np.ndarray | None, max_iter: int,
               after_pass) -> tuple[np.ndarray, bool]:
    """FasterPAM swap passes from `medoids` (None: PAM's BUILD) until a pass makes no swap.

    One library call per pass, so that after_pass(pass, objective) can log every pass.
    """
    for iteration in range(1, max_iter + 1):
        if medoids is None:
            result = fasterpam_lib.fasterpam(diss, k, max_iter=1, init="build", n_cpu=1)
        else:
            result = fasterpam_lib.fasterpam(diss, np.asarray(medoids, dtype=np.int64), max_iter=1, n_cpu=1)
        medoids = np.asarray(result.medoids, dtype=np.int64)
        if after_pass is not None:
            after_pass(iteration, result.loss)
        if result.n_swap == 0:
            return medoids, True
    return medoids, False
