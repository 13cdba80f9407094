"""What every geovq Tune trial shares, a sweep's (`geovq.distributed.tune`) and a search's (`geovq.search.trial`):
its device, its thread limits, and the metric it reports when a GeovqError ended it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from geovq.errors import GeovqError

#: the metric a trial reports when a GeovqError ended it: a cause a retry cannot fix (a corrupt file, a bad
#: setting), so Tune is not asked to retry it; retries are kept for crashes (a killed worker, a lost node)
GEOVQ_ERROR = "geovq_error"


def trial_device():
    """The torch device of this trial: the GPU Ray assigned it, else the CPU."""
    import ray
    import torch

    gpus = ray.get_gpu_ids()
    if not gpus:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GeovqError(f"this trial was assigned GPU {gpus} by Ray, but torch sees no CUDA device on node "
                         f"{ray.get_runtime_context().get_node_id()} ({ray.util.get_node_ip_address()}): a CPU-only "
                         "torch build, or a node declaring GPUs it does not have")
    return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs


@contextmanager
def trial_threads(threads: int) -> Iterator[None]:
    """Concurrent trials must not oversubscribe the cores: torch, faiss and the BLAS/OpenMP pools behind
    scikit-learn and scipy all get the trial's thread count while the trial runs."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(threads):
        yield
